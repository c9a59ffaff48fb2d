"""The server's limits and batching settings (``tunesmith serve`` flags)."""

from __future__ import annotations

from pydantic import Field

from tunesmith.options import Section


class ServeOptions(Section):
    max_body_bytes: int = Field(1_000_000, ge=1, description="larger request bodies get 413")
    max_prompt_tokens: int = Field(2048, ge=1, description="longer prompts get 400")
    max_tokens: int = Field(1024, ge=1, description="the most a request may ask to generate (400 beyond)")
    default_max_tokens: int = Field(256, ge=1, description="what a request that names no max_tokens gets")
    max_concurrent: int = Field(64, ge=1, description="requests in flight at once; more get 429")
    retry_after_s: int = Field(1, ge=0, description="the Retry-After of a 429")
    max_adapters: int = Field(8, ge=1, description="adapters in memory at once")
    batch_window_ms: float = Field(5.0, ge=0, description="how long an idle engine waits for more requests")
    max_batch: int = Field(16, ge=1, description="rows decoded together at most (a request of n choices is n rows)")
    prefill_tokens: int = Field(512, ge=1, description="prompt tokens prefilled per decoding step at most")
    prefix_cache_mb: int = Field(256, ge=0, description="keys and values of shared prompt heads kept, per model (0: off)")
    device: str = Field("auto", description="where the model runs: cpu, cuda[:N], or auto (cuda when there is one)")
    dtype: str = Field("run", pattern="^(run|auto|float32|bfloat16)$",
                       description="the weights' and KV cache's dtype: run (the runs' own), float32, bfloat16, or "
                       "auto (bfloat16 where the device runs it natively, else float32)")

    def torch_device(self) -> str:
        import torch

        return ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device

    def weights_dtype(self):
        """The torch dtype to serve in, or None for the runs' own. ``auto`` asks ``precision.uses_bf16``
        (so ``TUNESMITH_AUTO_BF16`` decides on a CPU where it is set)."""
        import torch

        from tunesmith.train.precision import uses_bf16

        if self.dtype == "run":
            return None
        if self.dtype == "auto":
            return torch.bfloat16 if uses_bf16("auto", torch.device(self.torch_device())) else torch.float32
        return getattr(torch, self.dtype)
