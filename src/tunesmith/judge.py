"""Judged evaluation of a generative run: the tuned model and its base answer the same held-out
prompts, a judge run (a reward model or a classifier) scores every answer, and the report gives the
win-rate of tuned over base and the KL of the tuned model to the reference.

- Prompts: the run's held-out split (test, else validation), each framed as the run framed its
  prompts in training (chat template, system prompt). A DPO run's prompts are those of its
  preference pairs; a causal run's are its examples' inputs.
- Answers: ``samples_per_prompt`` sampled answers per prompt from each model, plain sampling at
  ``temperature``. Each answer has its own seed, from the run's seed, the prompt's place and the
  answer's number (``answer_seed``): a model identical to its base gives identical answers, and an
  answer does not depend on the prompts sampled beside it, so the prompts can be split across
  processes (``judge_model``) without changing the figures. (Before, one random stream ran over every
  prompt: figures measured then differ from a rerun's by sampling noise.)
- Base and reference: the tuned model with its adapter disabled (no second copy), or for methods
  without one (full fine-tuning) the base model loaded again from the run's model name.
- Win-rate: the tuned answer against the base answer of the same prompt and sample number, by the
  judge's scores; a tie counts half.
- KL: for each answer, the sum over its tokens of ``log pi(token) - log pi_ref(token)`` under the
  sampling distribution, averaged over answers. For the tuned answers it is the usual sampled
  estimate of KL(tuned || reference); for the base answers it is the base against itself, 0 up to
  rounding: a check that the reference is the base.

The judge is read in one place, ``load_judge``, through ``align.rewards.load_reward``.
"""

from __future__ import annotations

import functools
import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.align.report import side_by_side, spread
from tunesmith.align.rewards import RewardFn, check_reward, load_reward
from tunesmith.align.rollout import Rollout, answer_texts, model_logprobs, sample
from tunesmith.errors import TunesmithError
from tunesmith.eval.report import replace_section
from tunesmith.objectives import lacks
from tunesmith.session import Session, base_model, load_run
from tunesmith.store import Run
from tunesmith.train import distributed

# Prompts sampled together: bounds the KV cache and the logits held at once.
CHUNK = 8
SECTION = "Judged by "


@dataclass(frozen=True)
class Sampling:
    """How the answers are drawn: the same for the tuned model and the base."""

    prompts: int = 40
    samples_per_prompt: int = 2
    max_new_tokens: int = 48
    temperature: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class Judge:
    """A judge run, ready to score ``(prompts, answers)``."""

    path: Path
    label: str | None  # the label whose log-odds is the score; None for a reward model
    score: RewardFn


def load_judge(path: str | Path, label: str, device, field: str = "--by", label_field: str = "--label") -> Judge:
    """The judge run at ``path`` (a reward model, a classifier, or a causal run on label data), for
    ``device``. Its problems are one line each, naming ``field`` or ``label_field``, found now; its
    model is loaded when it first scores, so a judge named in a training config is checked before
    training but not held in memory beside the model while it trains."""
    with _named(field, label_field):
        check_reward(path, label)

    @functools.cache
    def reward() -> RewardFn:
        with _named(field, label_field):
            return load_reward(path, label, device)

    return Judge(Path(path), label if Run(path, writer=False).labels() else None,
                 lambda prompts, answers: reward()(prompts, answers))


@contextmanager
def _named(field: str, label_field: str):
    try:
        yield
    except TunesmithError as err:
        raise TunesmithError(*(_renamed(p, field, label_field) for p in err.problems)) from None


def _renamed(problem: str, field: str, label_field: str) -> str:
    # load_reward names PPO's fields; here the judge is given by another.
    for theirs, ours in (("ppo.reward_label:", label_field), ("ppo.reward:", field)):
        if problem.startswith(theirs):
            return f"{ours}:{problem[len(theirs):]}"
    return problem


