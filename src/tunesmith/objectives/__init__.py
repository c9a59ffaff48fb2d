"""Training objectives, registered in one place.

An objective owns everything that differs between kinds of training: its data check and encoding,
its batches and loss, its evaluation and samples, and which model head it loads (see
``objectives.base`` for the protocols). Each declares its typed ``Options``; config.py builds the
``objective:`` union from this registry. Adding an objective means one module here, one line in
``REGISTRY`` and one row in the test matrix (tests/test_objectives.py). What it can do (its head,
whether it writes answers, how it scores, its metrics, its data) it declares as ``abilities``;
other packages ask those through ``lacks`` and ``abilities``, never the objective's name.
"""

from __future__ import annotations

from tunesmith.errors import TunesmithError
from tunesmith.eval.metrics import METRICS
from tunesmith.objectives.base import CAUSAL_LM, HEADS, REWARD, SEQ2SEQ, SEQUENCE_CLASSIFIER, Abilities
from tunesmith.objectives.causal import Causal
from tunesmith.objectives.classification import Classification
from tunesmith.objectives.dpo import DPO
from tunesmith.objectives.kto import KTO
from tunesmith.objectives.reward import Reward
from tunesmith.objectives.seq2seq import Seq2Seq

__all__ = ["ABILITIES", "CAUSAL_LM", "HEADS", "REGISTRY", "REWARD", "SEQ2SEQ", "SEQUENCE_CLASSIFIER", "Abilities",
           "abilities", "get_objective", "lacks", "metrics", "table"]

REGISTRY = {
    "causal": Causal,
    "classification": Classification,
    "seq2seq": Seq2Seq,
    "dpo": DPO,
    "reward": Reward,
    "kto": KTO,
}

# What each ability means, for the one line that names an ability an objective lacks.
ABILITIES = {
    "causal_answers": "its model writes answers with a causal LM head (served, merged, judged, rated, probed)",
    "mixes_sources": "it scores each source of data.sources on its own",
    "scores": "its runs score texts (a label's probability, or a reward)",
    "scores_labels": "it scores each label's probability (label_scores)",
    "scores_rewards": "its runs score a text with a scalar reward (a reward model)",
    "reference": "it trains against a reference model (its base, or a child's parent)",
}


def get_objective(name: str):
    if name not in REGISTRY:
        raise TunesmithError(f"objective.name: unknown objective {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def abilities(name: str) -> Abilities:
    return get_objective(name).abilities


def lacks(name: str, ability: str) -> str | None:
    """One line naming ``ability`` (a key of ``ABILITIES``) when objective ``name`` does not have it;
    None when it does."""
    if getattr(abilities(name), ability):
        return None
    have = [n for n, cls in REGISTRY.items() if getattr(cls.abilities, ability)]
    return (f"objective {name} lacks the ability {ability}: {ABILITIES[ability]} "
            f"(objectives that have it: {', '.join(have) or 'none'})")


def table() -> str:
    """Every objective and its abilities, one row each (``tunesmith objectives``): a metric with the
    direction that is better (``eval.metrics.METRICS``)."""
    lines = ["| objective | head | data | metrics | writes answers | scores texts |", "|---|---|---|---|---|---|"]
    for name, cls in REGISTRY.items():
        a = cls.abilities
        shown = " ".join(f"{m}{'↑' if METRICS[m].higher_is_better else '↓'}" for m in a.metrics)
        lines.append(f"| {name} | {a.head} | {', '.join(a.data)} | {shown} | {'yes' if a.writes_answers else 'no'} "
                     f"| {a.scores or 'no'} |")
    return "\n".join(lines)


def metrics() -> dict[str, list[str]]:
    """Each objective's metrics, as its ``evaluate`` returns them (``eval.metrics.METRICS``)."""
    return {name: list(cls.abilities.metrics) for name, cls in REGISTRY.items()}
