"""What every command that works on a run assembles from its config: the method, the tokenizer,
the objective with its batch layout, and (after ``prepare``) the data."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from itertools import zip_longest

from tunesmith.config import RunConfig
from tunesmith.data.pipeline import PreparedData
from tunesmith.errors import TunesmithError
from tunesmith.eval.decision import Decision, fit_decision
from tunesmith.methods import get_method
from tunesmith.model import load_tokenizer, model_origin
from tunesmith.objectives import get_objective
from tunesmith.objectives.base import Layout


class Session:
    def __init__(self, config: RunConfig):
        self.config = config
        self.method = get_method(config.method.name)
        # The method and the objective were checked together by config validation (``validate_config``).
        objective = get_objective(config.objective.name)
        self.origin = model_origin(config.model.name)
        self.model_source = self.origin.loaded_from
        self.tokenizer = load_tokenizer(self.model_source)
        self.layout = Layout(
            batch_tokens=max(config.train.batch_tokens, config.data.max_length),
            row_len=config.data.max_length,
            pad_id=self.tokenizer.pad_token_id,
            seed=config.train.seed,
            # Rows of one example when packing is off, or for methods that cannot pack (prompt learning).
            one_per_row=not (config.train.packing and self.method.packs),
            direct=self.method.direct_decoder,
            shared_prefix=config.train.shared_prefix,
        )
        self.objective = objective(config.objective, config.data, self.tokenizer, self.layout)
        self.data: PreparedData | None = None
        self.decision: Decision | None = None  # the tuned model's rule (eval.decision); None: argmax

    def prepare(self, labels: list[str] | None = None) -> PreparedData:
        """Read, split and encode the data (all input problems surface here).

        ``labels``: a trained run's labels (``Run.labels()``), when its model scores this data: the
        data is encoded and scored by the model's label order, whichever of the labels it holds.
        """
        self.data = self.objective.prepare(labels)
        return self.data

    def load_model(self, labels: list[str]):
        """The base model, with the objective's head, loaded as the method needs it."""
        kwargs = self.method.load_kwargs(self.config.method)
        return self.objective.load_model(self.model_source, self.config.model.dtype, labels, **kwargs)

    def test_set(self) -> tuple[list[dict], list[dict]]:
        """The held-out examples scored: the test split (validation where there is none), capped."""
        n = self.config.eval.max_examples
        split = "test" if self.data.examples["test"] else "validation"
        return self.data.examples[split][:n], self.data.encoded[split][:n]

    def _held_out(self) -> tuple[list[dict], list[dict]]:
        examples, encoded = self.test_set()
        if not examples:
            raise TunesmithError("data: no test or validation rows to evaluate on")
        return examples, encoded

    def score(self, model) -> dict:
        if self.config.data.sources:
            return self.score_sources(model)
        examples, encoded = self._held_out()
        return self.objective.evaluate(model, examples, encoded, self.data.labels)

    def score_report(self, model) -> tuple[dict, dict | None]:
        """``score``'s metrics and, for an objective that scores labels on label data, the
        classification report (``eval.classification``) from the same forward passes; else None."""
        if self.config.data.sources or not self.data.labels or not hasattr(self.objective, "label_scores"):
            return self.score(model), None
        examples, encoded = self._held_out()
        scores = self.objective.label_scores(model, examples, encoded, self.data.labels)
        if self.decision is not None:
            labels, decision = self.data.labels, self.decision
            scores = replace(scores, decide=lambda p: decision.choose(p, labels))
        return scores.metrics(examples, self.data.labels), scores.report(examples, self.data.labels)

    def check_decision(self) -> None:
        """Whether ``eval.decision`` can be chosen on this data, said before anything is written."""
        rule = self.config.eval.decision
        if rule == "argmax":
            return
        if self.config.data.sources or not self.data.labels or not hasattr(self.objective, "label_scores"):
            raise TunesmithError(f"eval.decision: {rule} chooses among labels: it needs label data (data.format "
                                 "classification) and an objective that scores labels")
        if not self.data.examples["validation"]:
            raise TunesmithError(f"eval.decision: {rule} is chosen on the validation split, which is empty "
                                 "(give data.split.validation or data.validation)")

    def choose_decision(self, model) -> Decision | None:
        """``eval.decision`` chosen on the validation split (at most ``eval.max_examples`` rows) with the
        tuned ``model``'s label probabilities; kept for ``score_report``. None for argmax."""
        rule = self.config.eval.decision
        if rule == "argmax":
            return None
        n = self.config.eval.max_examples
        examples, encoded = self.data.examples["validation"][:n], self.data.encoded["validation"][:n]
        scores = self.objective.label_scores(model, examples, encoded, self.data.labels)
        self.decision = fit_decision(rule, self.config.eval.decision_metric, scores.probabilities,
                                     [e["label"] for e in examples], self.data.labels,
                                     self.data.stats["labels"]["train"])
        return self.decision

    def samples(self, model) -> list[dict]:
        examples = self.test_set()[0]
        if self.config.data.sources:
            # Taken in turn from each source's own held-out rows (as score_sources scores them): the
            # capped test set may hold the first source's rows only.
            split = "test" if self.data.examples["test"] else "validation"
            held_out = self.data.examples[split]
            by_source = [[e for e in held_out if e["_source"] == name] for name in self.data.stats["sources"]]
            examples = [e for group in zip_longest(*by_source) for e in group if e is not None]
        examples = examples[: self.config.eval.samples]
        return self.objective.samples(model, examples, self.data.labels, self.config.eval.max_new_tokens)

    def score_sources(self, model, split: str | None = None) -> dict:
        """Mixed data: each source scored on its own held-out rows (``split``; default test, else
        validation), as ``SOURCE/metric``; label sources are scored against their own labels."""
        split = split or ("test" if self.data.examples["test"] else "validation")
        n = self.config.eval.max_examples
        metrics = {}
        for name, source in self.data.stats["sources"].items():
            examples = [e for e in self.data.examples[split] if e["_source"] == name][:n]
            encoded = [e for e in self.data.encoded[split] if e["_source"] == name][:n]
            if not encoded:
                continue
            labels = source["labels"] if source["format"] == "classification" else []
            for metric, value in self.objective.evaluate(model, examples, encoded, labels).items():
                metrics[f"{name}/{metric}"] = value
        if not metrics:
            raise TunesmithError("data: no test or validation rows to evaluate on")
        return metrics


@contextmanager
def base_model(session: Session, model, labels: list[str]):
    """The base of a tuned model: the same model with its adapters disabled (PEFT methods), or a
    fresh copy of the base (full fine-tuning, our adapters)."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
    else:
        yield session.load_model(labels)
