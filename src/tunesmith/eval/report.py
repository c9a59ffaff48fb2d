"""The run report: before/after table, data statistics, loss curves and samples, as markdown."""

from __future__ import annotations

import json
from pathlib import Path

from tunesmith.data.pipeline import format_stats
from tunesmith.eval.metrics import METRICS



def plot_losses(metrics_log: Path, out: Path) -> bool:
    """Training and validation loss against step, as a PNG. False when there is nothing to plot."""
    rows = [json.loads(line) for line in metrics_log.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train", alpha=0.7)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per trained token")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return True


def metrics_table(base: dict, tuned: dict, names: tuple[str, str] = ("base", "tuned")) -> str:
    lines = [f"| metric | {names[0]} | {names[1]} | change |", "|---|---:|---:|---:|"]
    for key, metric in METRICS.items():
        if key in base and key in tuned:
            delta = tuned[key] - base[key]
            lines.append(f"| {metric.label} | {base[key]:.4f} | {tuned[key]:.4f} | {delta:+.4f} |")
    # Mixed data (data.sources): SOURCE/metric, one row each.
    for key in (k for k in tuned if "/" in k and k in base):
        source, metric = key.rsplit("/", 1)
        name = f"{source}: {METRICS[metric].label if metric in METRICS else metric}"
        lines.append(f"| {name} | {base[key]:.4f} | {tuned[key]:.4f} | {tuned[key] - base[key]:+.4f} |")
    return "\n".join(lines)


def write_report(run_dir: Path, summary: dict, stats: dict, samples: list[dict], has_plot: bool,
                 sections: list[str] = ()) -> Path:
    """``summary`` holds model, method, parameters, training figures and the base/tuned metrics;
    ``sections`` are markdown lines that follow the metrics (a parent run, forgetting)."""
    m = summary
    out = [
        f"# tunesmith run: {run_dir.name}",
        "",
        f"Model `{m['model']}`, method `{m['method']}`: {m['trainable_params']:,} trainable parameters "
        f"of {m['total_params']:,} ({100 * m['trainable_params'] / m['total_params']:.2f}%).",
        f"Trained {m['steps']} steps in {m['train_seconds']:.0f} s "
        f"({m['tokens_per_s']:.0f} tokens/s); held-out test set: {m['test_examples']} examples.",
        "",
        "## Test metrics, base model and tuned model",
        "",
        metrics_table(m["base"], m["tuned"]),
        "",
    ]
    if "privacy" in m:
        out += ["## Privacy", "", privacy_line(m["privacy"]) + ".", "",
                "The guarantee is for one training example (one row of the data) and covers the trained "
                "weights. It does not cover what the run computes from the data directly: the training loss "
                "in metrics.jsonl, the data statistics, and the evaluation on the validation and test splits.",
                ""]
    out += list(sections)
    if has_plot:
        out += ["## Loss curves", "", "![loss curves](loss.png)", ""]
    out += ["## Data", "", "```", format_stats(stats), "```", ""]
    if samples:
        out += ["## Samples (greedy, held-out prompts)", ""]
        for s in samples:
            out += [f"**Prompt:** `{_short(s['prompt'])}`", "",
                    f"- expected: {s['expected']}", f"- base: {s['base']}", f"- tuned: {s['tuned']}", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(out))
    return path


def replace_section(report: Path, title: str, body: str) -> None:
    """Put ``## title`` with ``body`` into the report: in place of that section if it is there (up to
    the next ``## `` heading), else at the end. Commands run after training (the privacy audit) add
    their findings this way, and running them again replaces rather than repeats them."""
    lines = report.read_text().splitlines()
    heading = f"## {title}"
    section = [heading, "", body.rstrip(), ""]
    if heading in lines:
        start = lines.index(heading)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = section
    else:
        lines += ([""] if lines and lines[-1] else []) + section
    report.write_text("\n".join(lines).rstrip("\n") + "\n")


def privacy_line(p: dict) -> str:
    """One sentence from metrics.json's ``privacy`` record."""
    spent = f"epsilon {p['epsilon']:.3g}" if p["epsilon"] is not None else "no privacy (noise multiplier 0)"
    return (f"DP-SGD: {spent} at delta {p['delta']:g} after {p['steps']} steps ({p['accountant'].upper()} "
            f"accountant); noise multiplier {p['noise_multiplier']:.4g}, per-example clipping norm "
            f"{p['max_grad_norm']:g}, Poisson sample rate {p['sample_rate']:.4g} "
            f"({p['expected_batch_size']} examples per batch on average)")


def _short(text: str, limit: int = 300) -> str:
    text = text.replace("\n", " ⏎ ").replace("`", "'")
    return text if len(text) <= limit else text[: limit - 1] + "…"
