"""Two objectives that tests/test_objective_abilities.py registers, as a user adding one would: each
is this module's class and one line in ``objectives.REGISTRY``, and nothing outside the module.

``imitate`` trains a causal LM's answers (the causal objective's maths, its own name, options and
abilities); ``critic`` a scalar head on preference pairs (the reward objective's maths), which has
no answers to serve.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from tunesmith.objectives.base import CAUSAL_LM, REWARD, Abilities
from tunesmith.objectives.causal import Causal
from tunesmith.objectives.reward import Reward
from tunesmith.options import Section


class ImitateOptions(Section):
    name: Literal["imitate"] = "imitate"


@dataclass
class Imitate(Causal):
    name: ClassVar[str] = "imitate"
    Options: ClassVar[type[Section]] = ImitateOptions
    abilities: ClassVar[Abilities] = Abilities(head=CAUSAL_LM, data=("prompt_completion", "chat"),
                                               metrics=("loss", "perplexity"), writes_answers=True)


class CriticOptions(Section):
    name: Literal["critic"] = "critic"
    center: float = 0.0  # read by the reward objective's loss


@dataclass
class Critic(Reward):
    name: ClassVar[str] = "critic"
    Options: ClassVar[type[Section]] = CriticOptions
    abilities: ClassVar[Abilities] = Abilities(head=REWARD, data=("preference",), metrics=("loss", "accuracy"))
