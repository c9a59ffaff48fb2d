"""The shapes every training objective fills in: ``Objective`` for the recipe, ``Batches`` for the loop.

Written as ``typing.Protocol``s, as torchtune writes its recipe interfaces: they say what a caller
may use, and carry no code to inherit. An objective is one module under ``objectives/`` and one
line in ``objectives.REGISTRY``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from tunesmith.data.pipeline import PreparedData
from tunesmith.options import Section


@dataclass(frozen=True)
class Layout:
    """How batches are laid out, from the config and what the method allows."""

    batch_tokens: int  # tokens (padding included) per micro-batch
    row_len: int  # longest row: data.max_length
    pad_id: int
    seed: int
    one_per_row: bool = False  # no packing: the config turned it off, or the method cannot pack
    direct: bool = True  # the method lets the decoder run without the model's own forward
    shared_prefix: bool = False  # packed rows hold the examples' common first tokens once


# The heads an objective trains. Runs whose objectives share a head train the same kind of model:
# one may continue another (``tunesmith train --from``).
CAUSAL_LM = "causal_lm"  # a decoder-only language model
SEQUENCE_CLASSIFIER = "sequence_classifier"  # one logit per label
SEQ2SEQ = "seq2seq"  # an encoder and a decoder
REWARD = "reward"  # one scalar per text
HEADS = (CAUSAL_LM, SEQUENCE_CLASSIFIER, SEQ2SEQ, REWARD)


@dataclass(frozen=True)
class Abilities:
    """What an objective can do, declared once on its class (``Objective.abilities``). Code outside
    ``objectives/`` asks these, never an objective's name (``objectives.lacks``)."""

    head: str  # one of HEADS
    data: tuple[str, ...]  # the data kinds it trains on (``data.format.Schema.kind``)
    metrics: tuple[str, ...]  # what ``evaluate`` returns of ``eval.metrics.METRICS``
    writes_answers: bool = False  # its model answers prompts (``answer``, ``samples`` as text)
    # Answers several prompts in one batch: ``answers(model, prompts, labels, max_new_tokens)``.
    batched_answers: bool = False
    # How its runs score texts (``score.READERS``): "label" or "reward". "label": it has
    # ``label_scores(model, examples, encoded, labels)``, each label's probability and the loss, of
    # label examples encoded by ``encode(examples, labels)`` (``scores_labels``).
    scores: str | None = None
    # Trained and scored against the model training starts from: the base (an adapter disabled, or a
    # copy), or a child's parent, which the objective's ``start_from(model, reload, start)`` fixes.
    reference: bool = False
    mixes_sources: bool = False  # scores each source of ``data.sources`` on its own
    # Without labels, ``evaluate`` is the held-out loss alone (``loss_metrics`` of ``Batches.loss_totals``),
    # which several processes can sum share by share; with labels, for an objective that does not
    # score labels, that loss and the labels it chooses by ``choices(model, examples, labels)``
    # (``label_metrics``).
    loss_scored: bool = False
    # ``evaluate`` is ``Batches.figures_of`` the per-row scores that ``Batches.row_scores`` gives for
    # the batches of ``epoch(-1)`` (means over rows), so several processes can score a share of the
    # batches each and join them.
    rows_scored: bool = False
    # Options a child trained on rated traffic takes (``tunesmith retrain --objective``).
    traffic_options: dict[str, Any] = field(default_factory=dict)
    # The held-out figure ``tunesmith retrain``'s gate compares, for a run without labels (with
    # labels: accuracy); one of ``metrics``.
    gate_metric: str = "loss"

    @property
    def scores_labels(self) -> bool:
        """Each label's probability of a text (``label_scores``): a classifier, or a causal label run."""
        return self.scores == "label"

    @property
    def scores_rewards(self) -> bool:
        """A text's scalar reward (a reward model): what PPO and the judge score answers with."""
        return self.scores == "reward"

    @property
    def causal_answers(self) -> bool:
        """Answers written by a causal LM: what is served, merged, judged, probed and rated."""
        return self.writes_answers and self.head == CAUSAL_LM


@runtime_checkable
class Batches(Protocol):
    """A training set as the loop sees it: a seeded plan per epoch, tensors per plan entry, a loss.

    The loop never looks inside a batch; it sums ``loss`` over the micro-batches of a step and
    divides by the step's ``trained_tokens`` (summed over every process), so accumulation and
    several processes give the gradient of one large batch.
    """

    def epoch(self, epoch: int) -> list[Any]:
        """The micro-batches of ``epoch`` in a seeded order (``epoch < 0``: a fixed order)."""

    def tensors(self, micro_batch: Any) -> dict[str, torch.Tensor]:
        """The tensors of one micro-batch, on the CPU."""

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The summed loss of a batch (what ``trained_tokens`` counts), in the autograd graph."""

    def example_losses(self, model: torch.nn.Module,
                       batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per example of the batch: (example indices, summed losses with gradients, counts)."""

    def trained_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """What the loss is averaged over: labelled tokens, or examples for a classifier."""

    def input_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Non-padding tokens the model reads (for tokens/s)."""

    def loss_totals(self, model: torch.nn.Module, items: list[dict]) -> tuple[float, int]:
        """Summed loss and its count over ``items`` (validation), without gradients."""


@runtime_checkable
class Objective(Protocol):
    """What a run trains for: its data check and encoding, batches, loss, evaluation and samples.

    Built once per run as ``Objective(options, data_config, tokenizer, layout)``.
    """

    name: ClassVar[str]
    Options: ClassVar[type[Section]]  # the typed ``objective:`` options, with ``name: Literal[...]``
    abilities: ClassVar[Abilities]

    @classmethod
    def check_method(cls, method) -> list[str]:
        """Problems with training this objective with ``method`` (a ``methods.base.Method``)."""

    def prepare(self, labels: list[str] | None = None) -> PreparedData:
        """Read, check, split and encode the data of the config's ``data:`` section; with label data,
        by ``labels`` (a trained run's, in its model's output order) where given
        (``data.pipeline.label_order``)."""

    def load_model(self, source: str, dtype: str, labels: list[str], **kwargs) -> torch.nn.Module:
        """The pretrained model with the head this objective trains."""

    def batches(self, items: list[dict]) -> Batches:
        """The loop's view of encoded ``items``."""

    def evaluate(self, model: torch.nn.Module, examples: list[dict], encoded: list[dict],
                 labels: list[str]) -> dict[str, float]:
        """Held-out metrics: ``loss`` always; ``accuracy`` and ``macro_f1`` where there are labels."""

    def samples(self, model: torch.nn.Module, examples: list[dict], labels: list[str],
                max_new_tokens: int) -> list[dict]:
        """A few held-out predictions: ``{prompt, expected, output}`` each."""

    def answer(self, model: torch.nn.Module, prompt: str, labels: list[str], max_new_tokens: int,
               stream: bool = False) -> str:
        """The model's answer to a user's prompt, framed as in training (``tunesmith generate``)."""


def to_device(batch: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}
