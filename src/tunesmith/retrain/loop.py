"""``tunesmith retrain RUN``: rated traffic plus replay -> a child run -> the gate -> promotion.

1. Rated answers the run served (``store.db.served_ratings``, ``data.rated_rows``), each input once, with
   the row its raters agree on (``--min-raters``, ``--agreement``), and none of the original test
   set's (``data.unseen``); a seeded slice of them is held out for the gate.
2. The child's data: the rest, plus replay of the parent's training split, in canonical rows; the
   parent's test split is the child's test set, so the child's own report shows it too.
3. The child trains with the parent's config (method, hyperparameters, ``--set`` overrides) through
   ``train_child``: from the parent's weights (``tunesmith train --from``), on that data.
4. Parent and child are scored on the original test set and on the held-out new rows
   (``score_files``); ``gate.decide`` says whether the child is promoted.
5. The decision and its figures go to the child's ``retrain_decision.json`` and are appended to a
   decisions log; a promotion with ``--alias`` points that alias at the child in the alias file.

``--objective kto`` (and the re-training of a KTO run) trains on the thumbs themselves: every served
answer marked good or bad, each prompt and answer once (``store.db.rated_answers``), the parent's
examples replayed as such rows (``data.kto_rows``); the child is a KTO run with
``objective.balance: auto`` (thumbs are rarely even), and parent and child are both scored by KTO's
held-out loss against the base model.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from contextlib import closing
from pathlib import Path

from tunesmith.config import apply_overrides, load_config
from tunesmith.data.options import ColumnsConfig, SplitConfig
from tunesmith.errors import TunesmithError
from tunesmith.monitor.traffic import parse_since
from tunesmith.recipe import run_training
from tunesmith.objectives import GENERATIVE
from tunesmith.retrain.data import (
    canonical,
    hold_out,
    kto_rows,
    rated_rows,
    replay,
    unseen,
    write_rows,
)
from tunesmith.retrain.gate import decide
from tunesmith.session import Session
from tunesmith.store import Run, load_run
from tunesmith.store import db as store_db
from tunesmith.store.consensus import Consensus
from tunesmith.store.aliases import DEFAULT_PATH as DEFAULT_ALIAS_FILE
from tunesmith.store.aliases import write_alias

LABEL_COLUMNS = {"text": "text", "label": "label"}
CHAT_COLUMNS = {"messages": "messages"}
KTO_COLUMNS = {"prompt": "prompt", "completion": "completion", "desirable": "label"}


def canonical_data(data, files: dict[str, Path], labels: list[str], kto: bool = False):
    """The parent's ``data:`` section pointed at canonical files, with its cleaning and template kept."""
    kind, columns = ("unpaired_preference", KTO_COLUMNS) if kto else \
        ("classification", LABEL_COLUMNS) if labels else ("chat", CHAT_COLUMNS)
    return data.model_copy(update={
        "path": None, "train": str(files["train"]), "validation": None, "test": str(files.get("test")) if files.get("test") else None,
        "format": kind, "columns": ColumnsConfig(**columns),
        "label_map": None, "max_rows": None, "canaries": None,
        "split": SplitConfig(validation=data.split.validation, test=0.0, stratify=bool(labels))})


def parent_rows(run: Run, kto: bool = False) -> tuple[list[dict], list[dict]]:
    """The parent's training and test examples (validation where it had no test), as canonical rows
    (``kto``: as KTO rows)."""
    config = run.load_config()
    config.data = config.data.model_copy(update={"canaries": None})
    data = Session(config).prepare()
    test = data.examples["test"] or data.examples["validation"]
    rows = kto_rows if kto else lambda e: [canonical(e)]
    return [r for e in data.examples["train"] for r in rows(e)], [r for e in test for r in rows(e)]


def score_files(run_dir: Path, files: dict[str, Path], config=None) -> dict[str, dict]:
    """The run's tuned model's metrics on every row of each canonical file, by its own objective or by
    ``config``'s (a KTO child's: its parent is scored as a KTO policy too)."""
    run, session, model = load_run(run_dir)
    labels = run.labels()
    config = config or session.config
    scores = {}
    for name, path in files.items():
        scoring_config = config.model_copy(deep=True)
        scoring_config.data = canonical_data(config.data, {"train": path}, labels,
                                             config.objective.name == "kto").model_copy(
            update={"split": SplitConfig(validation=0.0, test=0.0, stratify=False)})
        scoring = Session(scoring_config)
        data = scoring.prepare(labels or None)  # the model's label order (a held-out slice may lack a label)
        data.examples["test"], data.encoded["test"] = data.examples["train"], data.encoded["train"]
        # An objective scored against the base model (its ``reference``), for a model with no adapter
        # to disable: the base, loaded once and kept unchanged beside it while it is scored.
        base = scoring.load_model(labels) if hasattr(scoring.objective, "reference") and \
            not hasattr(model, "disable_adapter") else None
        scores[name] = scoring.score(model)
        del base
    return scores


def train_child(config, parent: Path) -> Path:
    """The single training entry point of a retrain: the recipe, as ``tunesmith train --from PARENT``
    runs it (the child starts from the parent's weights and records it in its lineage)."""
    return run_training(config, parent=parent)


def check_child_dir(child_dir: Path, sets: list[str]) -> None:
    """The child is written where ``--out`` says and nowhere else: a ``--set`` that moves
    ``output.dir`` is refused (the UI launches retrain with its own --out, under its runs directory)."""
    output = apply_overrides({"output": {"dir": str(child_dir)}}, list(sets))["output"]
    moved = output.get("dir") if isinstance(output, dict) else output
    if moved != str(child_dir):
        raise TunesmithError(f"--set output.dir={moved}: the child's directory is --out ({child_dir}); "
                             "give --out instead")


