"""Reward model: a scalar head on a decoder or an encoder, trained on preference pairs so that the
chosen answer scores above the rejected one (Bradley-Terry: ``-log sigmoid(r_chosen - r_rejected -
margin)``), with optional reward centring (``center * (r_chosen + r_rejected)^2``, which keeps the
scores near zero: a reward's offset is otherwise arbitrary).

A decoder's score is read at each text's last real token, found from the attention mask: never at
padding, even when the padding token is the end-of-turn token that ends every answer. An encoder's
is its pooled first token, as ``AutoModelForSequenceClassification`` computes it.

``score_texts`` is the one way a reward model scores texts: training, evaluation, ``tunesmith
score`` and PPO's rewards all go through it, on texts made by ``reward_text``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from tunesmith.data.batching import length_grouped, pad
from tunesmith.data.format import EncodeStats
from tunesmith.data.options import DataConfig
from tunesmith.data.pipeline import SPLITS, PreparedData, load_splits
from tunesmith.errors import TunesmithError
from tunesmith.model import load_model, unwrap
from tunesmith.objectives.base import REWARD, Abilities, Layout, to_device
from tunesmith.objectives.causal import _token_summary
from tunesmith.objectives.padded import prompt_learning_is_causal_only, refuse_canaries
from tunesmith.options import Section


class Options(Section):
    name: Literal["reward"] = "reward"
    center: float = Field(0.0, ge=0, description="Reward centring: the weight of the mean squared sum of a "
                          "pair's two rewards in the loss (0.01 is common); 0 leaves the offset free.")


def reward_text(tokenizer, messages: list[dict], answer: str, template: str = "chat",
                system_prompt: str | None = None) -> str:
    """The text a reward model reads for ``answer`` to the prompt ``messages``: the conversation
    through the tokenizer's chat template, or (``template: plain``, or a tokenizer without one, as
    encoders have) the contents one per line."""
    if system_prompt is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    conversation = [*messages, {"role": "assistant", "content": answer}]
    if template == "chat" and tokenizer.chat_template:
        return tokenizer.apply_chat_template(conversation, tokenize=False)
    return "\n".join(m["content"] for m in conversation)


def rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The score of every right-padded row, [rows], in the autograd graph."""
    inner = unwrap(model)
    head = getattr(inner, "score", None)
    if head is None:  # an encoder: its classifier reads the pooled first token
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
    decoder = getattr(inner, inner.base_model_prefix)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    last = attention_mask.sum(1) - 1
    return head(hidden[torch.arange(len(last), device=last.device), last]).float()[:, 0]


@torch.no_grad()
def score_texts(model, tokenizer, texts: list[str], batch_size: int = 16, max_length: int = 512) -> list[float]:
    """The reward of each text (made by ``reward_text``), in order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    scores = [0.0] * len(texts)
    order = sorted(range(len(texts)), key=lambda i: -len(ids[i]))  # similar lengths pad little
    for b in range(0, len(order), batch_size):
        rows = order[b : b + batch_size]
        input_ids = pad([ids[i] for i in rows], tokenizer.pad_token_id).to(device)
        mask = pad([[1] * len(ids[i]) for i in rows], 0).to(device)
        for i, s in zip(rows, rewards(model, input_ids, mask).tolist()):
            scores[i] = s
    model.train(was_training)
    return scores


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       center: float = 0.0) -> torch.Tensor:
    """Per pair: ``-log sigmoid(chosen - rejected - margin) + center * (chosen + rejected)^2``."""
    diff = chosen - rejected - (margin if margin is not None else 0)
    return -F.logsigmoid(diff) + center * (chosen + rejected) ** 2


class RewardBatches:
    """Pairs as padded rows, chosen then rejected for each pair; the loss counts pairs."""

    def __init__(self, items: list[dict], layout: Layout, options: Options):
        self.items = items
        self.layout = layout
        self.options = options

    def epoch(self, epoch: int) -> list[list[int]]:
        lengths = [2 * max(len(i["chosen"]), len(i["rejected"])) for i in self.items]
        return length_grouped(lengths, self.layout.batch_tokens, None if epoch < 0 else self.layout.seed + epoch)

    def tensors(self, rows: list[int]) -> dict[str, torch.Tensor]:
        seqs = [self.items[i][k] for i in rows for k in ("chosen", "rejected")]
        return {"input_ids": pad(seqs, self.layout.pad_id), "attention_mask": pad([[1] * len(s) for s in seqs], 0),
                "pairs": torch.tensor(rows),
                "margin": torch.tensor([float(self.items[i].get("margin", 0.0)) for i in rows])}

    def scores(self, model, batch) -> torch.Tensor:
        """[pairs, 2]: the chosen and the rejected answer's reward."""
        return rewards(model, batch["input_ids"], batch["attention_mask"]).view(-1, 2)

    def pair_losses(self, model, batch) -> torch.Tensor:
        r = self.scores(model, batch)
        return bradley_terry_loss(r[:, 0], r[:, 1], batch["margin"], self.options.center)

    def loss(self, model, batch) -> torch.Tensor:
        return self.pair_losses(model, batch).sum()

    def example_losses(self, model, batch):
        return batch["pairs"], self.pair_losses(model, batch), torch.ones_like(batch["pairs"])

    @staticmethod
    def trained_tokens(batch) -> int:
        return len(batch["pairs"])

    @staticmethod
    def input_tokens(batch) -> int:
        return int(batch["attention_mask"].sum())

    def figures(self, model, items: list[dict]) -> dict[str, float]:
        view = self if items is self.items else RewardBatches(items, self.layout, self.options)
        return self.figures_of(view.row_scores(model, view.epoch(-1)))

    @torch.no_grad()
    def row_scores(self, model, batches: list[list[int]]) -> dict[str, torch.Tensor]:
        """Per pair of ``batches`` (of ``epoch(-1)``, in their order): its loss and the scores of
        chosen and rejected ([pairs, 2]), on the CPU."""
        was_training = model.training
        model.eval()
        losses, scores = [], []
        for rows in batches:
            batch = to_device(self.tensors(rows), model)
            r = self.scores(model, batch)
            losses.append(bradley_terry_loss(r[:, 0], r[:, 1], batch["margin"], self.options.center).cpu())
            scores.append(r.cpu())
        model.train(was_training)
        return {"loss": torch.cat(losses), "scores": torch.cat(scores)}

    @staticmethod
    def figures_of(scores: dict[str, torch.Tensor]) -> dict[str, float]:
        """``figures`` from the ``row_scores`` of every pair, in any order."""
        r = scores["scores"]
        return {"loss": float(scores["loss"].mean()), "accuracy": float((r[:, 0] > r[:, 1]).float().mean()),
                "reward_margin": float((r[:, 0] - r[:, 1]).mean()), "reward_mean": float(r.mean())}

    def loss_totals(self, model, items: list[dict]) -> tuple[float, int]:
        return self.figures(model, items)["loss"] * len(items), len(items)


