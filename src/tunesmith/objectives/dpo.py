"""Direct Preference Optimisation: teach a causal LM to prefer the chosen answer of each pair over
the rejected one, more than a fixed reference model does, with no reward model and no sampling.
The reference-free losses (``loss: simpo`` or ``orpo``, ``preference_losses.REFERENCE_FREE``)
train on the same pairs with no reference at all: one forward pass a step instead of two.

Layout: one row per pair, ``[prompt][chosen][rejected]``, the prompt run once (``collate_shared``'s
4D mask: each answer sees the prompt and itself, with position ids continuing from the prompt), so
each answer's log-probability is exactly what ``prompt + answer`` alone would give.

Reference: the model training starts from. For a fresh run that is the base: with a PEFT method
(LoRA, QLoRA, IA3) the policy with its adapter disabled, under ``no_grad``: no second copy of the
model. Otherwise (full fine-tuning, our own adapters) reference log-probabilities taken once, before
the first optimizer step, for every pair the run prepared, and kept by the pairs' token ids
(``PrecomputedReference``). They can never go stale: a pair not yet scored is scored by the model as
loaded only if no parameter of it changed since, and otherwise by a fresh copy of the base.

A child that starts from a parent's tuned weights (``train --from``, ``retrain``) is trained against
its parent, as TRL trains against the SFT model it starts from: against the base, the loss would
pull the child back to the base and undo what the parent learned. Disabling the adapter gives the
base, not the parent, so for every method the parent's log-probabilities are precomputed
(``Policy.start_from``) once its weights are loaded, before the first step: every pair the run knows
is scored then, so a resumed child, which loads its parent's weights again before its checkpoint,
gets the same reference; a pair first seen later is scored by the parent loaded afresh.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from tunesmith.data.batching import collate_shared, length_grouped, shared_prefix
from tunesmith.data.format import IGNORE, Encoder, EncodeStats
from tunesmith.data.options import DataConfig
from tunesmith.data.pipeline import SPLITS, PreparedData, load_splits
from tunesmith.errors import TunesmithError
from tunesmith.model import load_model
from tunesmith.objectives.base import CAUSAL_LM, Abilities, Layout, to_device
from tunesmith.objectives.causal import Causal, _token_summary
from tunesmith.objectives.causal import Options as CausalOptions
from tunesmith.objectives.lm_loss import example_losses
from tunesmith.objectives.preference_losses import LOSSES, REFERENCE_FREE
from tunesmith.options import Section


class Options(Section):
    name: Literal["dpo"] = "dpo"
    beta: float = Field(0.1, gt=0, description="How far the policy may move from the reference: the "
                        "inverse temperature of the implicit reward beta * log(policy / reference). simpo: "
                        "the scale of the length-normalised reward (default 2.0); orpo: the weight of the "
                        "odds-ratio term beside the SFT loss.")
    loss: Literal["sigmoid", "ipo", "hinge", "conservative", "simpo", "orpo"] = Field(
        "sigmoid", description="sigmoid (DPO), ipo, hinge (SLiC) or conservative (cDPO, label smoothing); "
        "reference-free: simpo or orpo.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="conservative: the share of pairs "
                                   "thought to be labelled the wrong way round.")
    gamma: float = Field(0.5, ge=0, description="simpo: the margin the chosen answer's length-normalised "
                         "reward should lead the rejected one's by.")

    @model_validator(mode="after")
    def _simpo_beta(self):
        # SimPO's reward is a mean per-token log-probability, about 30 times smaller than DPO's summed
        # log-ratio: the paper's beta is 2 to 2.5, not DPO's 0.1.
        if self.loss == "simpo" and "beta" not in self.model_fields_set:
            self.beta = 2.0
        return self

    @property
    def reference_free(self) -> bool:
        return self.loss in REFERENCE_FREE


def encode_pairs(pairs: list[dict], encoder: Encoder, stats: EncodeStats) -> tuple[list[dict], list[dict]]:
    """``{chosen, rejected}`` token ids and labels per pair, and the pairs kept: a pair is dropped
    when truncation leaves either answer without a trained token."""
    items, kept = [], []
    for pair in pairs:
        answers = [encoder.encode({"messages": [*pair["messages"], {"role": "assistant", "content": pair[k]}],
                                   "_where": pair.get("_where")}, stats) for k in ("chosen", "rejected")]
        if None not in answers:
            items.append({"chosen": answers[0], "rejected": answers[1], **({"margin": pair["margin"]} if "margin" in pair else {})})
            kept.append(pair)
    return items, kept


def pair_row(item: dict, pad_id: int) -> dict[str, torch.Tensor]:
    """One row ``[prompt][chosen][rejected]`` (``collate_shared`` with the pair's own prefix); seq ids
    0 (chosen) and 1 (rejected), -2 on the prompt."""
    answers = [item["chosen"], item["rejected"]]
    prefix = shared_prefix(answers)
    row_len = max(len(a["input_ids"]) for a in answers)
    return {k: v[0] for k, v in collate_shared(answers, [[0, 1]], row_len, pad_id, prefix).items()}


def stack_rows(rows: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of different widths as one right-padded batch; the pair of row r gets seq ids 2r, 2r + 1.

    Padding is a sequence of its own (positions from 0, seeing only itself), and carries no label.
    """
    width = max(len(r["input_ids"]) for r in rows)
    n = len(rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    pos = torch.arange(width).repeat(n, 1)
    seq = torch.full((n, width), -1, dtype=torch.long)
    mask = torch.eye(width, dtype=torch.bool).repeat(n, 1, 1, 1)
    for r, row in enumerate(rows):
        t = len(row["input_ids"])
        ids[r, :t], labels[r, :t] = row["input_ids"], row["labels"]
        pos[r, :t] = row["position_ids"]
        seq[r, :t] = torch.where(row["seq_ids"] >= 0, row["seq_ids"] + 2 * r, row["seq_ids"])
        pos[r, t:] = torch.arange(width - t)
        mask[r, 0, :t, :t] = row["attention_mask"][0]
    return {"input_ids": ids, "position_ids": pos, "labels": labels, "seq_ids": seq, "attention_mask": mask}


def pair_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed log-probability of each answer, [pairs, 2] (chosen, rejected), in the autograd graph."""
    return pair_logps_and_tokens(model, batch)[0]


def pair_logps_and_tokens(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``pair_logps``, and each answer's trained-token count, [pairs, 2]."""
    index, sums, counts = example_losses(model, batch, direct=True)
    pairs = len(batch["pairs"])
    if len(index) != 2 * pairs:
        raise ValueError("every answer of a pair needs a trained token")
    return -sums.view(pairs, 2), counts.view(pairs, 2).to(sums.dtype)


def _key(item: dict) -> tuple:
    return tuple(item["chosen"]["input_ids"]), tuple(item["rejected"]["input_ids"])


def _snapshot(model) -> tuple:
    # Every in-place change of a parameter (an optimizer step, a loaded checkpoint) bumps its
    # version counter; a parameter added or replaced changes the ids.
    return tuple((id(p), p._version) for p in model.parameters())


class PrecomputedReference:
    """Reference log-probabilities of pairs, by their token ids: for methods with no adapter to
    disable, and for a child's parent (``start``), which no disabled adapter gives.

    ``base`` is the reference model as it is now: the model as ``load_model`` returned it, or a
    child's model with its parent's weights. While it is unchanged it scores every pair the run knows
    of, at once (before the first step changes it, or while it is kept unchanged beside another
    model); afterwards a pair not yet scored is scored by a fresh copy of it, loaded by ``reload``.
    ``start``: what the reference is, when it is not the base (``"parent RUN"``); such a reference is
    used even where the policy has an adapter to disable.
    """

    def __init__(self, base, reload, known, start: str | None = None):
        self.base = weakref.ref(base)
        self.snapshot = _snapshot(base)
        self.reload = reload
        self.known = known  # () -> every pair item the run prepared
        self.start = start
        self.logps: dict[tuple, torch.Tensor] = {}

    @property
    def describe(self) -> str:
        """What the reference is, as a run records it: ``base`` or ``parent RUN``."""
        return self.start or "base"

    def base_unchanged(self, model) -> bool:
        return self.base() is model and _snapshot(model) == self.snapshot

    def __call__(self, model, items: list[dict], pad_id: int, batch_tokens: int) -> torch.Tensor:
        missing = [item for item in items if _key(item) not in self.logps]
        if missing:
            base = self.base()
            if base is not None and _snapshot(base) == self.snapshot:
                # The base as loaded and unchanged: the model asking (before full fine-tuning's first
                # step), or one kept beside a tuned model that is scored against it (retrain's gate).
                self._score(base, [*missing, *self.known()], pad_id, batch_tokens)
            else:
                fresh = self.reload()
                self._score(fresh.to(next(model.parameters()).device), missing, pad_id, batch_tokens)
                del fresh
        return torch.stack([self.logps[_key(item)] for item in items])

    def score_known(self, pad_id: int, batch_tokens: int) -> None:
        """Score every pair the run knows of now, by the reference model as it is."""
        self._score(self.base(), self.known(), pad_id, batch_tokens)

    @torch.no_grad()
    def _score(self, model, items: list[dict], pad_id: int, batch_tokens: int) -> None:
        was_training = model.training
        model.eval()
        todo = list({_key(i): i for i in items if _key(i) not in self.logps}.values())
        view = PairBatches(todo, Layout(batch_tokens, 0, pad_id, 0), reference=None)
        for rows in view.epoch(-1):
            logps = pair_logps(model, to_device(view.tensors(rows), model)).cpu()
            for i, lp in zip(rows, logps):
                self.logps[_key(todo[i])] = lp
        model.train(was_training)


def reference_logps(model, batch: dict[str, torch.Tensor], items: list[dict], policy: torch.Tensor,
                    precomputed: PrecomputedReference | None, layout: Layout) -> torch.Tensor:
    """The reference's [pairs, 2] log-probabilities, without gradients."""
    if hasattr(model, "disable_adapter") and not (precomputed and precomputed.start):
        was_training = model.training
        model.eval()  # the reference is deterministic: no dropout
        with torch.no_grad(), model.disable_adapter():
            reference = pair_logps(model, batch)
        model.train(was_training)
        return reference
    if precomputed is None:
        raise TunesmithError("objective dpo: no reference model (load the model through the objective)")
    if not torch.is_grad_enabled() and precomputed.base_unchanged(model):
        return policy.detach()  # the base model scored as it is: it is its own reference
    return precomputed(model, items, layout.pad_id, layout.batch_tokens).to(policy.device)


class PairBatches:
    """Preference pairs as the loop sees them: one pair per row, rows grouped by length; the loss
    and ``trained_tokens`` count pairs."""

    def __init__(self, items: list[dict], layout: Layout, reference: PrecomputedReference | None,
                 options: Options | None = None):
        self.items = items
        self.layout = layout
        self.reference = reference
        self.options = options or Options()

    def epoch(self, epoch: int) -> list[list[int]]:
        lengths = [len(i["chosen"]["input_ids"]) + len(i["rejected"]["input_ids"]) for i in self.items]
        return length_grouped(lengths, self.layout.batch_tokens, None if epoch < 0 else self.layout.seed + epoch)

    def tensors(self, rows: list[int]) -> dict[str, torch.Tensor]:
        batch = stack_rows([pair_row(self.items[i], self.layout.pad_id) for i in rows], self.layout.pad_id)
        batch["pairs"] = torch.tensor(rows)
        return batch

    def logps(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy (with gradients) and reference log-probabilities, [pairs, 2] each."""
        policy = pair_logps(model, batch)
        items = [self.items[i] for i in batch["pairs"].tolist()]
        return policy, reference_logps(model, batch, items, policy, self.reference, self.layout)

    def pair_losses(self, model, batch) -> torch.Tensor:
        return self._losses(*self._scored(model, batch))

    def _scored(self, model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Policy log-probabilities, token counts and (for a loss that has one) the reference's."""
        if self.options.reference_free:
            return *pair_logps_and_tokens(model, batch), None
        policy, tokens = pair_logps_and_tokens(model, batch)
        items = [self.items[i] for i in batch["pairs"].tolist()]
        return policy, tokens, reference_logps(model, batch, items, policy, self.reference, self.layout)

    def _losses(self, policy, tokens, reference) -> torch.Tensor:
        o = self.options
        if reference is None:
            return REFERENCE_FREE[o.loss](policy[:, 0], policy[:, 1], tokens[:, 0], tokens[:, 1], o.beta, o.gamma)
        return LOSSES[o.loss](policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], o.beta,
                              o.label_smoothing)

    def loss(self, model, batch) -> torch.Tensor:
        return self.pair_losses(model, batch).sum()

    def example_losses(self, model, batch):
        losses = self.pair_losses(model, batch)
        return batch["pairs"], losses, torch.ones_like(batch["pairs"])

    @staticmethod
    def trained_tokens(batch) -> int:
        return len(batch["pairs"])

    @staticmethod
    def input_tokens(batch) -> int:
        return int((batch["seq_ids"] != -1).sum())

    @torch.no_grad()
    def loss_totals(self, model, items: list[dict]) -> tuple[float, int]:
        figures = self.figures(model, items)
        return figures["loss"] * len(items), len(items)

    def figures(self, model, items: list[dict]) -> dict[str, float]:
        """Mean loss, reward accuracy and margin, and the mean log-ratios of chosen and rejected (with
        a reference-free loss, whose reward is ``beta`` times the mean per-token log-probability, the
        mean per-token log-probabilities instead)."""
        view = self if items is self.items else PairBatches(items, self.layout, self.reference, self.options)
        return self.figures_of(view.row_scores(model, view.epoch(-1)))

    @torch.no_grad()
    def row_scores(self, model, batches: list[list[int]]) -> dict[str, torch.Tensor]:
        """Per pair of ``batches`` (of ``epoch(-1)``, in their order): its loss, and the log-ratios of
        chosen and rejected ([pairs, 2]; mean per-token log-probabilities with a reference-free loss),
        on the CPU."""
        was_training = model.training
        model.eval()
        losses, ratios = [], []
        for rows in batches:
            policy, tokens, reference = self._scored(model, to_device(self.tensors(rows), model))
            losses.append(self._losses(policy, tokens, reference).cpu())
            ratios.append((policy / tokens if reference is None else policy - reference).cpu())
        model.train(was_training)
        return {"loss": torch.cat(losses), "ratio": torch.cat(ratios)}

    def figures_of(self, scores: dict[str, torch.Tensor]) -> dict[str, float]:
        """``figures`` from the ``row_scores`` of every pair, in any order."""
        ratio = scores["ratio"]
        rewards = self.options.beta * ratio
        kind = "logp" if self.options.reference_free else "logratio"
        return {"loss": float(scores["loss"].mean()),
                "accuracy": float((rewards[:, 0] > rewards[:, 1]).float().mean()),
                "reward_margin": float((rewards[:, 0] - rewards[:, 1]).mean()),
                f"chosen_{kind}": float(ratio[:, 0].mean()),
                f"rejected_{kind}": float(ratio[:, 1].mean())}


class Policy:
    """What dpo and kto share: a causal LM trained against a reference, the model training starts
    from (the base, or a child's parent: ``start_from``). The prompt encoder, the reference where it
    is precomputed (``PrecomputedReference``, over the pairs ``known`` gives), and the causal
    objective's generation for samples and answers."""

    def __init__(self, data: DataConfig, tokenizer, layout: Layout):
        self.encoder = Encoder(tokenizer, data.template, data.system_prompt, data.max_length)
        # Generation (samples, `tunesmith generate`) is the causal LM's.
        self.causal = Causal(CausalOptions(), data, tokenizer, layout)
        self.layout = layout
        self.reference: PrecomputedReference | None = None
        self.known = list  # () -> every pair item the run prepared, once the model is loaded

    def load_model(self, source: str, dtype: str, known, **kwargs):
        def load() -> torch.nn.Module:
            return load_model(source, "AutoModelForCausalLM", dtype, **kwargs)

        model = load()
        self.known = known
        # A child's reference is its parent's, whatever base models are loaded after it (the parent's
        # own load, the model rebuilt whole after sharded training).
        if self.reference is None or not self.reference.start:
            self.reference = PrecomputedReference(model, load, known)
        return model

    def start_from(self, model, reload, start: str) -> None:
        """Make ``model`` as it is now (a child with its parent's weights, before the first step) the
        reference, named ``start`` (``"parent RUN"``): every known pair is scored by it at once;
        ``reload`` gives a fresh copy of it for pairs first seen later."""
        self.reference = PrecomputedReference(model, reload, self.known, start)
        self.reference.score_known(self.layout.pad_id, self.layout.batch_tokens)

    @torch.no_grad()
    def samples(self, model, examples: list[dict], expected, max_new_tokens: int) -> list[dict]:
        """Greedy answers to held-out prompts, beside ``expected(example)``."""
        was_training = model.training
        model.eval()
        out = [{"prompt": ex["messages"][-1]["content"], "expected": expected(ex),
                "output": self.causal._generate(model, self.encoder.prompt_text(ex), max_new_tokens).strip()}
               for ex in examples]
        model.train(was_training)
        return out

    def answer(self, model, prompt: str, max_new_tokens: int, stream: bool = False) -> str:
        return self.causal.answer(model, prompt, [], max_new_tokens, stream)


def encoded_items(prepared: PreparedData | None) -> list[dict]:
    """Every encoded item of every split (what a precomputed reference may be asked about)."""
    return [i for name in SPLITS for i in prepared.encoded[name]] if prepared else []


class PolicyObjective:
    """What the dpo and kto objectives (dataclasses with ``data``, ``tokenizer`` and ``layout``) share
    around their ``Policy``: building it, the reference it holds, a child's start from its parent,
    and answers."""

    def __post_init__(self):
        self.policy = Policy(self.data, self.tokenizer, self.layout)
        self.encoder = self.policy.encoder
        self.prepared: PreparedData | None = None

    @property
    def reference(self) -> PrecomputedReference | None:
        return self.policy.reference

    def start_from(self, model, reload, start: str) -> None:
        """Train against ``model`` as it is now, a child's parent (``Policy.start_from``)."""
        self.policy.start_from(model, reload, start)

    def answer(self, model, prompt: str, labels: list[str], max_new_tokens: int, stream: bool = False) -> str:
        return self.policy.answer(model, prompt, max_new_tokens, stream)

    def answers(self, model, prompts: list[str], labels: list[str], max_new_tokens: int) -> list[str]:
        """``answer`` to several prompts as one greedy batch (the causal LM's, ``tunesmith predict``)."""
        return self.policy.causal.answers(model, prompts, [], max_new_tokens)


@dataclass
class DPO(PolicyObjective):
    name: ClassVar[str] = "dpo"
    Options: ClassVar[type[Section]] = Options
    abilities: ClassVar[Abilities] = Abilities(
        head=CAUSAL_LM, data=("preference",), metrics=("loss", "accuracy", "reward_margin"),
        writes_answers=True, batched_answers=True, reference=True, rows_scored=True)
    options: Options
    data: DataConfig
    tokenizer: Any
    layout: Layout

    @classmethod
    def check_method(cls, method) -> list[str]:
        if not (method.packs and method.direct_decoder):
            return [f"method.name: {method.name} cannot train objective dpo: a pair's two answers share one row "
                    "after its prompt (use lora, qlora, ia3, adapter or full)"]
        return []

    def prepare(self, labels: list[str] | None = None) -> PreparedData:  # preference data has no labels
        splits, schema, stats = load_splits(self.data)
        if schema.kind != "preference":
            raise TunesmithError(f"objective {self.name} needs preference data (prompt, chosen, rejected), but the "
                                 f"data is {schema.kind}: name the columns under data.columns.chosen / .rejected")
        encoded, stats["tokens"] = {}, {}
        for name in SPLITS:
            es = EncodeStats()
            encoded[name], splits[name] = encode_pairs(splits[name], self.encoder, es)
            stats["tokens"][name] = _token_summary(es)
        self.prepared = PreparedData(schema, splits, encoded, [], stats)
        return self.prepared

    def load_model(self, source: str, dtype: str, labels: list[str], **kwargs):
        return self.policy.load_model(source, dtype, lambda: encoded_items(self.prepared), **kwargs)

    def batches(self, items: list[dict]) -> PairBatches:
        return PairBatches(items, self.layout, self.reference, self.options)

    def evaluate(self, model, examples: list[dict], encoded: list[dict], labels: list[str]) -> dict:
        """``loss``; ``accuracy``: the pairs whose implicit reward ranks the chosen answer first;
        ``reward_margin``; the mean log-ratios of policy to reference, chosen and rejected."""
        return self.batches(encoded).figures(model, encoded)

    def samples(self, model, examples: list[dict], labels: list[str], max_new_tokens: int) -> list[dict]:
        return self.policy.samples(model, examples, lambda ex: ex["chosen"], max_new_tokens)