def open_judge(session: Session) -> Judge | None:
    """The judge of a config's ``eval.judge`` (None without one), checked and loaded before training
    starts, so that a bad judge stops the run before anything is trained."""
    config = session.config
    if not config.eval.judge:
        return None
    held_out_prompts(session, 1)
    return load_judge(config.eval.judge, config.eval.judge_label, _device(), "eval.judge", "eval.judge_label")


def held_out_prompts(session: Session, n: int) -> tuple[str, list[dict]]:
    """``(split, prompts)``: up to ``n`` distinct prompts of the held-out split, each ``{shown, framed}``:
    the user's turn, and the text the model reads before its answer."""
    data = session.data
    split = "test" if data.examples["test"] else "validation"
    encoder = session.objective.encoder
    prompts = {}
    for example in data.examples[split]:
        if "messages" in example and len(prompts) < n:
            shown = next(m["content"] for m in reversed(example["messages"]) if m["role"] != "assistant")
            prompts.setdefault(encoder.prompt_text(example), shown)
    if not prompts:
        raise TunesmithError(f"judged evaluation: the run's held-out ({split}) split has no chat or "
                             "prompt/completion examples: no prompts to answer")
    return split, [{"shown": shown, "framed": framed} for framed, shown in prompts.items()]


def judge_run(run_dir: str | Path, judge_dir: str | Path, label: str = "positive", prompts: int = 40,
              samples_per_prompt: int = 2, max_new_tokens: int = 48, temperature: float = 1.0,
              seed: int = 0) -> dict:
    """Judge a finished run (``tunesmith judge``): writes judged.json, judged.png, the report's
    "Judged by JUDGE" section and metrics.json's ``judged`` entry; returns what judged.json holds."""
    run = _finished_generative_run(Path(run_dir))
    judge = load_judge(judge_dir, label, _device())
    _, session, model = load_run(run.path)
    session.prepare()
    sampling = Sampling(prompts, samples_per_prompt, max_new_tokens, temperature, seed)
    result = judge_model(session, model.to(_device()), run.labels(), judge, sampling)
    save_judged(run, result)
    run.save_json("metrics", {**run.load_json("metrics", {}), "judged": summary(result)})
    title, body = section(result)
    _rename_judged_section(run.report, title)
    replace_section(run.report, title, body)
    return result


def judge_trained(session: Session, model, judge: Judge, processes) -> dict | None:
    """Judge a model at the end of its training (``eval.judge``), as ``tunesmith judge`` would with
    its defaults, every process answering a share of the prompts; the main process gets the result
    (for ``write_judged``), the others None."""
    if processes.is_main_process:
        print(f"judged evaluation: answers of the tuned and the base model, scored by {judge.path} ...")
    return judge_model(session, model, session.data.labels, judge, Sampling(), processes)


def write_judged(run: Run, result: dict) -> tuple[dict, list[str]]:
    """Write judged.json and judged.png of a judged run; returns metrics.json's ``judged`` entry and
    the report's section, which the recipe writes with the rest."""
    save_judged(run, result)
    print(headline(result))
    title, body = section(result)
    return summary(result), [f"## {title}", "", body, ""]


def headline(result: dict) -> str:
    """One line: the win-rate, the mean rewards and the KL."""
    return (f"win-rate {100 * result['win_rate']:.1f}% over {result['answers']} answers; mean reward base "
            f"{result['base']['mean_reward']:.4f}, tuned {result['tuned']['mean_reward']:.4f}; KL to the reference "
            f"{result['tuned']['kl']:.4f} (base {result['base']['kl']:.4f})")


