"""Continual re-training: a run that starts from a finished run's weights (``tunesmith train --from``),
replays part of that run's training data, and measures what the update made the model forget.

The recipe calls ``Continual`` at four points: ``open`` (before anything is written: the parent's
checks), ``add_replay`` (after the data is prepared), ``start`` (in place of ``method.apply``: the
method's trainable parameters, set to the parent's values; for an objective trained against a
reference, dpo or kto, the parent made its reference) and ``finish`` (the tuned model's figures and
the report's sections, and which reference the run used). A run without a parent and without
``eval.general`` goes through the same calls, which then only apply the method.
"""

from __future__ import annotations

import random
from functools import partial
from pathlib import Path

import torch

from tunesmith.config import RunConfig
from tunesmith.errors import TunesmithError
from tunesmith.eval.general import forgetting_table, plot_forgetting, score_general
from tunesmith.eval.report import metrics_table
from tunesmith.model import resolve_model
from tunesmith.objectives import SEQUENCE_CLASSIFIER, abilities, lacks
from tunesmith.session import Session
from tunesmith.store import Run
from tunesmith.train import distributed
from tunesmith.train.precision import autocast


def check_parent(path: str | Path, config) -> Run:
    """The finished run at ``path``, if ``config`` (a ``RunConfig``) can continue it: same base
    model, method and objective (or two objectives that tune a causal LM's answers). One line naming
    the difference otherwise."""
    parent = Run(path, writer=False)
    where = f"--from {parent.path}"
    if not (parent.path / "config.yaml").is_file():
        raise TunesmithError(f"{where}: not a tunesmith run directory (no config.yaml)")
    status = parent.status()
    if status != "complete":
        raise TunesmithError(f"{where}: the run is not complete (status: {status}); "
                             "continue only from a finished run")
    theirs = parent.load_config()
    if _model_of(theirs.model.name) != _model_of(config.model.name):
        raise TunesmithError(f"{where}: the run tuned model {theirs.model.name!r}, not {config.model.name!r}; "
                             "a continued run keeps its parent's base model")
    if theirs.method.name != config.method.name:
        raise TunesmithError(f"{where}: the run used method {theirs.method.name}, not {config.method.name}; "
                             "a continued run keeps its parent's method")
    # Options that shape the trained parameters must match; dropout only acts while training.
    mine, their_options = config.method.model_dump(), theirs.method.model_dump()
    for field in mine:
        if field != "dropout" and mine[field] != their_options.get(field):
            raise TunesmithError(f"{where}: method.{field} is {mine[field]!r} here but {their_options.get(field)!r} "
                                 "in the run; a continued run keeps its parent's method options")
    # The objectives that tune a causal LM's answers train the same model: one may continue another
    # (an SFT run tuned on thumbs by kto, say).
    if theirs.objective.name != config.objective.name:
        why = lacks(theirs.objective.name, "causal_answers") or lacks(config.objective.name, "causal_answers")
        if why:
            raise TunesmithError(f"{where}: the run trained objective {theirs.objective.name}, not "
                                 f"{config.objective.name}; a continued run keeps its parent's objective, or "
                                 f"moves between two that write a causal LM's answers ({why})")
    return parent


def _model_of(name: str) -> str:
    # An alias and the directory it names are the same model.
    try:
        return str(Path(resolve_model(name)).resolve())
    except TunesmithError:
        return name


