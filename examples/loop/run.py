"""The loop on the bundled model: serve -> rate -> retrain -> gate -> serve (docs/lifecycle.md, "The
loop on the bundled model"; tests/test_loop.py is the tiny-model version of the same steps).

    tunesmith train examples/rotten_tomatoes_reward.yaml    # runs/rotten_tomatoes_reward, the rater
    tunesmith train examples/rotten_tomatoes_dpo.yaml       # runs/rotten_tomatoes_dpo, the served run
    python examples/loop/run.py --out runs/loop/dpo-round-1

1. ``tunesmith serve`` serves the demo run under an alias and the reward run beside it as a scorer,
   with admin keys (a client's and the rater's) on 127.0.0.1; the alias lives in ``OUT/aliases.json``.
2. Prompts are asked through the ``openai`` client, ``--answers`` sampled answers each, from
   ``--clients`` clients at once (the server batches them).
3. The reward run stands in for people, every rating going through ``/v1/feedback`` under the key
   ``reward-rater``. What it rates depends on the demo run:
   - a run without labels (the DPO example, answering "Write a positive review of this film: PLOT"):
     the prompts are films outside the run's test split; ``/v1/score`` scores each answer as an answer
     to its prompt, and of a prompt's answers those above their mean get a thumbs up, the others a
     thumbs down, as a person shown them side by side would; ``tunesmith retrain --objective dpo``
     turns each prompt's up and down answers into pairs and trains a DPO child against its parent, and
     ``--judge`` (the rater) gates it on answers: parent and child answer the held-out prompts and the
     child must have the rater's higher mean reward, the original test pairs within tolerance;
   - a run with labels (the LoRA demo, a review's sentiment as its answer): the prompts are reviews of
     its validation split; ``/v1/score`` gives each review a label (positive at ``--threshold`` or
     above), and an answer is rated thumbs up when it is that label, else corrected to it. ``retrain
     --objective dpo`` refuses such a run (re-training a run with labels builds label rows), so the
     refusal is shown and the run's own objective re-trained, gated on accuracy.
4. The child's ``retrain_decision.json`` (the gate's figures and decision) is printed.
5. On promotion the alias file moves, the running server follows it, and the same prompts are asked
   again: the answers come from the child, and the rater's figures are printed beside the parent's.

Nothing is overwritten: ``--out`` must not exist. Extra ``--retrain-arg`` values go to retrain
(``--retrain-arg=--tolerance=0.02``).
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
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


def film_prompts(demo: Path, n: int, seed: int) -> tuple[list[str], str]:
    """``n`` prompts of the demo run's training and validation pairs (never of its test split, which
    the gate scores the child on), and its system prompt. People ask what they ask: a prompt the run
    trained on is fair traffic; its served answers are the model's, not the data's."""
    config = Run(demo, writer=False).load_config()
    examples = Session(config).prepare().examples
    prompts = sorted({e["_input"] for e in examples["train"] + examples["validation"]})
    return random.Random(seed).sample(prompts, min(n, len(prompts))), config.data.system_prompt


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


def ask(client: OpenAI, prompts: list[str], system: str, answers: int, temperature: float, max_tokens: int,
        clients: int) -> list[dict]:
    """``answers`` sampled answers to each prompt, asked by ``clients`` clients at once; each answer has
    its own seed, so a rerun asks the same."""

    def one(task: tuple[int, int]) -> dict:
        i, k = task
        messages = [{"role": "system", "content": system}, {"role": "user", "content": prompts[i]}]
        out = client.chat.completions.create(model=ALIAS, messages=messages, max_tokens=max_tokens,
                                             temperature=temperature, seed=1000 * i + k)
        return {"prompt": prompts[i], "id": out.id, "model": out.model,
                "answer": out.choices[0].message.content.strip()}

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, [(i, k) for i in range(len(prompts)) for k in range(answers)]))


def scores_of(url: str, key: str, texts: list[str], prompt: str) -> list[float]:
    """The rater's reward of each text (``/v1/score``), read as an answer to ``prompt`` when one is given."""
    scores = []
    for start in range(0, len(texts), 16):
        batch = texts[start:start + 16]
        scored = httpx.post(url + "/v1/score", headers={"Authorization": f"Bearer {key}"}, timeout=600,
                            json={"model": "rater", "input": batch, **({"prompt": prompt} if prompt else {})})
        scored.raise_for_status()
        scores += [d["score"] for d in scored.json()["data"]]
    return scores


