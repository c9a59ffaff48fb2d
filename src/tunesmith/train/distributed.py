"""What the loop needs to train on several processes through accelerate (DDP, FSDP, DeepSpeed).

Each process takes its own share of every step's micro-batches; token counts and losses are summed
over processes, so that N processes compute the gradient one process would compute on all the
shares; only the main process writes files. The gradient all-reduce itself is accelerate's (the
model is prepared by it), not ours.
"""

from __future__ import annotations

import torch


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


def gather_random_states(state: dict, accelerator) -> list[dict]:
    """Every process's random state, by rank (a collective: every process must call it)."""
    if accelerator.num_processes == 1:
        return [state]
    states = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(states, state)
    return states
