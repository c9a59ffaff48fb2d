"""The drift report: report.md with the figures and verdicts, monitor.json for scripts, and plots
(the embeddings projected on their first two principal components, token lengths, and the MMD's
permutation distribution against the observed value)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_embeddings(x: torch.Tensor, y: torch.Tensor, path: Path) -> None:
    pooled = torch.cat([x, y])
    centred = pooled - pooled.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    points = (centred @ v[:2].T).numpy()
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.scatter(points[: len(x), 0], points[: len(x), 1], s=8, alpha=0.5, label="training inputs")
    ax.scatter(points[len(x):, 0], points[len(x):, 1], s=8, alpha=0.5, label="served prompts")
    ax.set_xlabel("principal component 1")
    ax.set_ylabel("principal component 2")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_lengths(train: list[int], traffic: list[int], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = range(0, max([*train, *traffic, 1]) + 2, max(1, max([*train, *traffic, 1]) // 30))
    ax.hist(train, bins=bins, alpha=0.5, density=True, label="training inputs")
    ax.hist(traffic, bins=bins, alpha=0.5, density=True, label="served prompts")
    ax.set_xlabel("tokens")
    ax.set_ylabel("share")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_null(null: list[float], observed: float, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(null, bins=30, alpha=0.7, label="permuted samples")
    ax.axvline(observed, color="red", label="observed")
    ax.set_xlabel("squared MMD")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _yes(flag: bool) -> str:
    return "drift" if flag else "no drift"


def write_report(out: Path, result: dict, x: torch.Tensor, y: torch.Tensor, null: list[float]) -> Path:
    """Write report.md, monitor.json and the plots into the new folder ``out``; returns report.md."""
    out.mkdir(parents=True)
    plot_embeddings(x, y, out / "embeddings.png")
    plot_lengths(result["training"]["lengths"], result["traffic"]["lengths"], out / "lengths.png")
    plot_null(null, result["mmd2"], out / "mmd_null.png")
    figures = {**result, "training": {k: v for k, v in result["training"].items() if k != "lengths"},
               "traffic": {k: v for k, v in result["traffic"].items() if k != "lengths"}}
    (out / "monitor.json").write_text(json.dumps(figures, indent=1))
    train, traffic = figures["training"], figures["traffic"]
    lines = [
        f"# Drift report: {result['adapter']}",
        "",
        f"**{_yes(result['drift']).upper()}** (drift is declared when both tests agree).",
        "",
        (f"Run `{result['run']}`; {traffic['count']} served prompts from `{result['store']}` "
         f"({_time(result['first_prompt_at'])} to {_time(result['last_prompt_at'])}) against "
         f"{train['count']} training inputs, embedded by the run's tuned model (mean of last hidden states)."),
        "",
        "| test | figure | threshold | verdict |",
        "|---|---|---|---|",
        (f"| MMD, RBF kernel (bandwidth {result['mmd_bandwidth']:.4g}), {result['permutations']} permutations "
         f"| MMD² {result['mmd2']:.4g}, p = {result['mmd_p_value']:.4f} | p < {result['alpha']} "
         f"| {_yes(result['mmd_drift'])} |"),
        (f"| domain classifier (logistic regression, 5-fold) | AUC {result['domain_auc']:.3f} "
         f"| > {result['auc_threshold']} | {_yes(result['auc_drift'])} |"),
        "",
        "| statistic | training inputs | served prompts |",
        "|---|---|---|",
        f"| texts | {train['count']} | {traffic['count']} |",
        f"| mean tokens | {train['mean_tokens']:.1f} | {traffic['mean_tokens']:.1f} |",
        f"| median tokens | {train['median_tokens']} | {traffic['median_tokens']} |",
        f"| unknown-token share | {train['unknown_share']:.4f} | {traffic['unknown_share']:.4f} |",
    ]
    if "labels" in result:
        lines += ["", "| label | share in training | share of the model's answers |", "|---|---|---|"]
        lines += [f"| {label} | {share:.3f} | {result['labels']['answers'][label]:.3f} |"
                  for label, share in result["labels"]["training"].items()]
    lines += ["", "![embeddings](embeddings.png)", "", "![token lengths](lengths.png)", "",
              "![MMD permutation distribution](mmd_null.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"
