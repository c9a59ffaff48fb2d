"""What every command that works on a run assembles from its config: the method, the tokenizer,
the objective with its batch layout, and (after ``prepare``) the data."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from dataclasses import replace
from itertools import zip_longest

import torch

from tunesmith.config import RunConfig
from tunesmith.data.pipeline import PreparedData
from tunesmith.errors import TunesmithError
from tunesmith.eval.classification import LabelScores
from tunesmith.eval.decision import Decision, fit_decision
from tunesmith.eval.metrics import label_metrics, loss_metrics
from tunesmith.methods import get_method
from tunesmith.model import load_tokenizer, model_origin
from tunesmith.objectives import get_objective
from tunesmith.objectives.base import Layout
from tunesmith.store.run import Run
from tunesmith.train import distributed


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

    # Several processes: every process calls ``score``, ``score_report``, ``choose_decision`` and
    # ``samples`` with ``processes`` (accelerate's state). Samples, and the scores of an objective that
    # scores labels, sums its held-out loss (``loss_scored``) or computes its figures from per-row
    # scores (``rows_scored``), are computed a share of the rows on each process and gathered (for
    # mixed data, source by source), giving the figures of one process; other scores are the main
    # process's alone. The main process gets the results, the others None.

    def scoring_processes(self, processes=None) -> int:
        """How many processes score the held-out rows (``score``): all of them where the objective's
        figures join share by share (``_splits``; for mixed data, every source's), else the main
        process alone."""
        if self.config.data.sources:
            label_sets = [s["labels"] if s["format"] == "classification" else []
                          for s in self.data.stats["sources"].values()]
        else:
            label_sets = [self.data.labels]
        split = all(self._splits(labels) for labels in label_sets)
        return processes.num_processes if processes is not None and split else 1

    def _scores_labels(self) -> bool:
        return not self.config.data.sources and bool(self.data.labels) and self.objective.abilities.scores_labels

    def _splits(self, labels: list[str]) -> bool:
        """Whether the figures of rows with ``labels`` join share by share (``_scored``)."""
        can = self.objective.abilities
        return (bool(labels) and can.scores_labels) or can.rows_scored or can.loss_scored

    def _label_scores(self, model, examples: list[dict], encoded: list[dict], processes=None,
                      labels: list[str] | None = None) -> LabelScores:
        """``label_scores`` of these rows (against ``labels``, the data's by default), each process
        scoring its share when there are several."""
        labels = self.data.labels if labels is None else labels
        if processes is None or processes.num_processes == 1:
            return self.objective.label_scores(model, examples, encoded, labels)
        parts = distributed.scored_in_shares(
            lambda rows: self.objective.label_scores(model, [examples[i] for i in rows], [encoded[i] for i in rows],
                                                     labels), list(range(len(examples))), processes)
        return LabelScores.joined([p for p in parts if p is not None])

    def score(self, model, processes=None) -> dict | None:
        if self.config.data.sources:
            return self.score_sources(model, processes=processes)
        examples, encoded = self._held_out()
        return self._scored(model, examples, encoded, self.data.labels, processes)

    def _scored(self, model, examples: list[dict], encoded: list[dict], labels: list[str],
                processes=None) -> dict | None:
        """The objective's ``evaluate`` of these rows, for the main process (the others get None).
        On several processes, each scores a share where the figures join (``_splits``): label
        scores, the summed loss (and the labels chosen, ``choices``), or per-row scores of whole
        batches (``rows_scored``, so that every row is scored beside the rows it is with on one
        process); other figures are the main process's alone."""
        objective = self.objective
        main = processes is None or processes.is_main_process
        if processes is None or not self._splits(labels):
            return objective.evaluate(model, examples, encoded, labels) if main else None
        if labels and objective.abilities.scores_labels:
            scores = self._label_scores(model, examples, encoded, processes, labels)
            return scores.metrics(examples, labels) if main else None
        if objective.abilities.rows_scored:
            batches = objective.batches(encoded)
            parts = [p for p in distributed.scored_in_shares(lambda share: batches.row_scores(model, share),
                                                             batches.epoch(-1), processes) if p is not None]
            return batches.figures_of({k: torch.cat([p[k] for p in parts]) for k in parts[0]}) if main else None

        def totals(rows: list[int]) -> tuple[float, int, list[str]]:
            share = [encoded[i] for i in rows]
            total, count = objective.batches(share).loss_totals(model, share)
            return total, count, objective.choices(model, [examples[i] for i in rows], labels) if labels else []

        parts = [p for p in distributed.scored_in_shares(totals, list(range(len(encoded))), processes) if p is not None]
        if not main:
            return None
        loss = sum(p[0] for p in parts) / max(sum(p[1] for p in parts), 1)
        if not labels:
            return loss_metrics(loss)
        return label_metrics(loss, [e["label"] for e in examples], [c for p in parts for c in p[2]], labels)

    def score_report(self, model, processes=None) -> tuple[dict | None, dict | None]:
        """``score``'s metrics and, for an objective that scores labels on label data, the
        classification report (``eval.classification``) from the same forward passes; else None."""
        if not self._scores_labels():
            return self.score(model, processes), None
        examples, encoded = self._held_out()
        scores = self._label_scores(model, examples, encoded, processes)
        if processes is not None and not processes.is_main_process:
            return None, None
        if self.decision is not None:
            labels, decision = self.data.labels, self.decision
            scores = replace(scores, decide=lambda p: decision.choose(p, labels))
        return scores.metrics(examples, self.data.labels), scores.report(examples, self.data.labels)

    def check_decision(self) -> None:
        """Whether ``eval.decision`` can be chosen on this data, said before anything is written (that
        the objective scores labels, config validation says: ``config.NEEDS``)."""
        rule = self.config.eval.decision
        if rule == "argmax":
            return
        if not self._scores_labels():
            raise TunesmithError(f"eval.decision: {rule} chooses among labels: it needs label data (data.format "
                                 "classification), from one source")
        if not self.data.examples["validation"]:
            raise TunesmithError(f"eval.decision: {rule} is chosen on the validation split, which is empty "
                                 "(give data.split.validation or data.validation)")

    def choose_decision(self, model, processes=None) -> Decision | None:
        """``eval.decision`` chosen on the validation split (at most ``eval.max_examples`` rows) with the
        tuned ``model``'s label probabilities; kept for ``score_report``. None for argmax."""
        rule = self.config.eval.decision
        if rule == "argmax":
            return None
        n = self.config.eval.max_examples
        examples, encoded = self.data.examples["validation"][:n], self.data.encoded["validation"][:n]
        scores = self._label_scores(model, examples, encoded, processes)
        self.decision = fit_decision(rule, self.config.eval.decision_metric, scores.probabilities,
                                     [e["label"] for e in examples], self.data.labels,
                                     self.data.stats["labels"]["train"])
        return self.decision

    def samples(self, model, processes=None) -> list[dict] | None:
        examples = self.test_set()[0]
        if self.config.data.sources:
            # Taken in turn from each source's own held-out rows (as score_sources scores them): the
            # capped test set may hold the first source's rows only.
            split = "test" if self.data.examples["test"] else "validation"
            held_out = self.data.examples[split]
            by_source = [[e for e in held_out if e["_source"] == name] for name in self.data.stats["sources"]]
            examples = [e for group in zip_longest(*by_source) for e in group if e is not None]
        examples = examples[: self.config.eval.samples]

        def answers(rows: list[dict]) -> list[dict]:
            return self.objective.samples(model, rows, self.data.labels, self.config.eval.max_new_tokens)

        if processes is None or processes.num_processes == 1:
            return answers(examples)
        parts = distributed.scored_in_shares(answers, examples, processes)
        return [s for part in parts if part for s in part] if processes.is_main_process else None

    def score_sources(self, model, split: str | None = None, processes=None) -> dict | None:
        """Mixed data: each source scored on its own held-out rows (``split``; default test, else
        validation), as ``SOURCE/metric``; label sources are scored against their own labels. With
        ``processes``, each source as ``score`` scores rows (``_scored``)."""
        split = split or ("test" if self.data.examples["test"] else "validation")
        n = self.config.eval.max_examples
        metrics = {}
        for name, source in self.data.stats["sources"].items():
            examples = [e for e in self.data.examples[split] if e["_source"] == name][:n]
            encoded = [e for e in self.data.encoded[split] if e["_source"] == name][:n]
            if not encoded:
                continue
            labels = source["labels"] if source["format"] == "classification" else []
            scored = self._scored(model, examples, encoded, labels, processes)
            for metric, value in (scored or {}).items():
                metrics[f"{name}/{metric}"] = value
        if processes is not None and not processes.is_main_process:
            return None
        if not metrics:
            raise TunesmithError("data: no test or validation rows to evaluate on")
        return metrics


@contextmanager
def base_model(session: Session, model, labels: list[str]):
    """The base of a tuned model: the same model with its adapters disabled (``Method.disables``), or a
    fresh copy of the base (full fine-tuning, our adapters)."""
    if session.method.disables:
        with model.disable_adapter():
            yield model
    else:
        yield session.load_model(labels)


def load_run(path: str | Path):
    """The tuned model of a saved run, in eval mode: ``(run, session, model)``.

    The session is built from the run's own config; its data is not read (``session.prepare()``).
    """
    run = Run(path, writer=False)
    config = run.load_config()
    session = Session(config)
    saved = run.saved(session.method)
    if not saved.is_dir():
        raise TunesmithError(f"{run.path}: the run has no saved {saved.name}/ (status: {run.status()})")
    model = session.method.load(session.load_model(run.labels()), saved)
    model.eval()
    return run, session, model
