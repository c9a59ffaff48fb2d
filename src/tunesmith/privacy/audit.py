"""What a tuned model memorised: canary exposure and membership inference (``tunesmith privacy audit``).

**Membership inference** asks how well an attacker who holds the base model can tell the rows a
model was trained on from rows it never saw. Its score for a row is the base model's loss minus
the tuned model's loss (mean per trained token): fine-tuning lowers the loss of the rows it
trained on more than that of others (the reference-model attack of Carlini et al., *Membership
Inference Attacks From First Principles*, 2022, in its simplest form, with the base model as the
one reference). Members are training rows, non-members the validation and test rows; the report
gives the ROC-AUC (0.5: no better than chance) and the true-positive rate at a 1% false-positive
rate, where a strong attack shows even when the AUC looks harmless.

**Canary exposure** is in ``privacy.canaries``.

The scores go through the objective's own per-example losses (``Batches.example_losses``), so
membership works for every objective; canaries exist on causal LMs only (``data.canaries``).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from contextlib import AbstractContextManager

import numpy as np
import torch

from tunesmith.data.canaries import canary_example, spell
from tunesmith.errors import TunesmithError
from tunesmith.objectives.base import to_device
from tunesmith.privacy.canaries import (
    RANDOM_BASELINE,
    candidate_secrets,
    exact_exposures,
    extrapolated_exposures,
)

FPR = 0.01


def roc_auc(members: np.ndarray, non_members: np.ndarray) -> float:
    """The probability that a random member scores above a random non-member (ties count half):
    the Mann-Whitney U statistic over the product of the class sizes."""
    scores = np.concatenate([members, non_members])
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts  # 0-based rank of each distinct value's first occurrence
    average_rank = first + (counts + 1) / 2  # 1-based ranks, ties sharing their mean
    member_ranks = average_rank[inverse[: len(members)]].sum()
    n, m = len(members), len(non_members)
    return float((member_ranks - n * (n + 1) / 2) / (n * m))


def tpr_at_fpr(members: np.ndarray, non_members: np.ndarray, fpr: float = FPR) -> float:
    """The share of members scored above the highest threshold that flags at most ``fpr`` of the
    non-members. With fewer than 1 / fpr non-members, no false positive is allowed at all."""
    allowed = int(np.floor(fpr * len(non_members)))
    threshold = np.sort(non_members)[::-1][allowed]  # the (allowed+1)-th highest non-member score
    return float(np.mean(members > threshold))


@torch.no_grad()
def example_losses(objective, model, items: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Each item's summed loss (its log-perplexity, in nats) and what it is summed over (trained
    tokens; examples for a classifier), in the objective's own terms."""
    sums = torch.zeros(len(items), dtype=torch.float64)
    counts = torch.zeros(len(items), dtype=torch.float64)
    if not items:
        return sums.numpy(), counts.numpy()
    view = objective.batches(items)
    was_training = model.training
    model.eval()
    for rows in view.epoch(-1):
        index, s, n = view.example_losses(model, to_device(view.tensors(rows), model))
        sums.index_add_(0, index.cpu(), s.double().cpu())
        counts.index_add_(0, index.cpu(), n.double().cpu())
    model.train(was_training)
    return sums.numpy(), counts.numpy()


def mean_losses(objective, model, items: list[dict]) -> np.ndarray:
    """Each item's loss per trained token (per example for a classifier)."""
    sums, counts = example_losses(objective, model, items)
    return sums / np.maximum(counts, 1)


def _sample(items: list[dict], n: int, seed: int) -> list[dict]:
    return items if len(items) <= n else random.Random(seed).sample(items, n)


def _encode_secrets(session, record: dict, secrets: list[str]) -> list[dict]:
    encoder = getattr(session.objective, "encoder", None)
    if encoder is None:
        raise TunesmithError("privacy audit: canaries are measured on causal LMs only")
    items = []
    for secret in secrets:
        example = canary_example(record["prefix"], secret, record["form"])
        encoded = encoder.encode_text(example) if record["form"] == "text" else [encoder.encode(example)]
        if len(encoded) != 1 or encoded[0] is None:
            raise TunesmithError(f"privacy audit: a canary does not fit in data.max_length "
                                 f"({session.config.data.max_length} tokens)")
        items += encoded
    return items


