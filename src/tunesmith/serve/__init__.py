"""``tunesmith serve``: an OpenAI-compatible server for the LoRA adapters of many runs on one base
model, with micro-batched mixed-adapter decoding, API keys and limits, and a request log in the
SQLite store (see docs/serving.md)."""
