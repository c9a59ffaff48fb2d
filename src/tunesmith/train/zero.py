"""DeepSpeed ZeRO's optimizer state, one partition per process, as tensors and plain data.

Under ZeRO (stages 1 to 3) each process holds the optimizer state of its own partition of the
trainable parameters: their fp32 master copy (one flat tensor per group) and the inner optimizer's
state for it (AdamW's step and moments). DeepSpeed's own ``state_dict`` holds these beside objects
that only pickle (its loss scaler, its parameter-slice mappings), and its ``load_checkpoint``
unpickles files. ``partition`` keeps the tensors and the plain data only; ``load_partition`` hands
DeepSpeed's ``load_state_dict`` the same dict back, with this process's own loss scaler (its numbers
restored) in place of the pickled one. A partition fits only the ZeRO stage and the number of
processes it was saved with: ``mismatch`` says why a checkpoint does not fit a run.
"""

from __future__ import annotations

import torch

from tunesmith.errors import TunesmithError

# DeepSpeed's state-dict keys (deepspeed.checkpoint.constants), by stage: where the inner optimizer's
# state dict and the fp32 master partitions are.
_INNER = {1: "base_optimizer_state", 2: "base_optimizer_state", 3: "optimizer_state_dict"}
_MASTERS = {1: "single_partition_of_fp32_groups", 2: "single_partition_of_fp32_groups", 3: "fp32_flat_groups"}
_STAGE, _LOSS_SCALER = "zero_stage", "loss_scaler"


def stage(accelerator) -> int | None:
    """The ZeRO stage this run trains under, or None when it is not under DeepSpeed."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if accelerator.distributed_type != "DEEPSPEED" or plugin is None:  # accelerate's DistributedType, a str enum
        return None
    return int(plugin.zero_stage)


def check_offload(accelerator) -> None:
    """Refuse ZeRO's offload to NVMe: there the optimizer state (and, for parameters, the weights) lives
    in DeepSpeed's swap files, which ``partition`` does not hold, so a checkpoint would look complete
    and resume with the optimizer state missing. Offload to the CPU keeps it in memory and is fine."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if stage(accelerator) is None:
        return
    settings = (plugin.deepspeed_config or {}).get("zero_optimization", {})
    for what in ("offload_optimizer", "offload_param"):
        if str((settings.get(what) or {}).get("device", "none")).lower() == "nvme":
            raise TunesmithError(f"DeepSpeed zero_optimization.{what}.device: nvme is not supported: the state it "
                                 "offloads lives in DeepSpeed's swap files, which tunesmith's checkpoints do not "
                                 "hold, so a resumed run would miss it; offload to cpu or none")


def _zero_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper around DeepSpeed's


def _plain(value) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return value is None or isinstance(value, (bool, int, float, str))


def partition(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """This process's partition of ZeRO's optimizer state: its tensors, copied to the CPU and named
    ``master.G`` (fp32 master partition of group G) and ``state.G.KEY`` (the inner optimizer's), and
    its plain data (JSON)."""
    zero = _zero_optimizer(optimizer)
    saved = zero.state_dict()
    stage_ = int(saved[_STAGE])
    inner = saved[_INNER[stage_]]
    tensors = {f"master.{g}": t for g, t in enumerate(saved[_MASTERS[stage_]])}
    plain_state: dict[str, dict] = {}
    for g, group_state in inner["state"].items():
        for key, value in group_state.items():
            if torch.is_tensor(value):
                tensors[f"state.{g}.{key}"] = value
            else:
                plain_state.setdefault(str(g), {})[key] = value
    scaler = {k: v for k, v in vars(zero.loss_scaler).items() if isinstance(v, (bool, int, float))}
    plain = {"stage": stage_, "processes": torch.distributed.get_world_size(),
             "deepspeed": {k: int(v) if k == _STAGE else v for k, v in saved.items() if _plain(v)},
             "param_groups": inner["param_groups"], "state": plain_state, "loss_scaler": scaler}
    return {name: t.detach().cpu().clone().contiguous() for name, t in tensors.items()}, plain


def load_partition(optimizer, tensors: dict[str, torch.Tensor], plain: dict) -> None:
    """Restore this process's partition (``partition``'s tensors and plain data) as DeepSpeed's
    ``load_checkpoint`` does, the model's weights being restored already; ZeRO-3's partitioned
    parameters are laid out again from the fp32 masters."""
    zero = _zero_optimizer(optimizer)
    stage_ = plain["stage"]
    state: dict[int, dict] = {int(g): dict(s) for g, s in plain["state"].items()}
    for name, value in tensors.items():
        if name.startswith("state."):
            _, g, key = name.split(".", 2)
            state.setdefault(int(g), {})[key] = value
    masters = [tensors[f"master.{g}"] for g in range(sum(name.startswith("master.") for name in tensors))]
    for key, value in plain["loss_scaler"].items():
        setattr(zero.loss_scaler, key, value)
    saved = {**plain["deepspeed"], _LOSS_SCALER: zero.loss_scaler, _MASTERS[stage_]: masters,
             _INNER[stage_]: {"state": state, "param_groups": plain["param_groups"]}}
    # What DeepSpeed's engine does around it: ZeRO-3 partitions every parameter before, and gathers
    # its persistent (small, never partitioned) parameters again after.
    if hasattr(zero, "checkpoint_event_prologue"):
        zero.checkpoint_event_prologue()
    # Indexed by data-parallel rank: DeepSpeed reads this process's own entry only.
    zero.load_state_dict({torch.distributed.get_rank(): saved}, load_optimizer_states=True,
                         load_from_fp32_weights=True)
    if hasattr(zero, "checkpoint_event_epilogue"):
        zero.checkpoint_event_epilogue()


def _processes(n: int) -> str:
    return f"{n} process{'es' if n != 1 else ''}"


def describe(stage_: int | None, processes: int) -> str:
    """How a run trains, in a few words: its ZeRO stage (or no DeepSpeed) and its processes."""
    if stage_ is None:
        return f"not under DeepSpeed, on {_processes(processes)}"
    return f"under DeepSpeed ZeRO-{stage_} on {_processes(processes)}"


def mismatch(saved: dict | None, stage_: int | None, processes: int) -> str | None:
    """Why a checkpoint whose optimizer state is ``saved`` (``{"stage", "processes"}`` of its ZeRO
    partitions; None when saved without DeepSpeed) cannot resume a run under ``stage_`` (None: no
    DeepSpeed) on ``processes`` processes; None when it can. Only ZeRO's own partitioning fits a
    partition, and without DeepSpeed the optimizer state is whole, which ZeRO does not take."""
    if saved is None:
        if stage_ is None:
            return None
        return (f"its optimizer state was saved whole, not under DeepSpeed; this run is {describe(stage_, processes)}: "
                "resume it as it was launched")
    if stage_ == saved["stage"] and processes == saved["processes"]:
        return None
    return (f"its optimizer state is DeepSpeed ZeRO-{saved['stage']}'s, partitioned over "
            f"{_processes(saved['processes'])}; this run is {describe(stage_, processes)}: resume it "
            f"{describe(saved['stage'], saved['processes'])}")
