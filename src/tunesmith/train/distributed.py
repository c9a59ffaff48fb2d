"""What the loop needs to train on several processes through accelerate (DDP, FSDP, DeepSpeed).

Each process takes its own share of every step's micro-batches; token counts and losses are summed
over processes, so that N processes compute the gradient one process would compute on all the
shares; only the main process writes files. The gradient all-reduce itself is accelerate's (the
model is prepared by it), not ours. Evaluation gives each process a contiguous share of the rows
(``scored_in_shares``), gathered in rank order. Under FSDP2 the parameters and optimizer state are
gathered whole where a whole is needed (below), under DeepSpeed ZeRO-3 the parameters, and
``sharding_problems`` says what cannot train sharded.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import contextmanager

import torch

from tunesmith.train import zero


def share(micro_batches: list, accelerator) -> list:
    """This process's share of a step's micro-batches: every N-th, from its rank."""
    return micro_batches[accelerator.process_index :: accelerator.num_processes]


def total(value: float | int, accelerator) -> float | int:
    """``value`` summed over every process (itself, on one process)."""
    if accelerator.num_processes == 1:
        return value
    summed = accelerator.reduce(torch.tensor(float(value), device=accelerator.device), reduction="sum")
    return type(value)(summed.item())


def any_process(flag: bool, accelerator) -> bool:
    """Whether ``flag`` is set on any process, so that all of them act on it at the same step."""
    return bool(total(int(flag), accelerator))


def random_state() -> dict:
    """This process's random state: CPU, and every CUDA device's where there is CUDA."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_random_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_objects(value, accelerator) -> list:
    """Every process's ``value`` (any picklable object), by rank (a collective: every process must call it)."""
    if accelerator.num_processes == 1:
        return [value]
    values = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(values, value)
    return values


def main_says(value, accelerator):
    """The main process's ``value`` on every process (a collective), so that all act alike on what
    only the main process knows (a file it read)."""
    if accelerator.num_processes == 1:
        return value
    values = [value]
    torch.distributed.broadcast_object_list(values, src=0)
    return values[0]


def gather_random_states(state: dict, accelerator) -> list[dict]:
    """Every process's random state, by rank (a collective: every process must call it)."""
    return gather_objects(state, accelerator)