def retrain(run_dir: str | Path, child_dir: str | Path | None = None, store: str | Path | None = None,
            adapter: str | None = None, since: str | None = None, sets: list[str] | None = None,
            holdout: float = 0.2, replay_ratio: float = 1.0, min_rows: int = 20, min_score: float = 1.0,
            tolerance: float = 0.01, alias: str | None = None, alias_file: str | Path = DEFAULT_ALIAS_FILE,
            log: str | Path = "runs/retrain_decisions.jsonl", seed: int = 0,
            consensus: Consensus = Consensus(), objective: str | None = None) -> dict:
    """Re-train RUN on its rated traffic and promote the child only if the gate says so; ``objective``
    ``kto``: on the thumbs themselves, good and bad (the module docstring)."""
    problems = [f"--holdout {holdout}: expected a share between 0 and 1"] if not 0 < holdout < 1 else []
    problems += [f"--replay {replay_ratio}: expected 0 or more"] if replay_ratio < 0 else []
    problems += [f"--tolerance {tolerance}: expected 0 or more"] if tolerance < 0 else []
    if problems:
        raise TunesmithError(*problems)
    run_dir = Path(run_dir)
    parent = Run(run_dir, writer=False)
    if parent.status() != "complete":
        raise TunesmithError(f"{run_dir}: only a complete run can be re-trained (status: {parent.status()})")
    child_dir = Path(child_dir) if child_dir else run_dir.with_name(
        f"{run_dir.name}-retrain-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    check_child_dir(child_dir, sets or [])
    labels = parent.labels()
    parent_config = parent.load_config()
    kto = (objective or parent_config.objective.name) == "kto"
    if objective not in (None, "kto"):
        raise TunesmithError(f"--objective {objective}: a child trains its parent's objective, or kto")
    if kto and (labels or parent_config.objective.name not in GENERATIVE):
        raise TunesmithError(f"--objective kto: {run_dir} trained objective {parent_config.objective.name}"
                             f"{' on labels' if labels else ''}; KTO tunes a run that writes answers "
                             f"({', '.join(GENERATIVE)})")
    adapter = adapter or run_dir.resolve().name
    store = Path(store) if store else store_db.default_path()
    if not store.is_file():
        raise TunesmithError(f"--store {store}: no store there (the server writes it; see --store)")
    with closing(store_db.connect(store)) as connection:
        ratings = store_db.served_ratings(connection, adapter, parse_since(since))
    if kto:
        left_out: dict[str, int] = {}
        rows = [{"prompt": r["prompt"], "completion": r["completion"], "label": r["label"]}
                for r in store_db.rated_answers(ratings, consensus, min_score, left_out)]
        skipped = Counter(left_out)
    else:
        rows, skipped = rated_rows(ratings, labels, min_score, consensus)
    original_train, original_test = parent_rows(parent, kto)
    rows, repeated = unseen(rows, original_test)
    if repeated:
        skipped["repeated_or_in_original_test"] = repeated
    if len(rows) < min_rows:
        why = ", ".join(f"{n} {reason}" for reason, n in skipped.items()) or "none left out"
        raise TunesmithError(f"adapter {adapter!r}: {len(rows)} usable rated answers in {store} ({why}); "
                             f"re-training needs at least {min_rows} (--min-rows)")
    Run(child_dir).check_new(resume=False)
    new_train, held = hold_out(rows, holdout, seed)
    replayed = replay(original_train, len(new_train), replay_ratio, seed)
    data_dir = child_dir.with_name(f"{child_dir.name}.data")
    if data_dir.exists():
        raise TunesmithError(f"{data_dir}: already exists; choose another child directory (--out)")
    files = {
        "train": write_rows(data_dir / "train.jsonl", new_train + replayed),
        "test": write_rows(data_dir / "original_test.jsonl", original_test),
        "new": write_rows(data_dir / "new_heldout.jsonl", held),
    }
    raw = parent_config.model_dump(mode="json")
    raw["data"] = canonical_data(parent_config.data, files, labels, kto).model_dump(mode="json")
    raw["output"]["dir"] = str(child_dir)
    if kto and parent_config.objective.name != "kto":
        raw["objective"] = {"name": "kto", "balance": "auto"}
    config = load_config(run_dir / "config.yaml", sets, raw=raw)
    train_child(config, run_dir)

    evaluation = {"original": files["test"], "new": files["new"]}
    scored_by = config if kto else None
    parent_scores, child_scores = score_files(run_dir, evaluation, scored_by), score_files(child_dir, evaluation,
                                                                                            scored_by)
    decision = decide(parent_scores, child_scores, "accuracy" if labels else "loss", tolerance)
    record = {
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "parent": str(run_dir.resolve()),
        "child": str(child_dir.resolve()), "adapter": adapter, "store": str(store), "since": since,
        "objective": config.objective.name,
        "rated_rows": len(rows), "left_out": dict(skipped), "new_train_rows": len(new_train),
        "consensus": {"min_raters": consensus.min_raters, "agreement": consensus.agreement},
        "held_out_rows": len(held), "replay_rows": len(replayed),
        "original_test_rows": len(original_test), "decision": decision.record(),
        "parent_metrics": parent_scores, "child_metrics": child_scores,
        "alias": alias if decision.promote else None,
    }
    Run(child_dir).save_json("retrain_decision", record)
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write(json.dumps(record) + "\n")
    if decision.promote and alias:
        write_alias(Path(alias_file), alias, child_dir)
    return record
