"""Rewards from tunesmith runs, for PPO and GRPO's ``run`` reward: a function from (prompts, answers)
to one score per answer.

Which runs can give one, and how, is ``tunesmith.score``'s (its ``READERS``): a classifier or a
causal run on label data gives the log-odds of ``ppo.reward_label``, a reward model its scalar.
This module only names the config's fields in the errors (PPO's by default) and frames each
(prompt, answer).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from tunesmith.errors import prefixed
from tunesmith.score import check_label, open_scorer, scoring_run

RewardFn = Callable[[list[str], list[str]], Sequence[float]]

BATCH = 16


def check_reward(path: str | Path, label: str, field: str = "ppo.reward",
                 label_field: str = "ppo.reward_label") -> None:
    """Every problem with the reward run at ``path`` as a one-line ``TunesmithError`` that names the
    config's ``field`` (or ``label_field``), without loading its weights (what ``load_reward`` checks first)."""
    _checked(path, label, field, label_field)


def load_reward(path: str | Path, label: str, device: torch.device | str = "cpu", field: str = "ppo.reward",
                label_field: str = "ppo.reward_label") -> RewardFn:
    """The reward of the run at ``path``; every problem is a one-line ``TunesmithError``, found
    before the reward model is loaded."""
    run, reader = _checked(path, label, field, label_field)
    scorer = open_scorer(run, reader, label, BATCH, device)

    def reward(prompts: list[str], answers: list[str]) -> list[float]:
        return scorer.reward([scorer.frame(p, a) for p, a in zip(prompts, answers)])

    return reward


def _checked(path: str | Path, label: str, field: str, label_field: str):
    with prefixed(f"{field}: "):
        run, reader = scoring_run(path)
    if reader.labelled:
        with prefixed(f"{label_field}: "):
            check_label(run, label)
    return run, reader
