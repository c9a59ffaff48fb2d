"""`tunesmith` under FSDP2 on CPU processes, for tests/test_sharded.py (run by torchrun, one per process).

accelerate (1.16) switches its FSDP plugin on only for GPU-like devices: launched on CPUs with
ACCELERATE_USE_FSDP=true, it builds a MULTI_CPU (DDP over gloo) state and ignores the request. torch's
FSDP2 itself shards over gloo on CPUs, so this launcher turns accelerate's state to FSDP before
tunesmith builds its Accelerator; everything after that is accelerate's own FSDP2 path.

With SIGTERM_AT_STEP=N in the environment, every process sends itself a SIGTERM once step N is done,
as a scheduler stopping the job would.
"""

from __future__ import annotations

import os
import signal
import sys

import accelerate.state
from accelerate.utils import DistributedType

_init = accelerate.state.AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU and os.environ.get("ACCELERATE_USE_FSDP") == "true":
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = kwargs["fsdp_plugin"]
        accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP


accelerate.state.AcceleratorState.__init__ = _fsdp_on_cpu


def _sigterm_at(step: int):
    import tunesmith.recipe

    fit = tunesmith.recipe.fit

    def stopped_fit(*args, **kwargs):
        def on_step(state):
            if state.step == step:
                os.kill(os.getpid(), signal.SIGTERM)

        return fit(*args, **{**kwargs, "on_step": on_step})

    tunesmith.recipe.fit = stopped_fit


if __name__ == "__main__":
    from tunesmith.cli import main

    if os.environ.get("SIGTERM_AT_STEP"):
        _sigterm_at(int(os.environ["SIGTERM_AT_STEP"]))

    sys.exit(main(sys.argv[1:]))
