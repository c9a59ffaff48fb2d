"""``tunesmith retrain RUN``: rated traffic plus replay -> a child run -> the gate -> promotion.

1. Rated answers the run served (``store.db.served_ratings``, ``data.rated_rows``), each input once, with
   the row its raters agree on (``--min-raters``, ``--agreement``), and none of the original test
   set's (``data.unseen``); a seeded slice of them is held out for the gate.
2. The child's data: the rest, plus replay of the parent's training split, in canonical rows; the
   parent's test split is the child's test set, so the child's own report shows it too.
3. The child trains with the parent's config (method, hyperparameters, ``--set`` overrides) through
   ``train_child``: from the parent's weights (``tunesmith train --from``), on that data; a dpo or
   kto child against its parent as reference (``lifecycle.continual``).
4. Parent and child are scored on the original test set and on the held-out new rows
   (``score_files``; dpo and kto against one reference for both, the base); ``gate.decide`` says
   whether the child is promoted. With ``--judge RUN`` (a reward model or classifier run), "better on
   the new data" is judged on answers instead: parent and child sample answers to the held-out new
   prompts from the same seeds, the judge scores them, and the child must have the higher mean reward
   (``gate.JUDGED``; every answer in the child's ``retrain_judged.json``); the original test set is
   still held to the tolerance on the objective's metric. A held-out loss on pairs of the parent's own
   answers asks whether the child ranks such pairs as the raters did; the judge asks whether its
   answers are better, which is what a DPO child of served traffic is for (docs/lifecycle.md).
5. The decision and its figures go to the child's ``retrain_decision.json`` and are appended to a
   decisions log; a promotion with ``--alias`` points that alias at the child in the alias file.

``--objective NAME`` trains a child of another objective that writes a causal LM's answers (dpo, kto
from a causal run), or a reward model of the run's rated answers (reward), on the rows its data kind takes (``Abilities.data``, ``data_kind``): pairs for
dpo (thumbs up preferred to thumbs down on one prompt, and the rate page's choices), the thumbs
themselves for kto (every served answer marked good or bad, each prompt and answer once,
``store.db.rated_answers``), with the options its objective declares for rated traffic
(``Abilities.traffic_options``: KTO balances its weights). The parent's examples are replayed as
such rows where they can be (``data.kto_rows``, ``data.pair_rows``). The held-out new rows are
scored the child's way for parent and child; the original test set too, or, where the parent's
examples give no such rows (answers to imitate are no pairs), the parent's way.

A child whose head is not its parent's (a reward model of a causal run's answers: a scalar head that
the parent's adapter, trained on a causal LM's outputs, does not fit) starts from the base model the
parent tuned, not from the parent, and has no parent of its kind to beat: it is gated on its own
held-out figure (``gate.decide_first``: pairwise accuracy on the new pairs above chance). A reward
child of a reward run (``--adapter`` names the served run whose ratings it learns from) continues
it and is gated as any child, on pairwise accuracy on the new pairs and on the parent's test pairs.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from contextlib import closing
from dataclasses import asdict
from pathlib import Path

import torch

from tunesmith.config import apply_overrides, load_config
from tunesmith.data.options import ColumnsConfig, SplitConfig
from tunesmith.errors import TunesmithError, prefixed
from tunesmith.monitor.traffic import parse_since
from tunesmith.recipe import run_training
from tunesmith.objectives import REGISTRY as OBJECTIVES
from tunesmith.objectives import abilities, lacks
from tunesmith.retrain.data import (
    canonical,
    hold_out,
    input_of,
    kto_rows,
    pair_rows,
    rated_pairs,
    rated_rows,
    replay,
    unseen,
    write_rows,
)
from tunesmith.judge import Judge, Sampling, held_out_prompts, judge_answers, load_judge
from tunesmith.retrain.gate import JUDGED, decide, decide_first
from tunesmith.session import Session, load_run
from tunesmith.store import Run
from tunesmith.store import db as store_db
from tunesmith.store.consensus import Consensus
from tunesmith.store.aliases import DEFAULT_PATH as DEFAULT_ALIAS_FILE
from tunesmith.store.aliases import write_alias

# The rows a child trains and is scored on, by the data kind its objective takes (``Abilities.data``):
# their canonical columns, and the parent's prepared examples as such rows.
COLUMNS = {
    "classification": {"text": "text", "label": "label"},
    "chat": {"messages": "messages"},
    "preference": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"},
    "unpaired_preference": {"prompt": "prompt", "completion": "completion", "desirable": "label"},
}
PARENT_ROWS = {"classification": lambda e: [canonical(e)], "chat": lambda e: [canonical(e)],
               "preference": pair_rows, "unpaired_preference": kto_rows}


def data_kind(objective: str, labels: list[str]) -> str:
    """The kind of rows a run of ``objective`` trains and is scored on here: label rows for a run with
    labels; else the first of chat rows, pairs and marked answers that the objective takes."""
    wanted = ("classification",) if labels else ("chat", "preference", "unpaired_preference")
    kind = next((k for k in wanted if k in abilities(objective).data), None)
    if kind is None:
        has_labels = " (the run has labels)" if labels else ""
        raise TunesmithError(f"objective {objective} trains on {', '.join(abilities(objective).data)} data; "
                             f"re-training builds {' or '.join(wanted)} rows{has_labels}")
    return kind


def canonical_data(data, files: dict[str, Path], kind: str):
    """The parent's ``data:`` section pointed at canonical files of ``kind``, with its cleaning and
    template kept."""
    return data.model_copy(update={
        "path": None, "train": str(files["train"]), "validation": None,
        "test": str(files.get("test")) if files.get("test") else None,
        "format": kind, "columns": ColumnsConfig(**COLUMNS[kind]),
        "label_map": None, "max_rows": None, "canaries": None,
        "split": SplitConfig(validation=data.split.validation, test=0.0, stratify=kind == "classification")})


def parent_rows(run: Run, kind: str) -> tuple[list[dict], list[dict]]:
    """The parent's training and test examples (validation where it had no test), as canonical rows
    of ``kind``."""
    config = run.load_config()
    config.data = config.data.model_copy(update={"canaries": None})
    data = Session(config).prepare()
    test = data.examples["test"] or data.examples["validation"]
    rows = PARENT_ROWS[kind]
    return [r for e in data.examples["train"] for r in rows(e)], [r for e in test for r in rows(e)]


def new_rows(kind: str, connection, ratings, adapter: str, labels: list[str], min_score: float,
             consensus: Consensus, instruction: str = "{text}") -> tuple[list[dict], Counter]:
    """The rated traffic as canonical rows of ``kind``, and what was left out, by reason."""
    if kind in ("classification", "chat"):
        return rated_rows(ratings, labels, min_score, consensus, instruction)
    left_out: dict[str, int] = {}
    marked = [{"prompt": r["prompt"], "completion": r["completion"], "label": r["label"]}
              for r in store_db.rated_answers(ratings, consensus, min_score, left_out)]
    if kind == "unpaired_preference":
        return marked, Counter(left_out)
    rows, skipped = rated_pairs(marked)
    chosen = [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]}
              for p in store_db.preference_pairs(connection, consensus, left_out)
              if adapter in (p["chosen_run"], p["rejected_run"])]
    return rows + chosen, skipped + Counter(left_out)


def score_files(loaded: tuple, files: dict[str, Path], by: dict[str, object] | None = None) -> dict[str, dict]:
    """A run's tuned model's metrics (``loaded``: what ``session.load_run`` gives) on every row of each
    canonical file, by its own objective or by the config ``by`` names for that file (a child's: its
    parent is scored as the child's objective)."""
    run, session, model = loaded
    labels = run.labels()
    scores = {}
    for name, path in files.items():
        config = (by or {}).get(name) or session.config
        scoring = file_session(config, path, labels)
        # An objective scored against the base model (``Abilities.reference``), for a model with no
        # adapter to disable: the base, loaded once and kept unchanged beside it while it is scored.
        base = scoring.load_model(labels) if abilities(config.objective.name).reference and \
            not session.method.disables else None
        scores[name] = scoring.score(model)
        del base
    return scores


def file_session(config, path: Path, labels: list[str]) -> Session:
    """A session of ``config`` whose every split is the canonical file ``path`` (every row is scored),
    prepared in the model's label order (a held-out slice may lack a label)."""
    scoring_config = config.model_copy(deep=True)
    scoring_config.data = canonical_data(config.data, {"train": path},
                                         data_kind(config.objective.name, labels)).model_copy(
        update={"split": SplitConfig(validation=0.0, test=0.0, stratify=False)})
    scoring = Session(scoring_config)
    data = scoring.prepare(labels or None)
    data.examples["test"], data.encoded["test"] = data.examples["train"], data.encoded["train"]
    return scoring


def judge_file(loaded: tuple, path: Path, config, judge: Judge, sampling: Sampling) -> dict:
    """A run's sampled answers (``loaded``: what ``session.load_run`` gives) to the distinct prompts of
    the canonical file ``path`` (framed as ``config`` frames them), scored by ``judge``
    (``judge.judge_answers``)."""
    run, _, model = loaded
    scoring = file_session(config, path, run.labels())
    _, prompts = held_out_prompts(scoring, sampling.prompts)
    return judge_answers(scoring, model, judge, sampling, prompts)


def train_child(config, parent: Path | None) -> Path:
    """The single training entry point of a retrain: the recipe, as ``tunesmith train --from PARENT``
    runs it (the child starts from the parent's weights and records it in its lineage), or, with no
    ``parent``, as ``tunesmith train`` (a child of another head, which starts from the base)."""
    return run_training(config, parent=parent)


def open_gate_judge(path: str | Path, label: str, objective: str, kind: str) -> Judge:
    """The judge of ``retrain --judge``: for a child that writes answers to prompts (chat rows, pairs,
    marked answers), not one scored on labels."""
    if why := lacks(objective, "causal_answers"):
        raise TunesmithError(f"--judge {path}: the judge scores sampled answers; a {objective} child writes none "
                             f"({why})")
    if kind == "classification":
        raise TunesmithError(f"--judge {path}: the run has labels; its children are gated on accuracy, not on "
                             "sampled answers")
    return load_judge(path, label, torch.device("cpu"), "--judge", "--judge-label")


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
            consensus: Consensus = Consensus(), objective: str | None = None,
            judge: str | Path | None = None, judge_label: str = "positive", judge_samples: int = 2) -> dict:
    """Re-train RUN on its rated traffic and promote the child only if the gate says so; ``objective``:
    the child's, when not its parent's; ``judge``: a run whose scores of sampled answers decide "better
    on the new data" (the module docstring)."""
    problems = [f"--holdout {holdout}: expected a share between 0 and 1"] if not 0 < holdout < 1 else []
    problems += [f"--replay {replay_ratio}: expected 0 or more"] if replay_ratio < 0 else []
    problems += [f"--tolerance {tolerance}: expected 0 or more"] if tolerance < 0 else []
    problems += [f"--judge-samples {judge_samples}: expected 1 or more"] if judge_samples < 1 else []
    if objective is not None and objective not in OBJECTIVES:
        problems.append(f"--objective {objective}: unknown objective; known: {', '.join(OBJECTIVES)}")
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
    objective = objective or parent_config.objective.name
    # A child of its parent's head continues it (train --from); one of another head starts from the base.
    fresh = abilities(objective).head != abilities(parent_config.objective.name).head
    if objective != parent_config.objective.name:
        # Another objective either trains the same model (a causal LM's answers), or is a reward model
        # of the parent's rated answers.
        ability = "scores_rewards" if fresh else "causal_answers"
        if why := lacks(parent_config.objective.name, "causal_answers") or lacks(objective, ability):
            raise TunesmithError(f"--objective {objective}: {run_dir} trained objective "
                                 f"{parent_config.objective.name}; a child of another objective needs a parent "
                                 "that writes a causal LM's answers, and writes them too (it continues the "
                                 f"parent) or scores them with a reward (it starts from the base) ({why})")
    if alias and (why := lacks(objective, "causal_answers")):
        raise TunesmithError(f"--alias {alias}: {why}; an alias names an adapter that tunesmith serve answers "
                             "with")
    with prefixed(f"--objective {objective}: "):
        kind = data_kind(objective, labels)
    if judge is not None:
        # Checked (and its problems named) before anything is trained; its model loads when it first scores.
        judge = open_gate_judge(judge, judge_label, objective, kind)
    adapter = adapter or run_dir.resolve().name
    store = Path(store) if store else store_db.default_path()
    if not store.is_file():
        raise TunesmithError(f"--store {store}: no store there (the server writes it; see --store)")
    with closing(store_db.connect(store)) as connection:
        ratings = store_db.served_ratings(connection, adapter, parse_since(since))
        rows, skipped = new_rows(kind, connection, ratings, adapter, labels, min_score, consensus,
                                 parent_config.data.instruction)
    original_train, original_test = parent_rows(parent, kind)
    # The original test set in the child's rows, scored the child's way for both; where the parent's
    # examples give no such rows (answers to imitate are no pairs), its own rows, scored its own way.
    test_config = None
    if not original_test and not fresh:
        test_config = parent_config
        original_test = parent_rows(parent, data_kind(parent_config.objective.name, labels))[1]
    rows, repeated = unseen(rows, original_test)
    if repeated:
        skipped["repeated_or_in_original_test"] = repeated
    if len(rows) < min_rows:
        why = ", ".join(f"{n} {reason}" for reason, n in skipped.items()) or "none left out"
        raise TunesmithError(f"adapter {adapter!r}: {len(rows)} usable rated answers ({kind} rows) in {store} ({why}); "
                             f"re-training needs at least {min_rows} (--min-rows)")
    Run(child_dir).check_new(resume=False)
    new_train, held = hold_out(rows, holdout, seed)
    replayed = replay(original_train, len(new_train), replay_ratio, seed)
    data_dir = child_dir.with_name(f"{child_dir.name}.data")
    if data_dir.exists():
        raise TunesmithError(f"{data_dir}: already exists; choose another child directory (--out)")
    files = {
        "train": write_rows(data_dir / "train.jsonl", new_train + replayed),
        "new": write_rows(data_dir / "new_heldout.jsonl", held),
    }
    if original_test:  # a reward model of a causal run's answers has no original pairs
        files["test"] = write_rows(data_dir / "original_test.jsonl", original_test)
    raw = parent_config.model_dump(mode="json")
    # The child's own report scores its test set: the original one in its rows, or else the held-out new rows.
    child_test = files["test"] if original_test and test_config is None else files["new"]
    raw["data"] = canonical_data(parent_config.data, {"train": files["train"], "test": child_test},
                                 kind).model_dump(mode="json")
    raw["output"]["dir"] = str(child_dir)
    if objective != parent_config.objective.name:
        raw["objective"] = {"name": objective, **abilities(objective).traffic_options}
    config = load_config(run_dir / "config.yaml", sets, raw=raw)
    train_child(config, None if fresh else run_dir)

    metric = "accuracy" if labels else abilities(objective).gate_metric
    if fresh:  # no parent of its kind: its own figures, the original pairs' (if any) recorded beside
        parent_scores = None
        evaluation = {"original": files["test"]} if "test" in files else {}
        child_scores = score_files(load_run(child_dir), {**evaluation, "new": files["new"]})
        decision = decide_first(child_scores, metric)
    else:
        evaluation = {"original": files["test"], "new": files["new"]}
        scored_by = {"original": test_config or config, "new": config}
        # Parent and child answer the held-out new prompts from the same seeds; the judge scores both.
        sampling = None if judge is None else Sampling(prompts=len({input_of(r) for r in held}),
                                                       samples_per_prompt=judge_samples, seed=seed)
        scored, judged = {}, {}
        for side, path in (("parent", run_dir), ("child", child_dir)):
            loaded = load_run(path)  # once a side, for its scores and its judged answers
            scored[side] = score_files(loaded, evaluation, scored_by)
            if judge is not None:
                judged[side] = judge_file(loaded, files["new"], config, judge, sampling)
            del loaded
        parent_scores, child_scores = scored["parent"], scored["child"]
        if judge is None:
            decision = decide(parent_scores, child_scores, metric, tolerance)
        else:
            for scores, side in ((parent_scores, "parent"), (child_scores, "child")):
                scores["new"][JUDGED] = judged[side]["mean_reward"]
            Run(child_dir).save_json("retrain_judged", {"judge": str(judge.path), "label": judge.label,
                                                        "sampling": asdict(sampling), **judged})
            decision = decide(parent_scores, child_scores, metric, tolerance, new_metric=JUDGED)
    record = {
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "parent": str(run_dir.resolve()),
        "child": str(child_dir.resolve()), "adapter": adapter, "store": str(store), "since": since,
        "objective": config.objective.name, "started_from": "base" if fresh else "parent",
        "rated_rows": len(rows), "left_out": dict(skipped), "new_train_rows": len(new_train),
        "consensus": {"min_raters": consensus.min_raters, "agreement": consensus.agreement},
        "held_out_rows": len(held), "replay_rows": len(replayed), "data_kind": kind,
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
