"""What plugs into the fine-tuning recipe beside its fixed shape: private training, continuing a
parent run, judged evaluation, curriculum and class-balanced sampling. Each is a ``Feature``: the
recipe calls every active one at the same points, in the order ``plug_in`` gives, and names none.

A feature's work stays in its own package (``privacy/``, ``lifecycle/continual.py``, ``judge.py``,
``train/``); its class here only wires that work to the recipe's points.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tunesmith.eval.report import privacy_line
from tunesmith.judge import Judge, judge_trained, open_judge, write_judged
from tunesmith.lifecycle.continual import Continual
from tunesmith.privacy.training import PrivateTraining, prepare_private
from tunesmith.session import Session
from tunesmith.store import Run
from tunesmith.train.balance import balanced_batches, check_balance, item_labels
from tunesmith.train.curriculum import curriculum_batches, difficulty
from tunesmith.train.loop import TrainState


@dataclass
class Report:
    """What the recipe writes last: metrics.json's entries and report.md's sections, in order."""

    summary: dict
    sections: list[str] = field(default_factory=list)


class Feature:
    """The recipe's points where a feature acts; every process calls them unless said otherwise.
    A feature overrides the points it acts at; the others return what they were given, or nothing."""

    def plan(self) -> str | None:
        """One line said before anything is trained (main process), or None."""
        return None

    def start(self, session: Session, run: Run, model, resume: bool, processes):
        """With the base model, evaluated, before training: the model to train. ``Continuing``
        applies the method; a feature that scores the base does so here."""
        return model

    def fit_options(self, session: Session, processes) -> dict:
        """``fit``'s keyword arguments that this feature sets: ``batches`` (the sampler seam),
        ``make_step`` (the step seam), ``validation_figures``."""
        return {}

    def evaluate(self, session: Session, model, processes) -> None:
        """After the tuned model's evaluation, while the processes still work together: what it
        scores, each process a share."""

    def finish(self, session: Session, run: Run, model, state: TrainState, report: Report) -> None:
        """Main process only, once the tuned model is saved: its entries and sections of ``report``."""


def plug_in(session: Session, processes, continual: Continual) -> list[Feature]:
    """The features ``session``'s config turns on, each checked (and the training data completed)
    before anything is written. ``continual``: the run's start, always a feature (``Continuing``)."""
    config = session.config
    check_balance(config, session.data.labels)
    judge = open_judge(session)
    continual.add_replay(session)  # before the sampler sees the training items
    sampler = None
    if config.privacy:
        sampler = Private(prepare_private(config.privacy, config.train, session.objective,
                                          session.data.encoded["train"], processes.num_processes))
    elif config.train.curriculum:
        sampler = Curriculum()
    elif config.data.balance != "none":
        sampler = Balanced()
    # The order of the calls at every point: a curriculum scores the base before the method is applied.
    return [f for f in (sampler, Continuing(continual), Judging(judge) if judge else None) if f is not None]


class Private(Feature):
    """Differentially private training (``privacy:``): Poisson batches, the DP step, epsilon logged."""

    def __init__(self, private: PrivateTraining):
        self.private = private

    def plan(self) -> str | None:
        return self.private.describe()

    def fit_options(self, session, processes) -> dict:
        return {"batches": self.private.batches, "make_step": self.private.make_step,
                "validation_figures": self.private.validation_figures}

    def finish(self, session, run, model, state, report) -> None:
        report.summary["privacy"] = self.private.budget.summary(state.step)
        print(privacy_line(report.summary["privacy"]))


class Curriculum(Feature):
    """Easy examples first (``train.curriculum``), their difficulty scored by the base model."""

    def __init__(self):
        self.scores: list[float] = []

    def start(self, session, run, model, resume, processes):
        cfg = session.config.train.curriculum
        self.scores = difficulty(cfg, session.data.encoded["train"], session.objective.batches, model,
                                 run.curriculum_scores, write=processes.is_main_process)
        return model

    def fit_options(self, session, processes) -> dict:
        return {"batches": curriculum_batches(session.data.encoded["train"], session.objective.batches, self.scores,
                                              session.config.train, processes.num_processes)}


class Balanced(Feature):
    """Class-balanced or square-root sampling of the training split (``data.balance``)."""

    def fit_options(self, session, processes) -> dict:
        train, config = session.data.encoded["train"], session.config
        return {"batches": balanced_batches(train, session.objective.batches,
                                            item_labels(session.data.examples["train"], len(train)),
                                            config.data.balance, config.train.seed)}


class Continuing(Feature):
    """The run's start (``lifecycle.continual``): the method applied, from a parent's weights with
    ``--from``; the general probes (``eval.general``); the parent's figures and sections first in the
    report."""

    def __init__(self, continual: Continual):
        self.continual = continual

    def start(self, session, run, model, resume, processes):
        return self.continual.start(session, run, model, resume, processes)

    def evaluate(self, session, model, processes) -> None:
        self.continual.score_tuned(session, model, processes)

    def finish(self, session, run, model, state, report) -> None:
        extra, parent = self.continual.finish(session, run, model)
        report.summary |= extra
        report.sections[:0] = parent


class Judging(Feature):
    """Judged evaluation at the end of training (``eval.judge``): answers of the tuned model and its
    base scored by a judge run; judged.json, judged.png and the report's last section."""

    def __init__(self, judge: Judge):
        self.judge = judge
        self.judged: dict | None = None

    def evaluate(self, session, model, processes) -> None:
        self.judged = judge_trained(session, model, self.judge, processes)

    def finish(self, session, run, model, state, report) -> None:
        if self.judged:
            report.summary["judged"], section = write_judged(run, self.judged)
            report.sections += section
