"""`tunesmith` under FSDP2 or DeepSpeed on CPU processes, for tests/test_sharded.py (run by torchrun,
one per process).

accelerate (1.16) switches FSDP and DeepSpeed on only for GPU-like devices: launched on CPUs with
ACCELERATE_USE_FSDP=true or ACCELERATE_USE_DEEPSPEED=true, it builds a MULTI_CPU (DDP over gloo)
state and ignores the request. torch's FSDP2 shards over gloo on CPUs, and DeepSpeed (0.19) runs
ZeRO on its CPU accelerator, so this launcher turns accelerate's state to FSDP or DeepSpeed before
tunesmith builds its Accelerator; everything after that is accelerate's own path for that engine.

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


def _asked(name: str) -> bool:
    return os.environ.get(f"ACCELERATE_USE_{name}", "").lower() == "true"


def _sharded_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if self.distributed_type != DistributedType.MULTI_CPU:
        return
    if _asked("FSDP"):
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = kwargs["fsdp_plugin"]
    elif _asked("DEEPSPEED"):
        # What accelerate does for DeepSpeed off the CPU (AcceleratorState.__init__).
        plugin = kwargs["deepspeed_plugin"]
        plugin.set_mixed_precision(self._mixed_precision)
        plugin.select(_from_accelerator_state=True)
        self.deepspeed_plugins = plugin
        self.distributed_type = DistributedType.DEEPSPEED
    accelerate.state.PartialState._shared_state["distributed_type"] = self.distributed_type


accelerate.state.AcceleratorState.__init__ = _sharded_on_cpu


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
