"""The loop on the bundled model: serve -> rate -> retrain -> gate -> serve (docs/lifecycle.md, "The
loop on the bundled model"; tests/test_loop.py is the tiny-model version of the same steps).

    tunesmith train examples/rotten_tomatoes_lora.yaml --set output.dir=runs/loop/demo
    tunesmith train examples/rotten_tomatoes_reward.yaml --set output.dir=runs/loop/reward
    python examples/loop/run.py --demo runs/loop/demo --rater runs/loop/reward --out runs/loop/round-1

1. ``tunesmith serve`` serves the demo run under an alias and the reward run beside it as a scorer,
   with admin keys (a client's and the rater's) on 127.0.0.1; the alias lives in ``OUT/aliases.json``.
2. Held-out reviews (the demo run's validation split: never trained on, and apart from the test split
   the gate scores) are asked through the ``openai`` client, ``--answers`` sampled answers each.
3. The reward run stands in for people: ``/v1/score`` scores each review, the rater's label is
   ``positive`` when the score is above ``--threshold``, and every answer is rated through
   ``/v1/feedback`` under the rater's key: thumbs up when the answer is that label, else the label as
   a correction.
4. ``tunesmith retrain --objective dpo`` is tried first (the brief of issue 25); the demo is a run
   with labels, so it is refused in one line, and the run's own objective is re-trained instead,
   gated on accuracy. Its ``retrain_decision.json`` is printed.
5. On promotion the alias file moves, the running server follows it, and the same prompts are asked
   again: the answers come from the child, whose agreement with the rater is printed beside the
   parent's.

Nothing is overwritten: ``--out`` must not exist. Extra ``--retrain-arg`` values go to retrain
(``--retrain-arg=--tolerance=0.02``).
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from openai import OpenAI

from tunesmith.session import Session
from tunesmith.store import Run

ALIAS = "reviews-live"


def fail(message: str) -> None:
    print(f"loop: {message}", file=sys.stderr)
    sys.exit(2)


def check_run(path: Path, command: str) -> None:
    if not (path / "status.json").is_file():
        fail(f"{path}: no run there; train it first:\n  {command}")
    status = json.loads((path / "status.json").read_text()).get("status")
    if status != "complete":
        fail(f"{path}: status {status!r}, expected complete; train it to the end first:\n  {command}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def held_out_reviews(demo: Path, n: int, seed: int) -> tuple[dict[str, str], str, str]:
    """``n`` reviews of the demo run's validation split with their true labels, its instruction
    template and system prompt."""
    config = Run(demo, writer=False).load_config()
    validation = Session(config).prepare().examples["validation"]
    picked = random.Random(seed).sample(validation, min(n, len(validation)))
    return {e["_input"]: e["label"] for e in picked}, config.data.instruction, config.data.system_prompt


def wait_for(url: str, key: str, server: subprocess.Popen, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            fail(f"tunesmith serve exited with {server.returncode}; see its log")
        try:
            if httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    fail(f"tunesmith serve did not answer within {timeout:.0f} s")


def alias_of(url: str, key: str) -> str | None:
    models = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30).json()["data"]
    return next((m.get("alias_of") for m in models if m["id"] == ALIAS), None)


def ask(client: OpenAI, reviews: list[str], instruction: str, system: str, answers: int,
        temperature: float) -> list[dict]:
    asked = []
    for i, review in enumerate(reviews):
        messages = [{"role": "system", "content": system},
                    {"role": "user", "content": instruction.format(text=review)}]
        for k in range(answers):
            out = client.chat.completions.create(model=ALIAS, messages=messages, max_tokens=4,
                                                 temperature=temperature, seed=1000 * i + k)
            asked.append({"review": review, "id": out.id, "model": out.model,
                          "answer": out.choices[0].message.content.strip()})
    return asked


def rater_labels(url: str, key: str, reviews: list[str], threshold: float | None,
                 prompt: str) -> dict[str, tuple[str, float]]:
    """Each review's reward (``/v1/score``, read as an answer to ``prompt`` when one is given) and the
    label it gives: positive at ``threshold`` or above, or at the batch's median or above without one
    (the reward's scale is the reward run's own)."""
    scores = {}
    for start in range(0, len(reviews), 16):
        batch = reviews[start:start + 16]
        scored = httpx.post(url + "/v1/score", headers={"Authorization": f"Bearer {key}"}, timeout=600,
                            json={"model": "rater", "input": batch, **({"prompt": prompt} if prompt else {})})
        scored.raise_for_status()
        scores.update(zip(batch, (d["score"] for d in scored.json()["data"])))
    if threshold is None:
        threshold = sorted(scores.values())[len(scores) // 2]
    return {r: ("positive" if s >= threshold else "negative", s) for r, s in scores.items()}


def agreement(asked: list[dict], labels: dict[str, tuple[str, float]]) -> float:
    return sum(a["answer"] == labels[a["review"]][0] for a in asked) / len(asked)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=Path("runs/loop/demo"))
    parser.add_argument("--rater", type=Path, default=Path("runs/loop/reward"))
    parser.add_argument("--out", type=Path, required=True, help="a new directory for this round")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--answers", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--threshold", type=float, help="a reward at least this: positive (default: the median)")
    parser.add_argument("--score-prompt", default="Write a positive review of this film:",
                        help="the prompt the rater reads each review as an answer to ('' for none); the "
                             "reward run learnt to prefer fresh reviews as answers to such prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retrain-arg", action="append", default=[])
    args = parser.parse_args()

    check_run(args.demo, f"tunesmith train examples/rotten_tomatoes_lora.yaml --set output.dir={args.demo}")
    check_run(args.rater, f"tunesmith train examples/rotten_tomatoes_reward.yaml --set output.dir={args.rater}")
    if args.out.exists():
        fail(f"{args.out}: already exists; give a new --out (nothing is overwritten)")
    args.out.mkdir(parents=True)
    client_key, rater_key = secrets.token_hex(16), secrets.token_hex(16)
    (args.out / "keys.txt").write_text(f"loop-client:{client_key}\nreward-rater:{rater_key}\n")
    aliases, store, child = args.out / "aliases.json", args.out / "store.sqlite", args.out / "child"
    aliases.write_text(json.dumps({ALIAS: str(args.demo.resolve())}))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = ["tunesmith", "serve", str(args.demo), f"rater={args.rater}", "--host", "127.0.0.1",
             "--port", str(port), "--alias-file", str(aliases), "--store", str(store),
             "--api-key-file", str(args.out / "keys.txt")]
    print("$", " ".join(serve), flush=True)
    started = time.monotonic()
    with open(args.out / "serve.log", "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "tunesmith.cli", *serve[1:]], stdout=log, stderr=log)
    try:
        wait_for(url, client_key, server)
        print(f"serving at {url} after {time.monotonic() - started:.0f} s; {ALIAS} -> {alias_of(url, client_key)}")
        gold, instruction, system = held_out_reviews(args.demo, args.prompts, args.seed)
        reviews = list(gold)
        client = OpenAI(base_url=url + "/v1", api_key=client_key)

        t = time.monotonic()
        before = ask(client, reviews, instruction, system, args.answers, args.temperature)
        print(f"asked {len(before)} answers ({len(reviews)} reviews x {args.answers}) in {time.monotonic() - t:.0f} s")
        t = time.monotonic()
        labels = rater_labels(url, rater_key, reviews, args.threshold, args.score_prompt)
        for a in before:
            label = labels[a["review"]][0]
            body = {"id": a["id"], "thumbs": "up"} if a["answer"] == label else {"id": a["id"], "label": label}
            rated = httpx.post(url + "/v1/feedback", headers={"Authorization": f"Bearer {rater_key}"},
                               json=body, timeout=30)
            rated.raise_for_status()
        scores = [s for _, s in labels.values()]
        print(f"rated {len(before)} answers by reward-rater in {time.monotonic() - t:.0f} s: rater positive "
              f"{sum(lab == 'positive' for lab, _ in labels.values())}/{len(labels)}, reward mean "
              f"{sum(scores) / len(scores):.3f} min {min(scores):.3f} max {max(scores):.3f}; rater agrees with the "
              f"true labels on {sum(labels[r][0] == g for r, g in gold.items())}/{len(gold)}; "
              f"answers agreeing with the rater (before): {agreement(before, labels):.3f}")
        (args.out / "before.json").write_text(json.dumps({"asked": before, "labels": labels, "gold": gold}, indent=1))

        common = ["tunesmith", "retrain", str(args.demo), "--store", str(store), "--alias", ALIAS,
                  "--alias-file", str(aliases), "--log", str(args.out / "decisions.jsonl")]
        dpo = [*common, "--objective", "dpo", "--out", str(args.out / "child-dpo")]
        print("$", " ".join(dpo), flush=True)
        refused = subprocess.run([sys.executable, "-m", "tunesmith.cli", *dpo[1:]], capture_output=True, text=True)
        print(f"exit {refused.returncode}: {(refused.stderr or refused.stdout).strip().splitlines()[-1:]}")

        own = [*common, "--out", str(child), *args.retrain_arg]
        print("$", " ".join(own), flush=True)
        t = time.monotonic()
        code = subprocess.run([sys.executable, "-m", "tunesmith.cli", *own[1:]]).returncode
        print(f"retrain exit {code} after {time.monotonic() - t:.0f} s")
        if not (child / "retrain_decision.json").is_file():
            fail("retrain wrote no decision; see its output above")
        record = json.loads((child / "retrain_decision.json").read_text())
        print(json.dumps({k: record[k] for k in ("rated_rows", "left_out", "new_train_rows", "held_out_rows",
                                                 "replay_rows", "decision")}, indent=1))
        if not record["decision"]["promote"]:
            print(f"refused: {ALIAS} stays on {alias_of(url, client_key)}")
            return
        for _ in range(60):  # the server looks at the alias file at most once a second
            if alias_of(url, client_key) == child.name:
                break
            time.sleep(1)
        print(f"{ALIAS} -> {alias_of(url, client_key)}")
        after = ask(client, reviews, instruction, system, args.answers, args.temperature)
        print(f"true-label accuracy of the answers: {sum(a['answer'] == gold[a['review']] for a in before) / len(before):.3f} "
              f"(parent) -> {sum(a['answer'] == gold[a['review']] for a in after) / len(after):.3f} (child)")
        print(f"after: answered by {sorted({a['model'] for a in after})}; answers agreeing with the rater: "
              f"{agreement(before, labels):.3f} (parent) -> {agreement(after, labels):.3f} (child)")
        (args.out / "after.json").write_text(json.dumps({"asked": after}, indent=1))
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