def _finished_generative_run(path: Path) -> Run:
    run = Run(path)
    if not path.is_dir():
        raise TunesmithError(f"{path}: no such run directory")
    config_file = path / "config.yaml"
    if not config_file.is_file():
        raise TunesmithError(f"{path}: not a tunesmith run directory (no config.yaml)")
    if kind := run.alignment():
        raise TunesmithError(f"{path} is a {kind.upper()} run: its own report judges it by its reward")
    status = run.status()
    if status != "complete":
        raise TunesmithError(f"{path}: the run is not complete (status: {status}); judge a finished run")
    objective = run.load_config().objective.name
    if why := lacks(objective, "causal_answers"):
        raise TunesmithError(f"{path} is a {objective} run: judged evaluation needs a run that writes answers ({why})")
    return run


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def judge_model(session: Session, model, labels: list[str], judge: Judge, sampling: Sampling,
                processes=None) -> dict | None:
    """Answers of ``model`` (tuned) and of its base to the held-out prompts of ``session`` (prepared),
    scored by ``judge``: the win-rate, and per side the mean reward, KL and every answer.

    With ``processes`` (accelerate's state; every process calls this), each process answers and
    scores a contiguous share of the chunks of prompts; the main process gets the result, the others
    None. Every answer has its own seed and every chunk is the same whatever the share, so the
    figures are one process's."""
    split, prompts = held_out_prompts(session, sampling.prompts)
    chunks = _chunks(len(prompts))
    if processes is None or processes.num_processes == 1:
        parts = [_judge_chunks(session, model, labels, judge, sampling, prompts, chunks)]
    else:
        parts = [p for p in distributed.scored_in_shares(
            lambda share: _judge_chunks(session, model, labels, judge, sampling, prompts, share), chunks, processes)
            if p is not None]
        if not processes.is_main_process:
            return None
    sides = {side: {k: [v for part in parts for v in part[side][k]] for k in parts[0][side]}
             for side in ("base", "tuned")}
    for side in sides.values():
        side.update(mean_reward=_mean(side["rewards"]), kl=_mean(side["kls"]), ended=_mean(side.pop("ends")))
    outcomes = [1.0 if t > b else 0.5 if t == b else 0.0
                for t, b in zip(sides["tuned"]["rewards"], sides["base"]["rewards"])]
    return {
        "judge": str(judge.path), "label": judge.label, "split": split, "reference": parts[0]["reference"],
        "prompts": len(prompts), "samples_per_prompt": sampling.samples_per_prompt, "answers": len(outcomes),
        "max_new_tokens": sampling.max_new_tokens, "temperature": sampling.temperature, "seed": sampling.seed,
        "win_rate": sum(outcomes) / len(outcomes), "wins": outcomes.count(1.0), "ties": outcomes.count(0.5),
        "losses": outcomes.count(0.0), **sides,
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _judge_chunks(session: Session, model, labels: list[str], judge: Judge, sampling: Sampling,
                  prompts: list[dict], chunks: list[range]) -> dict:
    """Both sides' answers to the prompts of ``chunks``, scored chunk by chunk: per side, each answer's
    prompt, text, reward, KL and whether it ended."""
    tokenizer = session.tokenizer
    ids, device = _framed_ids(tokenizer, prompts), next(model.parameters()).device
    with _in_eval(model):
        tuned = [_sample(model, tokenizer, ids, chunk, sampling, device) for chunk in chunks]
        tuned_logp = _logp_sums(model, tuned, sampling.temperature)
        with base_model(session, model, labels) as base:
            base = base.to(device).eval()
            reference = "the adapter disabled" if base is model else "the base model loaded again"
            tuned_ref = _logp_sums(base, tuned, sampling.temperature)
            untuned = [_sample(base, tokenizer, ids, chunk, sampling, device) for chunk in chunks]
            base_logp = _logp_sums(base, untuned, sampling.temperature)
            base_ref = _logp_sums(base, untuned, sampling.temperature)  # the reference is the base: a check
    asked = _asked(prompts, chunks, sampling)
    return {"reference": reference, **{name: _side(judge, tokenizer, asked, rollouts, [a - b for a, b in zip(logp, ref)])
                                       for name, rollouts, logp, ref in (("base", untuned, base_logp, base_ref),
                                                                         ("tuned", tuned, tuned_logp, tuned_ref))}}


def _framed_ids(tokenizer, prompts: list[dict]) -> list[list[int]]:
    """Each prompt's framed text (its chat template applied), as token ids."""
    return [tokenizer(p["framed"], add_special_tokens=False).input_ids for p in prompts]


@contextmanager
def _in_eval(model):
    """``model`` in eval mode inside the block, as it was after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def answer_seed(seed: int, prompt: int, sample: int) -> int:
    """The seed of one answer: the run's seed, the prompt's place among the held-out prompts and the
    answer's number, so that an answer does not depend on the prompts sampled beside it or on
    which process samples it."""
    digest = hashlib.sha256(f"{seed}/{prompt}/{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # torch takes seeds below 2**63 on every device


def _sample(model, tokenizer, ids: list[list[int]], chunk: range, sampling: Sampling, device) -> Rollout:
    """Sampled answers to the prompts of ``chunk``, each from its own seed (``answer_seed``), the same
    whichever the model."""
    seeds = [answer_seed(sampling.seed, i, k) for i in chunk for k in range(sampling.samples_per_prompt)]
    return sample(model, tokenizer, [ids[i] for i in chunk], sampling.samples_per_prompt, sampling.max_new_tokens,
                  sampling.temperature, 0, device, seeds=seeds)


def _logp_sums(model, rollouts: list[Rollout], temperature: float) -> list[torch.Tensor]:
    """Per chunk, each answer's summed log-probability under ``model`` (the sampling distribution)."""
    return [(model_logprobs(model, r, temperature) * r.mask).sum(1).cpu() for r in rollouts]


def _side(judge: Judge, tokenizer, asked: list[list[str]], rollouts: list[Rollout],
          kls: list[torch.Tensor]) -> dict:
    return {**_scored(judge, tokenizer, asked, rollouts), "kls": [float(k) for kl in kls for k in kl]}


def _scored(judge: Judge, tokenizer, asked: list[list[str]], rollouts: list[Rollout]) -> dict:
    """Per answer: the prompt it was asked, its text, the judge's reward and whether it ended."""
    answers = [answer_texts(tokenizer, r) for r in rollouts]
    rewards = [float(s) for chunk, texts in zip(asked, answers) for s in judge.score(chunk, texts)]
    return {"prompts": [p for chunk in asked for p in chunk], "answers": [a for texts in answers for a in texts],
            "rewards": rewards, "ends": [float(e) for r in rollouts for e in r.ended.cpu()]}


def _asked(prompts: list[dict], chunks: list[range], sampling: Sampling) -> list[list[str]]:
    """Per chunk, the user's turn of each answer's prompt (the judge reads the answer as its answer)."""
    return [[prompts[i]["shown"] for i in chunk for _ in range(sampling.samples_per_prompt)] for chunk in chunks]


def _chunks(n: int) -> list[range]:
    return [range(i, min(i + CHUNK, n)) for i in range(0, n, CHUNK)]


@torch.no_grad()
def judge_answers(session: Session, model, judge: Judge, sampling: Sampling, prompts: list[dict]) -> dict:
    """One model's sampled answers to ``prompts`` (``held_out_prompts``'s), scored by ``judge``: every
    prompt, answer and reward, the mean reward and the share of answers that ended. Each answer has its
    seed from its prompt's place and its number (``answer_seed``), so two models given the same prompts
    (a parent and its child, at the gate of ``retrain --judge``) are compared answer by answer on the
    same sampling noise."""
    tokenizer = session.tokenizer
    ids, device, chunks = _framed_ids(tokenizer, prompts), next(model.parameters()).device, _chunks(len(prompts))
    with _in_eval(model):
        rollouts = [_sample(model, tokenizer, ids, chunk, sampling, device) for chunk in chunks]
    side = _scored(judge, tokenizer, _asked(prompts, chunks, sampling), rollouts)
    return {**side, "mean_reward": _mean(side["rewards"]), "ended": _mean(side.pop("ends"))}


SUMMARY = ("judge", "label", "split", "reference", "prompts", "samples_per_prompt", "answers", "max_new_tokens",
           "temperature", "seed", "win_rate", "wins", "ties", "losses")


def summary(result: dict) -> dict:
    """What metrics.json keeps of a judged evaluation: the figures, not the answers."""
    return {**{k: result[k] for k in SUMMARY},
            **{side: {k: result[side][k] for k in ("mean_reward", "kl", "ended")} for side in ("base", "tuned")}}


def save_judged(run: Run, result: dict) -> None:
    """judged.json (every answer and score) and judged.png (the two reward distributions)."""
    run.save_json("judged", result)
    plot_rewards(result, run.path / "judged.png")


def plot_rewards(result: dict, out: Path) -> None:
    """Histograms of the judge's scores of base and tuned answers, on shared bins, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    base, tuned = result["base"]["rewards"], result["tuned"]["rewards"]
    bins = np.histogram_bin_edges(base + tuned, bins=min(20, max(5, len(base) // 2)))
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values, colour in (("base", base, "tab:gray"), ("tuned", tuned, "tab:blue")):
        ax.hist(values, bins=bins, alpha=0.55, color=colour, label=f"{name} (mean {np.mean(values):.3f})")
        ax.axvline(float(np.mean(values)), color=colour, linestyle="--")
    ax.set_xlabel(f"score by {Path(result['judge']).name}")
    ax.set_ylabel("answers")
    ax.set_title(f"win-rate of tuned over base {100 * result['win_rate']:.1f}%")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def section(result: dict, samples: int = 3) -> tuple[str, str]:
    """The report's section: ``(title, markdown body)``."""
    r, name = result, Path(result["judge"]).resolve().name
    scored = f"the log-odds of `{r['label']}`" if r["label"] else "its reward"
    every = {side: {k: r[side][k][::r["samples_per_prompt"]] for k in ("prompts", "answers", "rewards")}
             for side in ("base", "tuned")}  # one answer per prompt, so that the samples show different prompts
    lines = [
        (f"The tuned model and its base ({r['reference']}) answered {r['prompts']} held-out prompts of the "
         f"{r['split']} split, {r['samples_per_prompt']} sampled answers each (temperature {r['temperature']:g}, "
         f"up to {r['max_new_tokens']} new tokens, seed {r['seed']}). `{r['judge']}` scored every answer "
         f"({scored})."),
        "",
        "| | base | tuned |",
        "|---|---:|---:|",
        f"| mean reward | {r['base']['mean_reward']:.4f} | {r['tuned']['mean_reward']:.4f} |",
        f"| KL to the reference (per answer) | {r['base']['kl']:.4f} | {r['tuned']['kl']:.4f} |",
        f"| answers that ended | {r['base']['ended']:.2f} | {r['tuned']['ended']:.2f} |",
        "",
        (f"Win-rate of tuned over base: {100 * r['win_rate']:.1f}% ({r['wins']} wins, {r['ties']} ties, "
         f"{r['losses']} losses over {r['answers']} pairs of answers; a tie counts half)."),
        "",
        "Reward distribution: " + spread("base", r["base"]["rewards"]) + "; "
        + spread("tuned", r["tuned"]["rewards"]) + ".",
        "",
        "![rewards of base and tuned answers](judged.png)",
        "",
        *side_by_side(every["base"], every["tuned"], samples),
    ]
    return SECTION + name, "\n".join(lines)


def _rename_judged_section(report: Path, title: str) -> None:
    """The report keeps one judged section, like judged.json: a section by another judge is renamed
    to ``title``, to be replaced in place."""
    lines = report.read_text().splitlines()
    heading = next((i for i, line in enumerate(lines) if line.startswith(f"## {SECTION}")), None)
    if heading is not None:
        lines[heading] = f"## {title}"
        report.write_text("\n".join(lines) + "\n")