class Continual:
    def __init__(self, config: RunConfig, parent: Run | None):
        self.config = config
        self.parent = parent
        self.parent_session: Session | None = None
        self.replayed = 0
        self.tuned_general: dict | None = None  # the tuned model's probes (``score_tuned``)
        if config.train.replay and parent is None:
            raise TunesmithError("train.replay: replay draws from a parent run's data; give the parent with --from RUN")

    @classmethod
    def open(cls, config: RunConfig, parent: str | Path | None) -> Continual:
        """Check the parent (complete, same base model, method and objective) before anything is written."""
        return cls(config, check_parent(parent, config) if parent else None)

    def reference(self) -> str:
        """What an objective trained against a reference (``Abilities.reference``) is trained against:
        ``parent RUN`` for a child, the model it starts from; ``base`` otherwise."""
        return f"parent {self.parent.path.resolve()}" if self.parent is not None else "base"

    def status(self) -> dict:
        """What the run's status records: its parent, so the lineage survives a crash of this run."""
        return {"parent": str(self.parent.path.resolve())} if self.parent else {}

    def parent_data(self):
        """The parent's splits, read and encoded through its own config and data pipeline (once)."""
        if self.parent_session is None:
            self.parent_session = Session(self.parent.load_config())
            # Encoded by the labels in the order the parent's model outputs them.
            self.parent_session.prepare(self.parent.labels() or None)
        return self.parent_session.data

    def add_replay(self, session: Session) -> int:
        """Add ``train.replay`` of the training examples from the parent's training split; returns how many."""
        if self.parent is None:
            return 0
        labels = self.parent.labels()
        # A classifier's head has one output per label, in the parent's order.
        if abilities(self.config.objective.name).head == SEQUENCE_CLASSIFIER and session.data.labels != labels:
            raise TunesmithError(f"--from {self.parent.path}: the parent's classifier has labels "
                                 f"{', '.join(labels)}; this data has {', '.join(session.data.labels)}")
        fraction = self.config.train.replay
        if not fraction:
            return 0
        theirs = self.parent_session.config if self.parent_session else self.parent.load_config()
        if theirs.data.max_length > self.config.data.max_length:
            raise TunesmithError(f"train.replay: the parent's examples are up to {theirs.data.max_length} tokens "
                                 f"long; set data.max_length to at least that (now {self.config.data.max_length})")
        pool = self.parent_data().encoded["train"]
        new = session.data.encoded["train"]
        self.replayed = replay_count(len(new), fraction)
        session.data.encoded["train"] = new + draw(pool, self.replayed, self.config.train.seed)
        session.data.stats["replay"] = {"fraction": fraction, "examples": self.replayed, "parent": str(self.parent.path)}
        return self.replayed

    def start(self, session: Session, run: Run, model, resume: bool, processes):
        """The model training starts from: the method applied to the base, its trainable parameters
        set to the parent's. The base and the starting model are scored first (kept in
        ``start_eval.json`` for a resumed run): on the general probes by every process of
        ``processes`` (accelerate's state), a share each; the rest by the main process."""
        main = processes.is_main_process
        in_shares = partial(distributed.scored_in_shares, accelerator=processes)
        scores = run.load_json("start_eval") if resume and main else None
        general = self.config.eval.general
        # The main process says what is left to score, so that every process takes part in the probes.
        if distributed.main_says(scores is None, processes):
            scores = {"general": {}}
            if general:
                if main:
                    print("scoring the base model on the general probes ...")
                scores["general"]["base"] = score_general(model, session.tokenizer, general, in_shares)
        model = session.method.apply(model, self.config.method)
        if self.parent is not None:
            load_parent_weights(model, session, self.parent)
            if session.objective.abilities.reference:
                # Trained against the model it starts from, the parent (objectives/dpo.py says why),
                # scored under the autocast the steps use. A resumed run gets here with the parent's
                # weights again, before its checkpoint is loaded.
                with autocast(self.config.train.mixed_precision, next(model.parameters()).device):
                    session.objective.start_from(model, partial(parent_model, session, self.parent),
                                                 self.reference())
        if distributed.main_says(scores is not None and "new" not in scores, processes):
            if self.parent is not None:
                if main:
                    print("scoring the parent on the new and the parent's test sets ...")
                    scores["new"] = session.score(model)
                    scores["parent_test"] = self.parent_session_scores(model)
                if general:
                    parent = score_general(model, session.tokenizer, general, in_shares)
                    if main:
                        scores["general"]["parent"] = parent
            elif main:
                scores["new"] = None
            if main:
                run.save_json("start_eval", scores)
        self.start_scores = scores
        return model

    def score_tuned(self, session: Session, model, processes) -> None:
        """The tuned model on the general probes, by every process, a share each (for ``finish``)."""
        general = self.config.eval.general
        if general:
            self.tuned_general = score_general(model, session.tokenizer, general,
                                               partial(distributed.scored_in_shares, accelerator=processes))

    def parent_session_scores(self, model) -> dict:
        data = self.parent_data()
        session = self.parent_session
        if not (data.examples["test"] or data.examples["validation"]):
            return {}
        return session.score(model)

    def finish(self, session: Session, run: Run, model) -> tuple[dict, list[str]]:
        """The tuned model's figures for metrics.json, and the report's sections."""
        summary, sections = {}, []
        scores = self.start_scores
        if session.objective.abilities.reference:
            summary["reference"] = self.reference()
            sections += ["## Reference", "",
                         f"Trained and scored against {self.reference_line()}.", ""]
        if self.parent is not None:
            on_parent_test = self.parent_session_scores(model)
            tuned_new = session.score(model)
            summary["parent"] = {"run": str(self.parent.path.resolve()), "replay": self.config.train.replay,
                                 "replayed_examples": self.replayed,
                                 "new_test": {"parent": scores["new"], "tuned": tuned_new},
                                 "parent_test": {"parent": scores["parent_test"], "tuned": on_parent_test}}
            sections += [
                "## Against the parent run", "",
                f"Continued from `{self.parent.path}`"
                + (f", replaying {self.replayed} of its training examples (train.replay "
                   f"{self.config.train.replay:g})." if self.replayed else ", without replay."), "",
                "On this run's test set:", "",
                metrics_table(scores["new"], tuned_new, ("parent", "tuned")), "",
                "On the parent's test set (what the update may have made it forget):", "",
                metrics_table(scores["parent_test"], on_parent_test, ("parent", "tuned")), "",
            ]
        general = self.config.eval.general
        if general:
            points = {**scores["general"], "tuned": self.tuned_general}
            summary["general"] = points
            plot_forgetting(points, run.path / "forgetting.png")
            sections += ["## Forgetting: general ability", "",
                         f"Perplexity on the last characters of `{general.text}` and zero-shot accuracy on "
                         "the word_topics task (docs/lifecycle.md), which no run trains on.", "",
                         forgetting_table(points), "", "![forgetting](forgetting.png)", ""]
        return summary, sections

    def reference_line(self) -> str:
        """``reference()`` as the report says it."""
        if self.parent is None:
            return "the base model"
        return f"the parent run `{self.parent.path}`, the model training started from"


