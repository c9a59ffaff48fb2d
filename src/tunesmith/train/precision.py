"""bf16 autocast where the hardware runs bf16 matmuls natively; float32 elsewhere."""

from __future__ import annotations

from contextlib import nullcontext

import torch


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively (fast) on ``device``."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(getattr(torch.cpu, check, lambda: False)()
                   for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return False


def uses_bf16(mixed_precision: str, device: torch.device) -> bool:
    """Whether ``train.mixed_precision`` turns bf16 autocast on ("auto": where bf16 is native)."""
    return mixed_precision == "bf16" or (mixed_precision == "auto" and native_bf16(device))


def autocast(mixed_precision: str, device: torch.device):
    """bf16 autocast where ``uses_bf16``, else a no-op.

    Weights, gradients and optimizer state stay float32; matmuls run in bf16.
    """
    return torch.autocast(device.type, dtype=torch.bfloat16) if uses_bf16(mixed_precision, device) else nullcontext()
