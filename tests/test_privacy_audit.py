"""Canaries and the memorisation audit: the maths on hand-made numbers, the canaries in the data, and
``tunesmith privacy audit`` on a tiny run."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from conftest import review_rows, write_config, write_jsonl
from tunesmith.data.canaries import CanaryConfig, canary_example, make_canaries, spell
from tunesmith.privacy.audit import roc_auc, tpr_at_fpr
from tunesmith.privacy.canaries import (
    RANDOM_BASELINE,
    candidate_secrets,
    exact_exposures,
    exposure_from_rank,
    extrapolated_exposures,
    ranks,
)

# --- exposure ---------------------------------------------------------------------------------


def test_exposure_of_a_rank():
    assert exposure_from_rank(1, 1024) == 10
    assert exposure_from_rank(1024, 1024) == 0
    assert exposure_from_rank(32, 1024) == 5


def test_exact_exposure_ranks_among_every_other_secret():
    others = np.arange(1, 1024, dtype=float)  # 1023 other secrets: a space of 1024
    # Most likely of all (rank 1), 32nd (31 others below it), least likely (rank 1024).
    canaries = np.array([0.5, 31.5, 2000.0])
    assert ranks(canaries, others).tolist() == [1, 32, 1024]
    assert exact_exposures(canaries, others).tolist() == [10, 5, 0]
    # A tie counts in the canary's favour.
    assert ranks(np.array([3.0]), others).tolist() == [3]


def test_extrapolated_exposure_reads_the_normal_cdf():
    sample = np.random.default_rng(0).normal(10.0, 2.0, 200_000)
    space = 10**6
    at_mean, two_below, far_below = extrapolated_exposures(np.array([10.0, 6.0, -100.0]), sample, space)
    assert at_mean == pytest.approx(1.0, abs=0.01)  # half the space is more likely
    phi = 0.5 * math.erfc(2 / math.sqrt(2))  # share below mean - 2 sd
    assert two_below == pytest.approx(-math.log2(phi), abs=0.02)
    assert far_below == pytest.approx(math.log2(space))  # capped: the canary ranks first at best


def test_a_secret_never_seen_scores_the_random_baseline_on_average():
    rng = np.random.default_rng(1)
    others = rng.normal(size=4095)
    unseen = rng.normal(size=20_000)  # drawn like the others: uniform ranks
    assert exact_exposures(unseen, others).mean() == pytest.approx(RANDOM_BASELINE, abs=0.05)


def test_candidates_are_the_whole_space_when_it_is_small():
    numbers, whole = candidate_secrets([3, 7], digits=2, candidates=1000)
    assert whole and len(numbers) == 98 and 3 not in numbers and 7 not in numbers
    numbers, whole = candidate_secrets([3, 7], digits=6, candidates=500, seed=1)
    assert not whole and len(set(numbers)) == 500 and not {3, 7} & set(numbers)
    assert numbers == candidate_secrets([3, 7], digits=6, candidates=500, seed=1)[0]


# --- membership inference ---------------------------------------------------------------------


def _pairwise_auc(pos, neg) -> float:
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_roc_auc_matches_the_pairwise_count():
    members, non_members = np.array([0.9, 0.8, 0.4, 0.4]), np.array([0.7, 0.4, 0.3, 0.1, 0.05])
    # By hand: 0.9 and 0.8 beat all 5 (10); each 0.4 beats 3 and ties 1 (2 x 3.5 = 7): 17 / 20.
    assert roc_auc(members, non_members) == pytest.approx(17 / 20)
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 20, 60).astype(float), rng.integers(0, 20, 40).astype(float)
    assert roc_auc(a, b) == pytest.approx(_pairwise_auc(a, b))
    assert roc_auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert roc_auc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 0.0


def test_tpr_at_one_percent_fpr():
    non_members = np.arange(200, dtype=float)  # 1% of 200: two false positives allowed
    members = np.array([199.5, 198.5, 197.5, 10.0])
    # The threshold is the third-highest non-member (197): 199 and 198 are the false positives
    # (1%), and three members of four score above it.
    assert tpr_at_fpr(members, non_members) == pytest.approx(3 / 4)
    # Fewer than 100 non-members: no false positive is allowed, the threshold is the highest one.
    assert tpr_at_fpr(np.array([5.0, 3.0]), np.array([1.0, 4.0])) == 0.5


# --- canaries in the data ---------------------------------------------------------------------


def test_canaries_are_distinct_and_seeded():
    cfg = CanaryConfig(count=3, repetitions=[1, 4, 16], digits=6, seed=5)
    canaries = make_canaries(cfg)
    assert [c.repetitions for c in canaries] == [1, 1, 1, 4, 4, 4, 16, 16, 16]
    assert len({c.secret for c in canaries}) == 9 and canaries == make_canaries(cfg)
    assert spell(481592, 6) == "4 8 1 5 9 2" and spell(7, 4) == "0 0 0 7"


def test_canary_config_is_checked():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="distinct counts"):
        CanaryConfig(repetitions=[4, 4])
    with pytest.raises(ValidationError):
        CanaryConfig(digits=1)


@pytest.mark.parametrize("fmt", ["text", "prompt_completion", "classification"])
def test_canaries_join_the_training_split_only(tmp_path, fmt):
    from tunesmith.data.options import DataConfig
    from tunesmith.data.pipeline import format_stats, load_splits

    rows = review_rows(60)
    if fmt == "prompt_completion":
        rows = [{"prompt": r["review"], "completion": r["sentiment"]} for r in rows]
    data = {"path": str(write_jsonl(tmp_path / "d.jsonl", rows)), "format": fmt,
            "columns": {"text": "review", "label": "sentiment"} if fmt != "prompt_completion" else {}}
    plain, _, _ = load_splits(DataConfig(**data))
    cfg = DataConfig(**data, canaries={"count": 2, "repetitions": [1, 4]})
    splits, _, stats = load_splits(cfg)
    assert len(splits["train"]) == len(plain["train"]) + 10
    assert splits["train"][: len(plain["train"])] == plain["train"]
    assert splits["validation"] == plain["validation"] and splits["test"] == plain["test"]
    added = splits["train"][len(plain["train"]):]
    secrets = [spell(c.secret, 6) for c in make_canaries(cfg.canaries)]
    form = "text" if fmt == "text" else "prompt_completion"
    expected = [canary_example("my secret code is", s, form) for s, n in zip(secrets, [1, 1, 4, 4]) for _ in range(n)]
    assert [{k: v for k, v in e.items() if k in ("text", "messages", "_input")} for e in added] == expected
    assert stats["canaries"] == {"secrets": 4, "rows": 10, "repetitions": [1, 4], "form": form}
    assert f"canaries: 4 secrets (x1, x4) in 10 training rows, as {form}" in format_stats(stats)
    if fmt == "classification":
        assert sum(stats["labels"]["train"].values()) == len(plain["train"])


def test_canaries_need_a_causal_objective(tmp_path, tiny_bert_dir, review_data):
    from tunesmith.config import load_config
    from tunesmith.errors import TunesmithError
    from tunesmith.session import Session

    path = write_config(tmp_path / "c.yaml", tiny_bert_dir, {**review_data, "canaries": {"count": 1}},
                        objective={"name": "classification"}, method={"name": "full"})
    with pytest.raises(TunesmithError, match="data.canaries: canaries are measured on causal LMs only"):
        Session(load_config(path)).prepare()


# --- the audit on a tiny run ------------------------------------------------------------------


@pytest.fixture(scope="module")
def canary_run(tmp_path_factory, tiny_model_dir):
    from tunesmith.cli import main

    tmp = tmp_path_factory.mktemp("audit")
    rows = [{"text": r["review"]} for r in review_rows(80)]
    data = {"path": str(write_jsonl(tmp / "t.jsonl", rows)), "format": "text", "max_length": 64,
            "canaries": {"count": 4, "repetitions": [1, 16], "digits": 6},
            "split": {"validation": 0.2, "test": 0.2}}
    config = write_config(tmp / "c.yaml", tiny_model_dir, data, method={"name": "full"},
                          train={"max_steps": 120, "lr": 0.01, "eval_every": 1000, "save_every": 1000})
    assert main(["train", str(config)]) == 0
    return tmp / "run"


def test_training_records_the_canaries_in_the_run(canary_run):
    from tunesmith.store import Run

    record = Run(canary_run).load_json("canaries")
    assert record["form"] == "text" and record["digits"] == 6
    assert [c["repetitions"] for c in record["canaries"]] == [1] * 4 + [16] * 4
    assert "canaries: 8 secrets (x1, x16) in 68 training rows, as text" in (canary_run / "report.md").read_text()


def test_privacy_audit_command(canary_run, capsys):
    from tunesmith.cli import main

    assert main(["privacy", "audit", str(canary_run), "--candidates", "300"]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == f"audit: {canary_run / 'privacy_audit.json'}"
    assert "| repetitions | canaries | exposure (mean) |" in out and "ROC-AUC" in out
    result = json.loads((canary_run / "privacy_audit.json").read_text())
    exposure = {g["repetitions"]: g for g in result["exposure"]["by_repetitions"]}
    assert result["exposure"]["method"] == "extrapolated" and result["exposure"]["candidates"] == 300
    # Sixteen repetitions are memorised; one is not, on this model and this many steps.
    assert exposure[16]["mean"] > exposure[1]["mean"] + 3
    assert exposure[16]["mean"] > exposure[16]["base_mean"] + 3
    membership, rows = result["membership"], json.loads((canary_run / "data_stats.json").read_text())["rows"]
    assert membership["members"] == rows["train"] - 68  # every training row but the canaries
    assert membership["non_members"] == rows["validation"] + rows["test"]
    assert 0 <= membership["auc"] <= 1 and 0 <= membership["tpr_at_1pct_fpr"] <= 1


def test_audit_of_a_run_without_canaries_reports_membership_only(tmp_path, tiny_model_dir, review_data, capsys):
    from tunesmith.cli import main

    config = write_config(tmp_path / "c.yaml", tiny_model_dir, review_data, train={"max_steps": 2})
    assert main(["train", str(config)]) == 0
    capsys.readouterr()
    assert main(["privacy", "audit", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "canary exposure: the run has no canaries" in out
    assert "exposure" not in json.loads((tmp_path / "run" / "privacy_audit.json").read_text())


def test_small_secret_spaces_are_ranked_exactly(tmp_path, tiny_model_dir, review_data, capsys):
    from tunesmith.cli import main

    # Label data on a causal LM: the canaries join it as prompt/completion pairs without a label.
    data = {**review_data, "canaries": {"count": 2, "repetitions": [1, 16], "digits": 3}}
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, data, method={"name": "full"},
                          train={"max_steps": 60, "lr": 0.01, "eval_every": 1000, "save_every": 1000})
    assert main(["train", str(config)]) == 0
    assert main(["privacy", "audit", str(tmp_path / "run"), "--candidates", "1000"]) == 0
    assert json.loads((tmp_path / "run" / "labels.json").read_text()) == ["negative", "positive"]
    assert "exact: all 1,000 secrets scored, less the run's other canaries" in capsys.readouterr().out
    exposure = json.loads((tmp_path / "run" / "privacy_audit.json").read_text())["exposure"]
    assert exposure["method"] == "exact" and exposure["candidates"] == 996  # the space less the 4 canaries
    by_reps = {g["repetitions"]: g["mean"] for g in exposure["by_repetitions"]}
    assert by_reps[16] > by_reps[1]
    # Each canary is ranked among itself and the 996 others: exposure = log2(997 / rank).
    for c in exposure["canaries"]:
        rank = 997 / 2 ** c["exposure"]
        assert rank == pytest.approx(round(rank), abs=1e-6)



def test_the_audit_goes_into_the_report_once_beside_other_runs(tmp_path, tiny_model_dir, review_data, capsys):
    from tunesmith.cli import main

    for name in ("a", "b"):
        config = write_config(tmp_path / f"{name}.yaml", tiny_model_dir, review_data,
                              train={"max_steps": 2}, output={"dir": str(tmp_path / name)})
        assert main(["train", str(config)]) == 0
    # An unaudited run to compare with is refused before the audit starts.
    assert main(["privacy", "audit", str(tmp_path / "a"), "--against", str(tmp_path / "b")]) == 2
    assert "--against" in capsys.readouterr().err and not (tmp_path / "a" / "privacy_audit.json").exists()
    assert main(["privacy", "audit", str(tmp_path / "b")]) == 0
    for _ in range(2):  # a second audit replaces the section
        assert main(["privacy", "audit", str(tmp_path / "a"), "--against", str(tmp_path / "b")]) == 0
    report = (tmp_path / "a" / "report.md").read_text()
    assert report.count("## Memorisation audit") == 1 and "ROC-AUC" in report
    table = report[report.index("| run | DP-SGD |"):].splitlines()
    assert [row.split(" | ")[0] for row in table[2:4]] == ["| a", "| b"]
    assert "## Memorisation audit" in (tmp_path / "b" / "report.md").read_text()


def test_comparison_names_each_runs_budget():
    from tunesmith.privacy.audit import format_comparison

    private = {"epsilon": 7.98, "delta": 1e-5, "noise_multiplier": 0.61, "max_grad_norm": 1.0}
    audit = {"membership": {"auc": 0.51, "tpr_at_1pct_fpr": 0.012},
             "exposure": {"by_repetitions": [{"repetitions": 1, "mean": 1.2}, {"repetitions": 16, "mean": 2.5}]}}
    table = format_comparison([("dp", {"privacy": private, "tuned": {"accuracy": 0.81}}, audit),
                               ("plain", {"tuned": {"accuracy": 0.83}}, {"membership": {"auc": 0.6, "tpr_at_1pct_fpr": 0.05}})])
    assert table.splitlines() == [
        "| run | DP-SGD | test accuracy | MIA ROC-AUC | TPR at 1% FPR | exposure x1 | exposure x16 |",
        "|---|---|---|---|---|---|---|",
        "| dp | epsilon 7.98, delta 1e-05, noise 0.61, clip 1 | 0.8100 | 0.510 | 0.012 | 1.20 | 2.50 |",
        "| plain | none | 0.8300 | 0.600 | 0.050 | - | - |",
    ]


def test_replace_section(tmp_path):
    from tunesmith.eval.report import replace_section

    report = tmp_path / "report.md"
    report.write_text("# run\n\n## Test metrics\n\nx\n\n## Data\n\ny\n")
    replace_section(report, "Test metrics", "z")
    replace_section(report, "Audit", "a")
    replace_section(report, "Audit", "b")
    assert report.read_text() == "# run\n\n## Test metrics\n\nz\n\n## Data\n\ny\n\n## Audit\n\nb\n"