def audit(session, model, base: Callable[[], AbstractContextManager], canaries: dict | None,
          candidates: int = 1000, max_examples: int = 1000, seed: int = 0) -> dict:
    """Membership inference, and canary exposure when the run has canaries.

    Args:
        session: the run's session, prepared (its data read) without canaries.
        model: the tuned model.
        base: gives a context in which the base model is at hand (the tuned one with its adapters
            disabled, or a fresh copy).
        canaries: the run's ``canaries.json``, or None.
        candidates: secrets scored per template: all of them when the space is no larger.
        max_examples: members, and non-members, scored at most (a seeded sample).
    """
    data, objective = session.data, session.objective
    members = _sample(data.encoded["train"], max_examples, seed)
    non_members = _sample(data.encoded["validation"] + data.encoded["test"], max_examples, seed)
    if len(members) < 2 or len(non_members) < 2:
        raise TunesmithError("privacy audit: membership inference needs training rows and held-out "
                             "(validation or test) rows")
    secrets, sample, whole = [], [], False
    if canaries:
        values = [int(c["secret"].replace(" ", "")) for c in canaries["canaries"]]
        numbers, whole = candidate_secrets(values, canaries["digits"], candidates, seed)
        secrets = _encode_secrets(session, canaries, [c["secret"] for c in canaries["canaries"]])
        sample = _encode_secrets(session, canaries, [spell(s, canaries["digits"]) for s in numbers])

    def scores(m) -> dict:
        return {"members": mean_losses(objective, m, members), "non_members": mean_losses(objective, m, non_members),
                "canaries": example_losses(objective, m, secrets)[0],
                "candidates": example_losses(objective, m, sample)[0]}

    tuned = scores(model)
    with base() as base_model:
        before = scores(base_model)
    in_score = before["members"] - tuned["members"]
    out_score = before["non_members"] - tuned["non_members"]
    result = {"membership": {
        "score": "base loss - tuned loss, per trained token",
        "members": len(members), "non_members": len(non_members),
        "auc": roc_auc(in_score, out_score), "tpr_at_1pct_fpr": tpr_at_fpr(in_score, out_score),
    }}
    if canaries:
        result["exposure"] = _exposure(canaries, tuned, before, len(sample), whole)
    return result


def _exposure(record: dict, tuned: dict, base: dict, candidates: int, whole: bool) -> dict:
    space = 10 ** record["digits"]

    def exposures(s: dict) -> np.ndarray:
        if whole:
            return exact_exposures(s["canaries"], s["candidates"])
        return extrapolated_exposures(s["canaries"], s["candidates"], space)

    after, before = exposures(tuned), exposures(base)
    per_canary = [
        {"secret": c["secret"], "repetitions": c["repetitions"], "exposure": float(a), "base_exposure": float(b),
         "log_perplexity": float(lp)}
        for c, a, b, lp in zip(record["canaries"], after, before, tuned["canaries"])
    ]
    groups = []
    for reps in sorted({c["repetitions"] for c in per_canary}):
        group = [c for c in per_canary if c["repetitions"] == reps]
        values = [c["exposure"] for c in group]
        groups.append({"repetitions": reps, "canaries": len(group), "mean": float(np.mean(values)),
                       "min": min(values), "max": max(values),
                       "base_mean": float(np.mean([c["base_exposure"] for c in group]))})
    return {
        "method": "exact" if whole else "extrapolated",
        "space": space, "candidates": candidates, "max": float(np.log2(space)), "random_baseline": RANDOM_BASELINE,
        "by_repetitions": groups, "canaries": per_canary,
    }


def format_audit(result: dict) -> str:
    """The audit as the terminal (and docs/privacy.md) shows it."""
    m = result["membership"]
    lines = [
        f"membership inference ({m['score']}; {m['members']} training rows, {m['non_members']} held-out rows)",
        f"  ROC-AUC {m['auc']:.3f}  TPR at 1% FPR {m['tpr_at_1pct_fpr']:.3f}  (chance: 0.500, 0.010)",
    ]
    e = result.get("exposure")
    if e is None:
        lines.append("canary exposure: the run has no canaries (data.canaries)")
        return "\n".join(lines)
    how = (f"exact: all {e['space']:,} secrets scored, less the run's other canaries" if e["method"] == "exact"
           else f"extrapolated from {e['candidates']:,} sampled secrets of {e['space']:,}")
    lines += [
        (f"canary exposure in bits ({how}; at most {e['max']:.1f}, a secret never trained on scores "
         f"{e['random_baseline']:.2f} on average)"),
        "",
        "| repetitions | canaries | exposure (mean) | min | max | base model (mean) |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {g['repetitions']} | {g['canaries']} | {g['mean']:.2f} | {g['min']:.2f} | {g['max']:.2f} | "
              f"{g['base_mean']:.2f} |" for g in e["by_repetitions"]]
    return "\n".join(lines)


def format_comparison(rows: list[tuple[str, dict, dict]]) -> str:
    """Runs side by side, each a (name, metrics.json, privacy_audit.json): their privacy budget,
    test accuracy, membership inference and canary exposure by repetition count."""
    reps = sorted({g["repetitions"] for _, _, a in rows for g in a.get("exposure", {}).get("by_repetitions", [])})
    head = ["run", "DP-SGD", "test accuracy", "MIA ROC-AUC", "TPR at 1% FPR"] + [f"exposure x{r}" for r in reps]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, metrics, result in rows:
        p = metrics.get("privacy")
        dp = ("none" if p is None else
              f"epsilon {p['epsilon']:.3g}, delta {p['delta']:g}, noise {p['noise_multiplier']:.3g}, "
              f"clip {p['max_grad_norm']:g}" if p["epsilon"] is not None else "noise 0 (no privacy)")
        accuracy = metrics.get("tuned", {}).get("accuracy")
        m = result["membership"]
        groups = {g["repetitions"]: g["mean"] for g in result.get("exposure", {}).get("by_repetitions", [])}
        cells = [name, dp, "-" if accuracy is None else f"{accuracy:.4f}", f"{m['auc']:.3f}",
                 f"{m['tpr_at_1pct_fpr']:.3f}"] + [f"{groups[r]:.2f}" if r in groups else "-" for r in reps]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