def share_rows(n: int, accelerator) -> slice:
    """This process's rows of ``n`` held-out rows to score: a contiguous share, by rank, so that the
    shares gathered in rank order are the rows in their order."""
    size = -(-n // accelerator.num_processes)
    return slice(min(n, accelerator.process_index * size), min(n, (accelerator.process_index + 1) * size))


def scored_in_shares(score, rows: list, accelerator) -> list:
    """``score(share)`` of each process's share of ``rows`` (a collective), by rank; a process
    without rows scores nothing (None)."""
    share = rows[share_rows(len(rows), accelerator)]
    return gather_objects(score(share) if share else None, accelerator)


# Sharded training: under FSDP2 each process holds a slice of every parameter (a DTensor) and of its
# optimizer state; under DeepSpeed ZeRO-3 a partition of every parameter (an empty tensor with ZeRO's
# ``ds_id`` between forwards) and of ZeRO's own optimizer state. Checkpoints and saved weights hold
# the parameters whole, in the same form as one process's (FSDP2's optimizer state too, so that its
# runs resume on any number of processes, sharded or not; ZeRO's stays one partition per process,
# ``train.zero``). Gathering a tensor is a collective:
# every process calls these functions in the same order, and each gets the whole tensors.


def set_deepspeed_batch(accelerator) -> None:
    """Under DeepSpeed, give it the micro-batch size it asks for before it prepares a model.
    tunesmith passes accelerate no dataloader and its batches are token budgets of no fixed size;
    DeepSpeed only counts samples with the number, so 1 stands in for it."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and plugin.deepspeed_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 1


def load_whole(accelerator) -> None:
    """Under DeepSpeed, have transformers load models whole on every process. accelerate tells
    transformers of its DeepSpeed config, and with ZeRO-3 transformers then partitions a model as it
    loads it (zero.Init), whatever zero3_init_flag says; tunesmith applies the method to the whole
    base, and rebuilds the tuned model whole after training, before ZeRO partitions anything."""
    if accelerator.distributed_type == "DEEPSPEED":
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()


def describe_sharding(accelerator) -> str:
    """One line: what each of several processes holds, and whether the sharding asked for runs."""
    n, asked = accelerator.num_processes, launched_sharding()
    if sharded(accelerator):
        return f"parameters and optimizer state sharded over {n} processes ({asked or 'FSDP2'})"
    if accelerator.distributed_type == "DEEPSPEED":  # accelerate's DistributedType, a str enum
        return f"optimizer state and gradients sharded over {n} processes ({asked})"
    if asked:
        return f"{asked} was asked for, but accelerate shards on GPUs only: these CPU processes run DDP, each " \
               "with the whole model"
    return f"DDP over {n} processes, each with the whole model"


def sharded(accelerator) -> bool:
    """Whether the model's parameters are split across processes (FSDP2, DeepSpeed ZeRO-3)."""
    return accelerator.num_processes > 1 and (bool(getattr(accelerator, "is_fsdp2", False)) or _zero3(accelerator))


def _zero3(accelerator) -> bool:
    return zero.stage(accelerator) == 3


def _partitioned(params) -> list[torch.Tensor]:
    """The parameters among ``params`` that DeepSpeed ZeRO-3 partitions (it marks them ``ds_id``)."""
    return [p for p in params if hasattr(p, "ds_id")]


@contextmanager
def _gathered(params, modifier_rank: int | None = None):
    """ZeRO-3's partitioned ``params`` whole on every process while inside (a collective; nothing
    to do for other parameters). With ``modifier_rank``, what that process writes into them is
    partitioned again to every process on the way out."""
    partitioned = _partitioned(params)
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` whole, on the CPU: a DTensor's slices gathered from every process (a collective)."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu().clone().contiguous()


def like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A whole ``value`` laid out as ``param`` is: sliced as its DTensor is (every process passes the
    same ``value``), or as it is for a plain parameter."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor) and value.shape == param.shape:
        return distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)
    return value


def trainable_weights(model) -> dict[str, torch.Tensor]:
    """The trainable parameters, whole, by their unsharded names."""
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with _gathered(trainable.values()):
        return {n: whole(p) for n, p in trainable.items()}


def load_weights(model, weights: dict[str, torch.Tensor]) -> None:
    """Set ``model``'s parameters named in ``weights`` (whole tensors) on every process."""
    params = dict(model.named_parameters())
    # Every process copies the same values; under ZeRO-3 the main process's are partitioned again.
    with _gathered([params[name] for name in weights], modifier_rank=0), torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(like(params[name], value))


def optimizer_state(optimizer) -> dict:
    """The optimizer's state dict with every state tensor whole (not under DeepSpeed, whose ZeRO
    optimizer state each process saves itself: ``train.zero``)."""
    state = optimizer.state_dict()
    if "state" not in state:
        return state
    return {**state, "state": {i: {k: whole(v) if torch.is_tensor(v) else v for k, v in s.items()}
                               for i, s in state["state"].items()}}


def load_optimizer_state(optimizer, state: dict) -> None:
    """Load a state dict of whole tensors (``optimizer_state``), each sliced as its parameter is."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sliced = {int(i): {k: like(params[int(i)], v) if torch.is_tensor(v) else v for k, v in s.items()}
              for i, s in state["state"].items()}
    optimizer.load_state_dict({**state, "state": sliced})


@contextmanager
def whole_parameters(root, accelerator):
    """Every process holds the whole parameters while inside: its forwards need no collective, so
    each process can score its own share of rows, however many batches that takes. Sharded again
    on the way out (FSDP2, DeepSpeed ZeRO-3; nothing to do otherwise)."""
    if _zero3(accelerator) and sharded(accelerator):
        with _zero3_whole(root):
            yield
        return
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in root.modules() if isinstance(m, FSDPModule)] if sharded(accelerator) else []
    for module in modules:
        module.unshard()
        module.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        if modules:
            root.set_reshard_after_forward(accelerator.state.fsdp_plugin.reshard_after_forward)
            root.set_reshard_after_forward(False, recurse=False)  # FSDP's own choice for the root
            for module in modules:
                module.reshard()


@contextmanager
def _zero3_whole(engine):
    """ZeRO-3's parameters gathered while inside, and its hooks off: they would partition each
    module's parameters again after its forward and gather them before the next (collectives)."""
    offload = engine.optimizer.parameter_offload
    with _gathered(list(engine.parameters())):
        for param in engine.parameters():
            param.ds_active_sub_modules.clear()
        offload._remove_module_hooks()
        try:
            yield
        finally:
            offload.forward_hooks, offload.backward_hooks = [], []
            offload.setup_zero_stage3_hooks()


def launched_sharding(environ: Mapping[str, str] = os.environ) -> str | None:
    """The sharding that `accelerate launch` asked this process for, from the environment it sets
    (``FSDP2``, ``FSDP1``, ``DeepSpeed ZeRO-2`` ...), or None."""
    if environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return f"FSDP{environ.get('FSDP_VERSION', '1')}"  # accelerate's default version is 1
    if environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return f"DeepSpeed ZeRO-{environ.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '2')}"
    return None


def sharding_problems(sharding: str | None, method: str, quantised: bool, private: bool) -> list[str]:
    """Why a run cannot train under ``sharding`` (``launched_sharding``); empty when it can."""
    if sharding is None:
        return []
    problems = []
    if sharding == "FSDP1":
        problems.append("launched with FSDP1 (fsdp_version: 1): tunesmith gathers sharded weights from FSDP2 only; "
                        "set fsdp_version: 2 (examples/accelerate/fsdp.yaml)")
    if quantised:
        problems.append(f"method.name: {method} loads the base model quantised and placed by its loader, which "
                        f"{sharding} cannot shard; shard lora instead, or train {method} without sharding")
    if private:
        problems.append(f"privacy: DP-SGD takes per-example gradients (torch.func) of the whole parameters, which "
                        f"{sharding} splits across processes; train privately without sharding (DDP)")
    return problems
