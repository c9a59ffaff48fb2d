"""A labelling run served by ``tunesmith serve``: do the ``logprobs`` of its label tokens, taken as
probabilities over the run's two labels, give the classification the run itself gives?

    tunesmith train examples/rotten_tomatoes_lora.yaml --set output.dir=runs/demo
    python benchmarks/served_label_logprobs.py runs/demo [--reviews 20] [--port 8765]

It serves RUN on 127.0.0.1 with an admin key, asks for one greedy token with ``top_logprobs: 20``
through the real ``openai`` client for each of the first ``--reviews`` reviews of the run's test
split (framed as in training: the system prompt and the instruction), and compares
``P(positive) = e^lp(positive) / (e^lp(positive) + e^lp(negative))`` with ``tunesmith score``'s
``P(positive)`` for the same review (``score.load_scorer``: the run's label log-likelihoods).

The last line reads ``N reviews: max |served - score| X, mean Y, same label K/N``.
"""

from __future__ import annotations

import argparse
import math
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    from openai import OpenAI

    from tunesmith.config import load_config
    from tunesmith.score import load_scorer
    from tunesmith.session import Session

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--reviews", type=int, default=20)
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()

    config = load_config(Path(args.run) / "config.yaml")
    labels = ("positive", "negative")
    examples = Session(config).prepare().examples["test"][: args.reviews]
    work = Path(tempfile.mkdtemp(prefix="served-logprobs-"))
    (work / "keys").write_text("admin:sk-check\n")
    server = subprocess.Popen(
        [sys.executable, "-m", "tunesmith.cli", "serve", f"demo={args.run}", "--host", "127.0.0.1",
         "--port", str(args.port), "--api-key-file", str(work / "keys"), "--store", str(work / "store.sqlite")],
        stdout=(work / "serve.log").open("w"), stderr=subprocess.STDOUT)
    client = OpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key="sk-check", timeout=120)
    try:
        for _ in range(300):  # the server loads the model first
            try:
                client.models.list()
                break
            except Exception:  # noqa: BLE001 (not up yet)
                time.sleep(1)
        served = []
        data = config.data
        for example in examples:
            reply = client.chat.completions.create(
                model="demo", max_tokens=1, temperature=0, logprobs=True, top_logprobs=20,
                messages=[{"role": "system", "content": data.system_prompt},
                          {"role": "user", "content": data.instruction.format(text=example["_input"])}])
            top = {t.token: t.logprob for t in reply.choices[0].logprobs.content[0].top_logprobs}
            p = [math.exp(top.get(label, -math.inf)) for label in labels]
            served.append((p[0] / sum(p), sum(p), reply.choices[0].message.content))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    scored = load_scorer(args.run, "positive").score([example["_input"] for example in examples])
    for (p, mass, answer), q in zip(served, scored):
        print(f"served P(positive) {p:.4f} (the two label tokens hold {mass:.4f} of the mass; answer {answer!r})"
              f"   tunesmith score {q:.4f}")
    diffs = [abs(s[0] - q) for s, q in zip(served, scored)]
    same = sum((s[0] > 0.5) == (q > 0.5) for s, q in zip(served, scored))
    print(f"{len(diffs)} reviews: max |served - score| {max(diffs):.5f}, mean {sum(diffs) / len(diffs):.5f}, "
          f"same label {same}/{len(diffs)}")


if __name__ == "__main__":
    main()
