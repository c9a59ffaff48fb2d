"""Training objectives, registered in one place.

An objective owns everything that differs between kinds of training: its data check and encoding,
its batches and loss, its evaluation and samples, and which model head it loads (see
``objectives.base`` for the protocols). Each declares its typed ``Options``; config.py builds the
``objective:`` union from this registry. Adding an objective means one module here, one line in
``REGISTRY`` and one row in the test matrix (tests/test_objectives.py).
"""

from __future__ import annotations

from tunesmith.errors import TunesmithError
from tunesmith.objectives.causal import Causal
from tunesmith.objectives.classification import Classification
from tunesmith.objectives.dpo import DPO
from tunesmith.objectives.kto import KTO
from tunesmith.objectives.reward import Reward
from tunesmith.objectives.seq2seq import Seq2Seq

REGISTRY = {
    "causal": Causal,
    "classification": Classification,
    "seq2seq": Seq2Seq,
    "dpo": DPO,
    "reward": Reward,
    "kto": KTO,
}

# The objectives that train a decoder-only LM, whose answers can be sampled and judged (judged
# evaluation: ``eval.judge``, ``tunesmith judge``). seq2seq writes answers too, through an encoder
# and a decoder, which the sampler does not drive.
GENERATIVE = ("causal", "dpo", "kto")


def get_objective(name: str):
    if name not in REGISTRY:
        raise TunesmithError(f"objective.name: unknown objective {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[name]
