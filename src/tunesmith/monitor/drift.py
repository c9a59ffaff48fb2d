"""``tunesmith monitor RUN``: compare the prompts a run was served with its training inputs.

Steps: the run's training inputs (its own data, read through its config, without canaries) and the
prompts logged under its adapter name since a time; both capped at a seeded sample; embeddings from
the run's tuned model; the MMD permutation test and the domain classifier; length, unknown-token
and (for runs with labels) answer-label statistics; the report. Drift is declared when both tests
agree (MMD p-value below ``alpha`` and AUC above ``auc_threshold``), so noise in one of them alone
does not page anyone; the report shows each.
"""

from __future__ import annotations

import random
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.monitor.embed import embed
from tunesmith.monitor.report import write_report
from tunesmith.monitor.stats import domain_auc, mmd_test
from tunesmith.monitor.traffic import label_shares, parse_since, served, text_stats
from tunesmith.session import Session, load_run
from tunesmith.store import db as store_db


@dataclass(frozen=True)
class Thresholds:
    alpha: float = 0.05  # MMD: drift when the p-value is below this
    auc: float = 0.55  # domain classifier: drift above this (Evidently's default)
    min_prompts: int = 20  # fewer logged prompts than this: no verdict
    max_examples: int = 500  # per side, a seeded sample
    permutations: int = 200


def training_inputs(session: Session) -> tuple[list[str], list[str]]:
    """The user's own input text of every training example (no template, no canaries) and its labels."""
    config = session.config
    config.data = config.data.model_copy(update={"canaries": None})
    data = Session(config).prepare()
    train = data.examples["train"]
    return [e["_input"] for e in train], [e["label"] for e in train if "label" in e]


def _sample(items: list, n: int, seed: int) -> list:
    return items if len(items) <= n else random.Random(seed).sample(items, n)


def monitor_run(run_dir: str | Path, out: str | Path | None = None, store: str | Path | None = None,
                adapter: str | None = None, since: str | None = None,
                thresholds: Thresholds = Thresholds(), seed: int = 0) -> dict:
    """Test the run's served prompts for drift; writes report.md, monitor.json and plots to ``out``
    (a new folder; by default runs/monitor/ADAPTER-TIME)."""
    problems = [f"--alpha {thresholds.alpha}: expected a p-value between 0 and 1"] if not 0 < thresholds.alpha < 1 else []
    problems += [f"--auc-threshold {thresholds.auc}: expected an AUC between 0.5 and 1"] if not 0.5 <= thresholds.auc < 1 else []
    if thresholds.permutations < 100:
        problems.append(f"--permutations {thresholds.permutations}: at least 100, for a p-value near 0.05 to mean something")
    if problems:
        raise TunesmithError(*problems)
    adapter = adapter or Path(run_dir).resolve().name
    out = Path(out) if out else Path("runs") / "monitor" / f"{adapter}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    if out.exists():
        raise TunesmithError(f"--out {out}: already exists; choose a new folder for this report")
    store = Path(store) if store else store_db.default_path()
    if not store.is_file():
        raise TunesmithError(f"--store {store}: no store there (the server writes it; see --store)")
    start = parse_since(since)
    with closing(store_db.connect(store)) as connection:
        rows = served(connection, adapter, start)
    if len(rows) < thresholds.min_prompts:
        raise TunesmithError(
            f"adapter {adapter!r}: {len(rows)} logged prompts in {store}"
            + (f" since {since}" if since else "")
            + f"; drift needs at least {thresholds.min_prompts} (--min-prompts)")
    run, session, model = load_run(run_dir)
    train_texts, train_labels = training_inputs(session)
    prompts = [r["prompt"] for r in rows]
    reference = _sample(train_texts, thresholds.max_examples, seed)
    traffic = _sample(prompts, thresholds.max_examples, seed + 1)
    max_length = session.config.data.max_length
    x = embed(model, session.tokenizer, reference, max_length)
    y = embed(model, session.tokenizer, traffic, max_length)
    mmd = mmd_test(x, y, thresholds.permutations, seed)
    auc = domain_auc(x, y, seed=seed)
    result = {
        "run": str(run.path), "adapter": adapter, "store": str(store), "since": since,
        "first_prompt_at": rows[0]["created_at"], "last_prompt_at": rows[-1]["created_at"],
        "reference_examples": len(reference), "traffic_examples": len(traffic),
        "mmd2": mmd.mmd2, "mmd_p_value": mmd.p_value, "mmd_bandwidth": mmd.bandwidth,
        "permutations": thresholds.permutations, "alpha": thresholds.alpha,
        "domain_auc": auc, "auc_threshold": thresholds.auc,
        "mmd_drift": mmd.p_value < thresholds.alpha, "auc_drift": auc > thresholds.auc,
        "training": text_stats(session.tokenizer, reference), "traffic": text_stats(session.tokenizer, traffic),
    }
    result["drift"] = result["mmd_drift"] and result["auc_drift"]
    labels = run.labels()
    if labels:
        result["labels"] = {"training": label_shares(train_labels, labels),
                            "answers": label_shares([r["answer"] for r in rows], labels)}
    result["report"] = str(write_report(out, result, x, y, mmd.null))
    return result
