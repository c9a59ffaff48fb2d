"""A finished run read back and measured: ``tunesmith eval`` (its metrics, the base's beside them),
``tunesmith generate`` and ``tunesmith privacy audit``. Each loads the run through
``session.load_run``, which is why this sits above the session, while ``eval/`` (the metrics' maths)
and ``privacy/`` (the audit's) sit below it. ``eval --bias`` is ``lifecycle.bias.bias_run``; judged
evaluation is ``judge.judge_run``."""

from __future__ import annotations

from pathlib import Path

from tunesmith.data.options import SplitConfig
from tunesmith.errors import TunesmithError
from tunesmith.eval.report import replace_section
from tunesmith.privacy.audit import audit, format_audit, format_comparison
from tunesmith.session import Session, base_model, load_run
from tunesmith.store import Run


def evaluate_run(run_dir: Path, data_file: str | None = None) -> tuple[dict, dict]:
    """Base and tuned metrics on the run's test split, or on every row of ``data_file``."""
    base, tuned, _ = evaluate_run_report(run_dir, data_file)
    return base, tuned


def evaluate_run_report(run_dir: Path, data_file: str | None = None) -> tuple[dict, dict, dict | None]:
    """``evaluate_run``'s metrics, and the tuned model's classification report where it scores labels
    (``Session.score_report``)."""
    run, session, model = load_run(run_dir)
    if data_file:
        if not Path(data_file).is_file():
            raise TunesmithError(f"{data_file}: file not found")
        config = session.config
        config.data = config.data.model_copy(update={
            "path": str(Path(data_file).resolve()), "train": None, "validation": None, "test": None,
            "max_rows": None, "split": SplitConfig(validation=0.0, test=0.0, stratify=False)})
        session = Session(config)
    # Encoded by the labels the model was trained on, in its output order, whatever the data holds.
    data = session.prepare(run.labels() or None)
    session.decision = run.decision()  # the tuned model's rule, chosen on validation after training
    if data_file:
        data.examples["test"], data.encoded["test"] = data.examples["train"], data.encoded["train"]
    # A new session's objective has not loaded the base: one scored against it (``Abilities.reference``)
    # gets it, kept unchanged beside a tuned model that has no adapter to disable.
    kept = session.load_model(data.labels) if data_file and session.objective.abilities.reference and \
        not session.method.disables else None
    tuned, classes = session.score_report(model)
    del kept
    with base_model(session, model, data.labels) as base:
        return session.score(base), tuned, classes


def generate(run_dir: Path, prompt: str, max_new_tokens: int) -> str:
    """Stream the tuned model's answer to ``prompt``, framed as the run's training framed prompts."""
    run, session, model = load_run(run_dir)
    return session.objective.answer(model, prompt, run.labels(), max_new_tokens, stream=True)


def audit_run(run_dir: Path, candidates: int = 1000, max_examples: int = 1000,
              against: list[Path] = ()) -> dict:
    """Canary exposure and membership inference of a saved run; written to privacy_audit.json and
    to the run's report, beside the audits of the runs ``against`` (for example the same job without
    DP) when given."""
    others = [_audited(Run(path)) for path in against]  # before the long audit: a missing one fails fast
    run, session, model = load_run(run_dir)
    config = session.config
    # The same splits as in training (canaries join the training split last), without the canaries:
    # membership is about the user's rows.
    config.data = config.data.model_copy(update={"canaries": None})
    session = Session(config)
    session.prepare()
    result = audit(session, model, lambda: base_model(session, model, run.labels()), run.load_json("canaries"),
                   candidates, max_examples)
    run = Run(run_dir)
    run.save_json("privacy_audit", result)
    body = [format_audit(result)]
    if others:
        body += ["", "Side by side with other runs' audits (`tunesmith privacy audit RUN --against OTHER`):", "",
                 format_comparison([(run.path.name, run.load_json("metrics", {}), result), *others])]
    replace_section(run.report, "Memorisation audit", "\n".join(body))
    return result


def _audited(run: Run) -> tuple[str, dict, dict]:
    result = run.load_json("privacy_audit")
    if result is None:
        raise TunesmithError(f"--against {run.path}: no privacy audit there; run `tunesmith privacy audit "
                             f"{run.path}` first")
    return run.path.name, run.load_json("metrics", {}), result
