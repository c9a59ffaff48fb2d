"""Served traffic for the drift and re-training demo, logged to the store as the server logs it.

    python benchmarks/drift_demo.py RUN --traffic reviews --store runs/demo-same.sqlite --rate
    python benchmarks/drift_demo.py RUN --traffic hamlet --store runs/demo-hamlet.sqlite
    tunesmith monitor RUN --store runs/demo-same.sqlite     # exit 0 expected: no drift
    tunesmith monitor RUN --store runs/demo-hamlet.sqlite   # exit 1 expected: drift
    tunesmith retrain RUN --store runs/demo-same.sqlite --alias reviews-live

``reviews``: the run's own validation inputs (the training inputs' distribution, never trained on,
and apart from the test split that ``retrain`` scores both models on); ``hamlet``: lines of Hamlet (builtin:hamlet), another kind of text. Each prompt is answered by
the run's tuned model (``objective.answer``, as ``tunesmith generate`` does) and logged as a served
answer under the run's name. ``--rate`` rates the answers of label data as a person would: thumbs
up (score 1.0) when the answer is the true label, else the true label as a correction.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from tunesmith.data.pipeline import resolve_data_path
from tunesmith.session import Session, load_run
from tunesmith.store import db


def hamlet_lines(n: int, seed: int) -> list[str]:
    """Verse lines of four words or more (not the speakers' names), two at a time."""
    lines = [line.strip() for line in Path(resolve_data_path("builtin:hamlet")).read_text().splitlines()]
    verse = [line for line in lines if len(line.split()) >= 4 and not line.isupper()]
    pairs = [f"{a} {b}" for a, b in zip(verse[::2], verse[1::2])]
    return random.Random(seed).sample(pairs, min(n, len(pairs)))


def held_out_inputs(session: Session, n: int, seed: int) -> list[tuple[str, str | None]]:
    validation = session.prepare().examples["validation"]
    picked = random.Random(seed).sample(validation, min(n, len(validation)))
    return [(e["_input"], e.get("label")) for e in picked]


def log_traffic(run_dir: Path, store_path: Path, traffic: str, n: int, rate: bool, seed: int = 0) -> int:
    run, session, model = load_run(run_dir)
    labels = run.labels()
    prompts = held_out_inputs(session, n, seed) if traffic == "reviews" else [(t, None) for t in hamlet_lines(n, seed)]
    store = db.connect(store_path)
    for prompt, gold in prompts:
        answer = session.objective.answer(model, prompt, labels, session.config.eval.max_new_tokens)
        answer_id = db.add_answer(store, source="served", run=run_dir.resolve().name, prompt=prompt,
                                  answer=answer, meta={"demo": traffic})
        if rate and gold is not None:
            db.add_rating(store, answer_id, rater="demo", **({"score": 1.0} if answer.strip() == gold else {"label": gold}))
    store.close()
    return len(prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--traffic", choices=["reviews", "hamlet"], required=True)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--rate", action="store_true", help="rate label answers against the true labels")
    args = parser.parse_args()
    count = log_traffic(args.run_dir, args.store, args.traffic, args.n, args.rate)
    print(f"logged {count} {args.traffic} prompts to {args.store}")


if __name__ == "__main__":
    main()
