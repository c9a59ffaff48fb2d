"""bf16 autocast where the hardware runs bf16 matmuls natively; float32 elsewhere.

On a CPU, ``TUNESMITH_AUTO_BF16`` overrides what ``auto`` finds: ``1`` chooses bf16 on any CPU
(emulated bf16 runs everywhere, only slower), ``0`` float32 on any CPU. CI runs the numerics tests
both ways, so that one machine catches what either kind of CPU would: a test that holds on one
kind of CPU only is a defect.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch

FORCE_ENV = "TUNESMITH_AUTO_BF16"


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively (fast) on ``device``."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(getattr(torch.cpu, check, lambda: False)()
                   for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return False


def forced_bf16() -> bool | None:
    """What ``TUNESMITH_AUTO_BF16`` makes ``auto`` choose on a CPU: bf16 (True), float32 (False), or
    whatever the CPU runs natively (None, unset)."""
    value = os.environ.get(FORCE_ENV, "").strip().lower()
    return {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}.get(value)


def uses_bf16(mixed_precision: str, device: torch.device) -> bool:
    """Whether ``train.mixed_precision`` turns bf16 autocast on ("auto": where bf16 is native, unless
    ``TUNESMITH_AUTO_BF16`` says otherwise on a CPU)."""
    if mixed_precision != "auto":
        return mixed_precision == "bf16"
    forced = forced_bf16() if device.type == "cpu" else None
    return native_bf16(device) if forced is None else forced


def autocast(mixed_precision: str, device: torch.device):
    """bf16 autocast where ``uses_bf16``, else a no-op.

    Weights, gradients and optimizer state stay float32; matmuls run in bf16.
    """
    return torch.autocast(device.type, dtype=torch.bfloat16) if uses_bf16(mixed_precision, device) else nullcontext()
