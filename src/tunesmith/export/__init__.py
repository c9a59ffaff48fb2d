"""Export a run for other runtimes: a merged Hugging Face directory (``hf``) or a GGUF file
(``gguf``) for llama.cpp and Ollama. ``tunesmith export RUN --format hf|gguf --out PATH``."""

from tunesmith.export.output import export_run

__all__ = ["export_run"]
