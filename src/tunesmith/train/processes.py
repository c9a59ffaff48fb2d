"""The process a command runs in: its CPU threads, and whether accelerate must be told there is no
accelerator. Every recipe (``recipe``, ``align.loop``) and the benchmarks set up the same way."""

from __future__ import annotations

import torch


def setup_threads(threads: int | None) -> None:
    """Cap torch's CPU threads at ``train.threads`` when it is set (several runs sharing one machine)."""
    if threads:
        torch.set_num_threads(threads)


def cpu_only() -> bool:
    """No accelerator here: accelerate then runs several processes on the CPU (gloo) only when told."""
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return not (torch.cuda.is_available() or (mps is not None and mps.is_available())
                or (xpu is not None and xpu.is_available()))
