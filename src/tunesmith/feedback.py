"""Human feedback in the terminal: ``tunesmith feedback collect`` shows answers to prompts and
records which one a person preferred (or how they rated one) in the SQLite store (``store.db``);
``tunesmith feedback export`` writes the choices as preference pairs, the
``{"prompt", "chosen", "rejected"}`` JSONL that the reward-model and DPO objectives read: each
rater's latest choice on an item, and with ``--min-raters`` / ``--agreement`` only the items that
enough raters agreed on (``store.consensus``). ``export --as kto`` writes the served answers that
people marked with thumbs up or down (``/v1/feedback``, looked up in the request log) as unpaired
``{"prompt", "completion", "label"}`` rows, which the KTO objective reads (``store.db.rated_answers``).

Where the two answers come from: two runs (``RUN RUN2``), one run's tuned and base model (``RUN``),
or two samples of one run (``RUN --samples``). They are shown as 1 and 2 in a seeded random order,
so that the position never tells which is which.
"""

from __future__ import annotations

import getpass
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TextIO

import torch

from tunesmith.data.io import read_records
from tunesmith.errors import TunesmithError
from tunesmith.files import write_atomic
from tunesmith.objectives import lacks
from tunesmith.store import Run
from tunesmith.store import db as store
from tunesmith.session import load_run
from tunesmith.store.consensus import Consensus

CHOICES = {"1": "first", "2": "second", "t": "tie"}


@dataclass
class Source:
    """One side of the comparison: the name recorded in the store, and prompt -> answer."""

    name: str
    answer: Callable[[str], str]


def read_prompts(path: str) -> list[str]:
    """The ``prompt`` column of a data file (or ``text``: a .txt file gives one prompt per paragraph)."""
    records = read_records(path)
    column = next((c for c in ("prompt", "text") if c in records[0]), None)
    if column is None:
        found = ", ".join(c for c in records[0] if not c.startswith("_"))
        raise TunesmithError(f"{path}: no column 'prompt' (or 'text'); columns found: {found}")
    return [str(r[column]) for r in records if str(r[column]).strip()]


def run_sources(runs: list[str], samples: bool, max_new_tokens: int, seed: int = 0) -> list[Source]:
    """The answerers: two runs; a run's tuned and base model; or (``samples``) two samples of a run."""
    if len(runs) == 2:
        return [_source(runs[0], max_new_tokens), _source(runs[1], max_new_tokens)]
    run, session, model = _writer(runs[0])
    if samples:
        generator = torch.Generator().manual_seed(seed)
        sample = _sampler(session, model, max_new_tokens, generator)
        return [Source(str(run.path), sample), Source(str(run.path), sample)]
    base = model if session.method.disables else session.load_model(run.labels()).eval()

    def base_answer(prompt: str) -> str:
        if base is model:
            with model.disable_adapter():
                return session.objective.answer(model, prompt, run.labels(), max_new_tokens)
        return session.objective.answer(base, prompt, run.labels(), max_new_tokens)

    return [Source(str(run.path), lambda p: session.objective.answer(model, p, run.labels(), max_new_tokens)),
            Source(f"{run.path}#base", base_answer)]


def _writer(run_dir: str):
    """The run's tuned model, once its config says it writes answers (before any model is loaded)."""
    if why := lacks(Run(run_dir, writer=False).load_config().objective.name, "causal_answers"):
        raise TunesmithError(f"{run_dir}: feedback needs a run that writes answers; {why}")
    return load_run(run_dir)


def _source(run_dir: str, max_new_tokens: int) -> Source:
    run, session, model = _writer(run_dir)
    return Source(str(run.path), lambda p: session.objective.answer(model, p, run.labels(), max_new_tokens))


def _sampler(session, model, max_new_tokens: int, generator: torch.Generator) -> Callable[[str], str]:
    tokenizer = session.tokenizer

    @torch.no_grad()
    def sample(prompt: str) -> str:
        text = session.objective.encoder.prompt_text({"messages": [{"role": "user", "content": prompt}]})
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids.to(model.device)
        # generate() draws from torch's global generator: seed it from ours, for repeatable sessions.
        torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=True, temperature=1.0, top_p=0.95, pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()

    return sample


def collect(db, prompts: list[str], sources: list[Source], rater: str, scale: bool = False,
            stdin: TextIO | None = None, out: TextIO | None = None, seed: int = 0) -> dict[str, int]:
    """Ask about every prompt; returns counts of what was recorded (``rated``, ``tie``, ``skipped``).

    Two answers: 1 or 2 picks the better, t a tie, s skips, q quits. ``scale``: one answer (the first
    source's), rated 1 to 5. Each answer shown is logged before the question; each choice is one
    transaction, so quitting or being killed keeps everything answered so far.
    """
    import sys

    stdin, out = stdin or sys.stdin, out or sys.stdout
    rng = random.Random(seed)
    counts = {"rated": 0, "tie": 0, "skipped": 0}
    shown = sources[:1] if scale else sources
    valid = {str(n) for n in range(1, 6)} if scale else set(CHOICES)
    question = "rate 1-5, s skip, q quit > " if scale else "better: 1, 2, t tie, s skip, q quit > "
    for number, prompt in enumerate(prompts, 1):
        order = list(shown)
        rng.shuffle(order)
        print(f"\n[{number}/{len(prompts)}] prompt: {prompt}", file=out)
        ids = []
        for k, source in enumerate(order, 1):
            answer = source.answer(prompt)
            ids.append(store.add_answer(db, source="collected", run=source.name, prompt=prompt, answer=answer,
                                        meta={"shown_as": k}))
            print(f"  [{k}] {answer}" if not scale else f"  answer: {answer}", file=out)
        reply = _ask(question, valid | {"s", "q"}, stdin, out)
        if reply == "q":
            break
        if reply == "s":
            counts["skipped"] += 1
        elif scale:
            store.add_rating(db, ids[0], rater=rater, score=float(reply))
            counts["rated"] += 1
        else:
            store.add_rating(db, ids[0], rater=rater, other_id=ids[1], choice=CHOICES[reply])
            counts["tie" if reply == "t" else "rated"] += 1
    return counts


def _ask(question: str, valid: set[str], stdin: TextIO, out: TextIO) -> str:
    while True:
        print(question, end="", file=out, flush=True)
        line = stdin.readline()
        if not line:  # end of input: as if the rater quit
            print(file=out)
            return "q"
        reply = line.strip().lower()
        if reply in valid:
            return reply
        print(f"  please answer one of: {', '.join(sorted(valid))}", file=out)


def export(db, out: Path, consensus: Consensus = Consensus(), left_out: dict[str, int] | None = None,
           kind: Literal["pairs", "kto"] = "pairs", adapter: str | None = None, min_score: float = 1.0) -> int:
    """Write to ``out`` (JSONL) the choices ``consensus`` keeps as preference pairs, or (``kind``
    ``kto``) the served answers of ``adapter`` (of every adapter: None) marked good or bad, a score of
    at least ``min_score`` being good; returns how many rows. ``left_out`` counts the items left out,
    by reason (``store.db.preference_pairs``, ``store.db.rated_answers``)."""
    if out.exists():
        raise TunesmithError(f"{out}: already exists; give another --out (nothing is overwritten)")
    if kind == "kto":
        rows = store.rated_answers(store.served_ratings(db, adapter), consensus, min_score, left_out)
    else:
        rows = store.preference_pairs(db, consensus, left_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, "".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def default_rater() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "anonymous"
