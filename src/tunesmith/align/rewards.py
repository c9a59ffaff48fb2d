"""Rewards for PPO from tunesmith runs: a function from (prompts, answers) to one score per answer.

A classifier is a reward: a classification run scores an answer by the log-odds of one of its
labels (``positive``, say); a causal run trained on label data does the same through the
log-likelihood of each label string after its instruction. A reward-model run scores the prompt
and answer with its scalar head. Each kind of run is one entry of ``READERS``, by objective name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from tunesmith.errors import TunesmithError
from tunesmith.objectives.base import to_device
from tunesmith.store import Run, load_run

RewardFn = Callable[[list[str], list[str]], Sequence[float]]

BATCH = 16


def log_odds(logits: torch.Tensor, index: int) -> torch.Tensor:
    """``log p(index) - log(1 - p(index))`` under ``softmax(logits)``, per row; the logit difference
    with two labels."""
    others = torch.cat([logits[:, :index], logits[:, index + 1:]], dim=1)
    return logits[:, index] - torch.logsumexp(others, dim=1)


def classifier_reward(run: Run, session, model, label: str) -> RewardFn:
    """The classifier reads the answer alone, as it read the raw texts it was trained on."""
    index = _label_index(run, label)
    tokenizer, max_length = session.tokenizer, session.config.data.max_length

    @torch.no_grad()
    def score(prompts: list[str], answers: list[str]) -> list[float]:
        out = []
        for i in range(0, len(answers), BATCH):
            batch = tokenizer(answers[i:i + BATCH], truncation=True, max_length=max_length, padding=True,
                              return_tensors="pt")
            batch = to_device(dict(batch), model)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            out += log_odds(logits.float(), index).tolist()
        return out

    return score


def label_scoring_reward(run: Run, session, model, label: str) -> RewardFn:
    """A causal run on label data (the demo): the log-likelihood of each label after the run's own
    instruction around the answer, turned into the label's log-odds."""
    from tunesmith.objectives.causal import score_labels

    labels = run.labels()
    index = _label_index(run, label)
    objective, instruction = session.objective, session.config.data.instruction

    def score(prompts: list[str], answers: list[str]) -> list[float]:
        examples = [{"messages": [{"role": "user", "content": instruction.format(text=a)},
                                  {"role": "assistant", "content": ""}]} for a in answers]
        sums, _ = score_labels(model, objective.encoder, examples, labels, session.layout)
        return log_odds(-sums.float(), index).tolist()

    return score


def reward_model_reward(run: Run, session, model, label: str) -> RewardFn:
    """A reward-model run (objective ``reward``): its scalar score of prompt and answer together."""
    from tunesmith.objectives.reward import score_texts

    # The reward model reads prompt and answer framed as it was trained (the chat template).
    frame = session.objective.text

    def score(prompts: list[str], answers: list[str]) -> list[float]:
        texts = [frame([{"role": "user", "content": p}], a) for p, a in zip(prompts, answers)]
        return score_texts(model, session.tokenizer, texts, BATCH, session.config.data.max_length)

    return score


@dataclass(frozen=True)
class Reader:
    """How a run of one objective becomes a reward."""

    build: Callable[[Run, object, torch.nn.Module, str], RewardFn]
    labelled: bool  # the reward is one of the run's labels (``ppo.reward_label``)


READERS = {
    "classification": Reader(classifier_reward, labelled=True),
    "causal": Reader(label_scoring_reward, labelled=True),
    "reward": Reader(reward_model_reward, labelled=False),
}


def load_reward(path: str | Path, label: str, device: torch.device | str = "cpu") -> RewardFn:
    """The reward of the run at ``path``; every problem is a one-line ``TunesmithError``, found
    before the reward model is loaded."""
    run = Run(path, writer=False)
    config_file = run.path / "config.yaml"
    if not run.path.is_dir():
        raise TunesmithError(f"ppo.reward: {run.path}: no such run directory")
    if not config_file.is_file():
        raise TunesmithError(f"ppo.reward: {run.path}: not a tunesmith run directory (no config.yaml)")
    if "ppo" in (yaml.safe_load(config_file.read_text()) or {}):
        raise TunesmithError(f"ppo.reward: {run.path} is a PPO run, not a classifier or reward model")
    try:
        name = run.load_config().objective.name
    except TunesmithError as err:  # a run of an objective this tunesmith does not know, say
        raise TunesmithError(*(f"ppo.reward: {p}" for p in err.problems)) from None
    if name not in READERS:
        raise TunesmithError(f"ppo.reward: {run.path} is a {name} run, not a classifier or reward model "
                             f"(objective one of: {', '.join(READERS)})")
    if READERS[name].labelled:
        if not run.labels():
            raise TunesmithError(f"ppo.reward: {run.path} is a {name} run without labels, not a classifier "
                                 "or reward model")
        _label_index(run, label)
    run, session, model = load_run(path)
    model.to(device)
    return READERS[name].build(run, session, model, label)


def _label_index(run: Run, label: str) -> int:
    labels = run.labels()
    if label not in labels:
        raise TunesmithError(f"ppo.reward_label: {label!r} is not a label of {run.path} "
                             f"(its labels: {', '.join(labels) or 'none'})")
    return labels.index(label)