def rate(url: str, key: str, body: dict) -> None:
    rated = httpx.post(url + "/v1/feedback", headers={"Authorization": f"Bearer {key}"}, json=body, timeout=30)
    rated.raise_for_status()


def rater_labels(url: str, key: str, reviews: list[str], threshold: float | None,
                 prompt: str) -> dict[str, tuple[str, float]]:
    """Each review's reward (read as an answer to ``prompt`` when one is given) and the label it gives:
    positive at ``threshold`` or above, or at the batch's median or above without one (the reward's
    scale is the reward run's own)."""
    scores = dict(zip(reviews, scores_of(url, key, reviews, prompt)))
    if threshold is None:
        threshold = sorted(scores.values())[len(scores) // 2]
    return {r: ("positive" if s >= threshold else "negative", s) for r, s in scores.items()}


def agreement(asked: list[dict], labels: dict[str, tuple[str, float]]) -> float:
    return sum(a["answer"] == labels[a["review"]][0] for a in asked) / len(asked)


def retrain(common: list[str], extra: list[str], child: Path) -> dict | None:
    """Run ``tunesmith retrain`` and return its decision record (None, said, when it wrote none)."""
    command = [*common, "--out", str(child), *extra]
    print("$", " ".join(command), flush=True)
    t = time.monotonic()
    code = subprocess.run([sys.executable, "-m", "tunesmith.cli", *command[1:]]).returncode
    print(f"retrain exit {code} after {time.monotonic() - t:.0f} s")
    if not (child / "retrain_decision.json").is_file():
        fail("retrain wrote no decision; see its output above")
    record = json.loads((child / "retrain_decision.json").read_text())
    print(json.dumps({k: record[k] for k in ("rated_rows", "left_out", "new_train_rows", "held_out_rows",
                                             "replay_rows", "decision")}, indent=1))
    return record


def follow(url: str, key: str, child: Path) -> None:
    """Wait until the running server answers the alias with ``child`` (it looks at the alias file at
    most once a second)."""
    for _ in range(60):
        if alias_of(url, key) == child.name:
            break
        time.sleep(1)
    else:
        fail(f"{ALIAS} still answered by {alias_of(url, key)} 60 s after the promotion; see the server's log, "
             f"{child.parent / 'serve.log'}")
    print(f"{ALIAS} -> {alias_of(url, key)}")


def labels_round(args, url: str, client: OpenAI, client_key: str, rater_key: str, common: list[str]) -> None:
    """A run with labels: the reviews' labels by the rater, thumbs or corrections, the run's own
    objective re-trained (``retrain --objective dpo`` refused, shown)."""
    gold, instruction, system = held_out_reviews(args.demo, args.prompts, args.seed)
    review_of = {instruction.format(text=r): r for r in gold}
    prompts = list(review_of)

    def asked_reviews() -> list[dict]:
        t = time.monotonic()
        asked = ask(client, prompts, system, args.answers, args.temperature, 4, args.clients)
        print(f"asked {len(asked)} answers ({len(prompts)} reviews x {args.answers}) in {time.monotonic() - t:.0f} s")
        return [{**a, "review": review_of[a["prompt"]]} for a in asked]

    before = asked_reviews()
    t = time.monotonic()
    labels = rater_labels(url, rater_key, list(gold), args.threshold, args.score_prompt)
    for a in before:
        label = labels[a["review"]][0]
        rate(url, rater_key, {"id": a["id"], "thumbs": "up"} if a["answer"] == label else {"id": a["id"], "label": label})
    scores = [s for _, s in labels.values()]
    print(f"rated {len(before)} answers by reward-rater in {time.monotonic() - t:.0f} s: rater positive "
          f"{sum(lab == 'positive' for lab, _ in labels.values())}/{len(labels)}, reward mean "
          f"{sum(scores) / len(scores):.3f} min {min(scores):.3f} max {max(scores):.3f}; rater agrees with the "
          f"true labels on {sum(labels[r][0] == g for r, g in gold.items())}/{len(gold)}; "
          f"answers agreeing with the rater (before): {agreement(before, labels):.3f}")
    (args.out / "before.json").write_text(json.dumps({"asked": before, "labels": labels, "gold": gold}, indent=1))

    dpo = [*common, "--objective", "dpo", "--out", str(args.out / "child-dpo")]
    print("$", " ".join(dpo), flush=True)
    refused = subprocess.run([sys.executable, "-m", "tunesmith.cli", *dpo[1:]], capture_output=True, text=True)
    print(f"exit {refused.returncode}: {(refused.stderr or refused.stdout).strip().splitlines()[-1:]}")

    child = args.out / "child"
    record = retrain(common, args.retrain_arg, child)
    if not record["decision"]["promote"]:
        print(f"refused: {ALIAS} stays on {alias_of(url, client_key)}")
        return
    follow(url, client_key, child)
    after = asked_reviews()
    print(f"true-label accuracy of the answers: {sum(a['answer'] == gold[a['review']] for a in before) / len(before):.3f} "
          f"(parent) -> {sum(a['answer'] == gold[a['review']] for a in after) / len(after):.3f} (child)")
    print(f"after: answered by {sorted({a['model'] for a in after})}; answers agreeing with the rater: "
          f"{agreement(before, labels):.3f} (parent) -> {agreement(after, labels):.3f} (child)")
    (args.out / "after.json").write_text(json.dumps({"asked": after}, indent=1))


def by_prompt(asked: list[dict]) -> dict[str, list[dict]]:
    """The answers grouped by their prompt, in the order the prompts were asked."""
    grouped: dict[str, list[dict]] = {}
    for a in asked:
        grouped.setdefault(a["prompt"], []).append(a)
    return grouped


def scored(url: str, key: str, asked: list[dict]) -> list[dict]:
    """Each answer with the rater's reward, scored as an answer to its own prompt."""
    out = []
    for prompt, answers in by_prompt(asked).items():
        rewards = scores_of(url, key, [a["answer"] for a in answers], prompt)
        out += [{**a, "reward": r} for a, r in zip(answers, rewards)]
    return out


def summary(rated: list[dict]) -> str:
    rewards = [a["reward"] for a in rated]
    return f"mean reward {statistics.mean(rewards):.3f} (median {statistics.median(rewards):.3f})"


def pairs_round(args, url: str, client: OpenAI, client_key: str, rater_key: str, common: list[str]) -> None:
    """A run without labels: every answer scored by the rater as an answer to its prompt; of a prompt's
    answers those above their mean get a thumbs up and the rest a thumbs down; a DPO child."""
    prompts, system = film_prompts(args.demo, args.prompts, args.seed)

    def asked_and_scored() -> list[dict]:
        t = time.monotonic()
        asked = ask(client, prompts, system, args.answers, args.temperature, args.max_tokens, args.clients)
        print(f"asked {len(asked)} answers ({len(prompts)} prompts x {args.answers}, up to {args.max_tokens} "
              f"tokens) in {time.monotonic() - t:.0f} s, answered by {sorted({a['model'] for a in asked})}")
        t = time.monotonic()
        rated = scored(url, rater_key, asked)
        print(f"scored by the rater in {time.monotonic() - t:.0f} s: {summary(rated)}")
        return rated

    before = asked_and_scored()
    marks = {"up": 0, "down": 0, "tied": 0}
    for answers in by_prompt(before).values():
        mean = statistics.mean(a["reward"] for a in answers)
        for a in answers:
            if a["reward"] == mean:
                marks["tied"] += 1
                continue
            thumbs = "up" if a["reward"] > mean else "down"
            rate(url, rater_key, {"id": a["id"], "thumbs": thumbs})
            marks[thumbs] += 1
    print(f"rated by reward-rater through /v1/feedback: {marks}")
    (args.out / "before.json").write_text(json.dumps({"asked": before}, indent=1))

    child = args.out / "child"
    # The gate judges answers: parent and child answer the held-out prompts, the rater scores both.
    record = retrain([*common, "--objective", "dpo", "--judge", str(args.rater)], args.retrain_arg, child)
    if not record["decision"]["promote"]:
        print(f"refused: {ALIAS} stays on {alias_of(url, client_key)}")
        return
    follow(url, client_key, child)
    after = asked_and_scored()
    parent, kid = ({p: statistics.mean(a["reward"] for a in answers) for p, answers in by_prompt(asked).items()}
                   for asked in (before, after))
    wins, losses = sum(kid[p] > parent[p] for p in prompts), sum(kid[p] < parent[p] for p in prompts)
    print(f"the rater on the same prompts: parent {summary(before)}; child {summary(after)}; child's mean "
          f"answer above the parent's on {wins} of {len(prompts)} prompts, below on {losses}")
    (args.out / "after.json").write_text(json.dumps({"asked": after}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=Path("runs/rotten_tomatoes_dpo"), help="the served run")
    parser.add_argument("--rater", type=Path, default=Path("runs/rotten_tomatoes_reward"))
    parser.add_argument("--out", type=Path, required=True, help="a new directory for this round")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--answers", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-tokens", type=int, default=48, help="the length of a sampled answer (runs "
                        "without labels; a label is at most 4 tokens)")
    parser.add_argument("--clients", type=int, default=8, help="clients asking at once")
    parser.add_argument("--threshold", type=float, help="runs with labels: a reward at least this is positive "
                        "(default: the median)")
    parser.add_argument("--score-prompt", default="Write a positive review of this film:",
                        help="runs with labels: the prompt the rater reads each review as an answer to ('' for "
                             "none); the reward run learnt to prefer fresh reviews as answers to such prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retrain-arg", action="append", default=[])
    args = parser.parse_args()

    check_run(args.demo, f"tunesmith train examples/rotten_tomatoes_dpo.yaml --set output.dir={args.demo}")
    check_run(args.rater, f"tunesmith train examples/rotten_tomatoes_reward.yaml --set output.dir={args.rater}")
    if args.out.exists():
        fail(f"{args.out}: already exists; give a new --out (nothing is overwritten)")
    args.out.mkdir(parents=True)
    client_key, rater_key = secrets.token_hex(16), secrets.token_hex(16)
    (args.out / "keys.txt").write_text(f"loop-client:{client_key}\nreward-rater:{rater_key}\n")
    aliases, store = args.out / "aliases.json", args.out / "store.sqlite"
    aliases.write_text(json.dumps({ALIAS: str(args.demo.resolve())}))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # --adapter-dir OUT: the child is written under OUT, and the server loads a run that the alias
    # file names at run time only from such a directory.
    serve = ["tunesmith", "serve", str(args.demo), f"rater={args.rater}", "--host", "127.0.0.1",
             "--port", str(port), "--alias-file", str(aliases), "--store", str(store), "--adapter-dir", str(args.out),
             "--api-key-file", str(args.out / "keys.txt")]
    print("$", " ".join(serve), flush=True)
    started = time.monotonic()
    with open(args.out / "serve.log", "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "tunesmith.cli", *serve[1:]], stdout=log, stderr=log)
    try:
        wait_for(url, client_key, server)
        print(f"serving at {url} after {time.monotonic() - started:.0f} s; {ALIAS} -> {alias_of(url, client_key)}")
        client = OpenAI(base_url=url + "/v1", api_key=client_key, timeout=900)
        common = ["tunesmith", "retrain", str(args.demo), "--store", str(store), "--alias", ALIAS,
                  "--alias-file", str(aliases), "--log", str(args.out / "decisions.jsonl")]
        has_labels = bool(Run(args.demo, writer=False).labels())
        (labels_round if has_labels else pairs_round)(args, url, client, client_key, rater_key, common)
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