@dataclass
class Reward:
    name: ClassVar[str] = "reward"
    Options: ClassVar[type[Section]] = Options
    # Gated on pairwise accuracy: a reward model is used to rank answers (PPO, the judge), and its
    # loss also moves with the scale of its scores.
    abilities: ClassVar[Abilities] = Abilities(
        head=REWARD, data=("preference",), metrics=("loss", "accuracy", "reward_margin"),
        scores="reward", rows_scored=True, gate_metric="accuracy")
    options: Options
    data: DataConfig
    tokenizer: Any
    layout: Layout

    @classmethod
    def check_method(cls, method) -> list[str]:
        return prompt_learning_is_causal_only(cls.name, method)

    def text(self, messages: list[dict], answer: str) -> str:
        return reward_text(self.tokenizer, messages, answer, self.data.template, self.data.system_prompt)

    def _ids(self, text: str) -> tuple[list[int], int]:
        """The text's token ids, cut at ``data.max_length`` as the tokenizer cuts (keeping its closing
        special tokens), and its length before the cut."""
        ids = self.tokenizer(text)["input_ids"]
        if len(ids) <= self.data.max_length:
            return ids, len(ids)
        return self.tokenizer(text, truncation=True, max_length=self.data.max_length)["input_ids"], len(ids)

    def _encode(self, examples: list[dict]) -> tuple[list[dict], dict]:
        """The pairs' token ids, and their token statistics: a pair's length is its longer text's, and
        it is truncated when either text is (the cut falls in the answers)."""
        stats, identical, encoded = EncodeStats(examples=len(examples)), 0, []
        for e in examples:
            (chosen, n_chosen), (rejected, n_rejected) = (self._ids(self.text(e["messages"], e[k]))
                                                          for k in ("chosen", "rejected"))
            stats.lengths.append(max(n_chosen, n_rejected))
            stats.truncated += max(n_chosen, n_rejected) > self.data.max_length
            stats.completion_tokens_lost += n_chosen - len(chosen) + n_rejected - len(rejected)
            # Answers that differ only beyond max_length: the same text scored twice, nothing to rank.
            identical += chosen == rejected
            encoded.append({"chosen": chosen, "rejected": rejected,
                            **({"margin": e["margin"]} if "margin" in e else {})})
        return encoded, {**_token_summary(stats), "identical_after_truncation": identical}

    def prepare(self, labels: list[str] | None = None) -> PreparedData:  # preference data has no labels
        refuse_canaries(self.name, self.data)
        splits, schema, stats = load_splits(self.data)
        if schema.kind != "preference":
            raise TunesmithError(f"objective {self.name} needs preference data (prompt, chosen, rejected), but the "
                                 f"data is {schema.kind}: name the columns under data.columns.chosen / .rejected")
        encoded, stats["tokens"] = {}, {}
        for name in SPLITS:
            encoded[name], stats["tokens"][name] = self._encode(splits[name])
        return PreparedData(schema, splits, encoded, [], stats)

    def load_model(self, source: str, dtype: str, labels: list[str], **kwargs):
        model = load_model(source, "AutoModelForSequenceClassification", dtype, num_labels=1, **kwargs)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = model.config.eos_token_id
        return model

    def batches(self, items: list[dict]) -> RewardBatches:
        return RewardBatches(items, self.layout, self.options)

    def evaluate(self, model, examples: list[dict], encoded: list[dict], labels: list[str]) -> dict:
        """``loss``; ``accuracy``: held-out pairs whose chosen answer scores higher; ``reward_margin``:
        the mean score of chosen minus rejected; ``reward_mean``."""
        return self.batches(encoded).figures(model, encoded)

    def samples(self, model, examples: list[dict], labels: list[str], max_new_tokens: int) -> list[dict]:
        out = []
        for e in examples:
            chosen, rejected = score_texts(model, self.tokenizer, [self.text(e["messages"], e["chosen"]),
                                                                   self.text(e["messages"], e["rejected"])],
                                           max_length=self.data.max_length)
            out.append({"prompt": e["messages"][-1]["content"], "expected": f"chosen: {e['chosen']}",
                        "output": f"reward chosen {chosen:.3f}, rejected {rejected:.3f}"})
        return out

    def answer(self, model, prompt: str, labels: list[str], max_new_tokens: int, stream: bool = False) -> str:
        """The reward of ``prompt`` read as a whole text (``tunesmith score`` frames prompt and answer)."""
        score = f"{score_texts(model, self.tokenizer, [prompt], max_length=self.data.max_length)[0]:.4f}"
        if stream:
            print(score)
        return score
