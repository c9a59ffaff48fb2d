"""The reports of PPO and GRPO runs: reward of base and tuned answers on held-out prompts (for GRPO,
each reward's too, such as the share of answers in the required format), win-rate, KL to the
reference, the curves and a few answers side by side. Judged evaluation (``judge.py``)
reports with the same pieces."""

from __future__ import annotations

import json
from pathlib import Path

# (metric, title) of each curve; a curve whose metric a run does not log is left out.
PPO_CURVES = (("reward", "mean reward"), ("kl", "KL to the reference (per answer)"),
              ("policy_loss", "policy loss"), ("value_loss", "value loss"))
GRPO_CURVES = (("reward", "mean reward"), ("loss", "loss"), ("kl", "KL to the reference (per answer)"),
               ("answer_len", "answer length (tokens)"))


def plot_curves(metrics_log: Path, out: Path, curves: tuple[tuple[str, str], ...]) -> bool:
    """``curves`` against the step, as one PNG. False when there is nothing."""
    rows = [json.loads(line) for line in metrics_log.read_text().splitlines() if line.strip()] \
        if metrics_log.is_file() else []
    curves = tuple((key, label) for key, label in curves if rows and key in rows[0])
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.5), squeeze=False)
    steps = [r["step"] for r in rows]
    for ax, (key, label) in zip(axes[0], curves):
        ax.plot(steps, [r[key] for r in rows], "o-" if len(rows) < 30 else "-")
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return True


def write_report(run_dir: Path, summary: dict, base: dict, tuned: dict, has_plot: bool, samples: int = 3) -> Path:
    m = summary
    out = [
        f"# tunesmith PPO run: {run_dir.name}",
        "",
        (f"Model `{m['model']}`, method `{m['method']}` with a value head: {m['trainable_params']:,} trainable "
         f"parameters of {m['total_params']:,}. Reward: `{m['reward_run']}`."),
        f"PPO steps: {m['steps']}, in {m['train_seconds']:.0f} s.",
        "",
        f"## Held-out prompts ({m['eval_prompts']}), one sampled answer each",
        "",
        "| | base | tuned |",
        "|---|---:|---:|",
        f"| mean reward | {m['base']['mean_reward']:.4f} | {m['tuned']['mean_reward']:.4f} |",
    ]
    return _write(run_dir, out, m, base, tuned, has_plot, samples, "reward, KL and losses")


def write_grpo_report(run_dir: Path, summary: dict, base: dict, tuned: dict, has_plot: bool,
                      samples: int = 3) -> Path:
    """GRPO's report: the held-out table (the total reward, each reward's mean, KL, answers that ended),
    the win-rate, the reward distributions, the curves and a few answers side by side."""
    m = summary
    names = list(m["tuned"].get("reward_means", {}))
    out = [
        f"# tunesmith GRPO run: {run_dir.name}",
        "",
        (f"Model `{m['model']}`, method `{m['method']}`: {m['trainable_params']:,} trainable parameters of "
         f"{m['total_params']:,}. Loss `{m['loss_type']}`, importance ratios per {m['importance']}, "
         f"{m['group']} answers per prompt."),
        "Rewards (summed with their weights): " + ", ".join(f"`{r}`" for r in m["rewards"]) + ".",
        f"GRPO steps: {m['steps']}, in {m['train_seconds']:.0f} s.",
        "",
        f"## Held-out prompts ({m['eval_prompts']}), one sampled answer each",
        "",
        "| | base | tuned |",
        "|---|---:|---:|",
        f"| mean reward (weighted sum) | {m['base']['mean_reward']:.4f} | {m['tuned']['mean_reward']:.4f} |",
        *(f"| `{n}` (mean score) | {m['base']['reward_means'][n]:.4f} | {m['tuned']['reward_means'][n]:.4f} |"
          for n in names),
    ]
    return _write(run_dir, out, m, base, tuned, has_plot, samples, "reward, loss, KL and answer length")


def side_by_side(base: dict, tuned: dict, n: int) -> list[str]:
    """Markdown lines: the first ``n`` prompts, each with the base and the tuned answer and their
    rewards; ``base`` and ``tuned`` hold ``prompts``, ``answers`` and ``rewards`` in the same order."""
    out = []
    for prompt, b, t, rb, rt in list(zip(base["prompts"], base["answers"], tuned["answers"], base["rewards"],
                                         tuned["rewards"]))[:n]:
        out += [f"**Prompt:** `{short(prompt)}`", "", f"- base ({rb:+.3f}): {short(b)}",
                f"- tuned ({rt:+.3f}): {short(t)}", ""]
    return out


def spread(name: str, values: list[float]) -> str:
    """``name`` and the minimum, quartiles and maximum of ``values``, on one line."""
    ordered = sorted(values)
    q = [ordered[min(len(ordered) - 1, int(f * len(ordered)))] for f in (0.0, 0.25, 0.5, 0.75)] + [ordered[-1]]
    return f"{name} min {q[0]:.3f} / q1 {q[1]:.3f} / median {q[2]:.3f} / q3 {q[3]:.3f} / max {q[4]:.3f}"


def short(text: str, limit: int = 300) -> str:
    """``text`` on one line, safe inside backticks, cut to ``limit`` characters."""
    text = text.replace("\n", " ⏎ ").replace("`", "'")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _write(run_dir: Path, out: list[str], m: dict, base: dict, tuned: dict, has_plot: bool, samples: int,
           curves: str) -> Path:
    """The rows every alignment report ends with (KL, answers that ended, win-rate, reward
    distributions, the curves, samples side by side), after ``out``; writes report.md."""
    out = [
        *out,
        f"| KL to the reference (per answer) | {m['base']['kl']:.4f} | {m['tuned']['kl']:.4f} |",
        f"| answers that ended | {m['base']['ended']:.2f} | {m['tuned']['ended']:.2f} |",
        "",
        f"Win-rate of tuned over base, judged by the reward: {100 * m['win_rate']:.1f}% (ties count half).",
        "",
        "Reward distribution: " + spread("base", base["rewards"]) + "; " + spread("tuned", tuned["rewards"]) + ".",
        "",
    ]
    if has_plot:
        out += ["## Curves", "", f"![{curves}](curves.png)", ""]
    out += ["## Samples", "", *side_by_side(base, tuned, samples)]
    path = run_dir / "report.md"
    path.write_text("\n".join(out))
    return path