def replay_count(new: int, fraction: float) -> int:
    """Replayed examples so that they are ``fraction`` of all: r / (new + r) = fraction."""
    return round(new * fraction / (1 - fraction))


def draw(pool: list[dict], n: int, seed: int) -> list[dict]:
    """``n`` items of ``pool``, without replacement until the pool is used up, then again."""
    if not pool:
        return []
    rng = random.Random(seed)
    out: list[dict] = []
    while len(out) < n:
        out += rng.sample(pool, min(len(pool), n - len(out)))
    return out


@torch.no_grad()
def load_parent_weights(model, session: Session, parent: Run) -> None:
    """Set ``model``'s trainable parameters (the method just applied) to the parent's saved ones.

    The parent is loaded the way ``tunesmith eval`` loads it, then copied parameter by parameter:
    a method whose options change the parameters' names or shapes (another rank, other target
    modules) is refused."""
    theirs = dict(parent_model(session, parent).named_parameters())
    mine = dict(model.named_parameters())
    if set(theirs) != set(mine):
        name = min(set(theirs) ^ set(mine))
        raise TunesmithError(f"--from {parent.path}: the parent's {session.method.name} weights do not fit this "
                             f"config's method options (parameter {name} is in one only); keep the parent's "
                             "method options")
    for name, p in mine.items():
        if p.requires_grad:
            if theirs[name].shape != p.shape:
                raise TunesmithError(f"--from {parent.path}: parameter {name} has shape {tuple(theirs[name].shape)} "
                                     f"in the parent, {tuple(p.shape)} here; keep the parent's method options")
            p.copy_(theirs[name].to(p.device, p.dtype))


def parent_model(session: Session, parent: Run):
    """The parent's tuned model, loaded the way ``tunesmith eval`` loads it."""
    saved = parent.saved(session.method)
    if not saved.is_dir():
        raise TunesmithError(f"--from {parent.path}: the run has no saved {saved.name}/")
    return session.method.load(session.load_model(parent.labels()), saved)
