"""The loop, end to end on a tiny model: a causal run served under an alias answers; its answers are
rated through the API (``/v1/feedback``, thumbs, by the key they were served to); ``tunesmith retrain
RUN --objective dpo`` builds pairs from the ratings, trains the child from the served run and
applies the gate; on promotion the alias file moves and the same running server answers the alias
with the child."""

from __future__ import annotations

import json
import random
import threading
from contextlib import closing

import httpx
import pytest
import torch
from safetensors.torch import load_file

from conftest import NEGATIVE, NOUNS, POSITIVE, preference_rows, write_config, write_jsonl
from tunesmith.cli import main
from tunesmith.serve.access import Access
from tunesmith.serve.options import ServeOptions
from tunesmith.serve.server import build_server
from tunesmith.store import db
from tunesmith.store.aliases import write_alias
from tunesmith.ui.app import UiContext, add_ui

KEY, RATER_ID = "rate-me", "rater-1"
# Prompts of words drawn at random: distinct enough for the leakage audit to keep held-out ones.
PROMPTS = [" ".join(random.Random(i).sample(POSITIVE + NEGATIVE + NOUNS, 5)) for i in range(24)]


@pytest.fixture(scope="module")
def parent(tmp_path_factory, tiny_model_dir):
    """A causal run that imitates answers to review prompts (none of PROMPTS)."""
    root = tmp_path_factory.mktemp("loop")
    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in preference_rows(60)]
    data = {"path": str(write_jsonl(root / "answers.jsonl", rows)), "max_length": 64,
            "split": {"validation": 0.15, "test": 0.15}}
    config = write_config(root / "c.yaml", tiny_model_dir, data,
                          train={"max_steps": 6, "eval_every": 6, "mixed_precision": "no"},
                          output={"dir": str(root / "served")})
    assert main(["train", str(config)]) == 0
    return root / "served"


def _alias_of(url: str, alias: str) -> str | None:
    models = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()["data"]
    return next((m["alias_of"] for m in models if m["id"] == alias), None)


def _complete(url: str, model: str, prompt: str, **sampling) -> dict:
    response = httpx.post(url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                          json={"model": model, "prompt": prompt, **sampling})
    assert response.status_code == 200, response.text
    return response.json()


def test_serve_rate_retrain_gate_and_the_same_server_answers_with_the_child(parent, tmp_path):
    root = parent.parent
    store, aliases, child = tmp_path / "store.sqlite", tmp_path / "aliases.json", root / "child"
    write_alias(aliases, "live", parent)
    server = build_server({"served": parent}, adapter_dirs=[root], alias_file=aliases, store=store,
                          options=ServeOptions(batch_window_ms=10, max_tokens=8), access=Access({KEY: RATER_ID}))
    server.extensions.append(lambda app: add_ui(app, UiContext(root, store, tmp_path)))
    with server.in_thread() as url:
        assert _alias_of(url, "live") == "served"
        # Four sampled one-token answers to each prompt; a rater prefers some tokens to others,
        # whatever the prompt: a preference the child can learn and the held-out pairs can show.
        answers = [_complete(url, "live", p, max_tokens=1, temperature=1.5, seed=s) for p in PROMPTS for s in range(4)]
        texts = sorted({a["choices"][0]["text"] for a in answers})
        liked = set(texts[: len(texts) // 2])
        for answer in answers:
            thumbs = "up" if answer["choices"][0]["text"] in liked else "down"
            rated = httpx.post(url + "/v1/feedback", headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
                               json={"id": answer["id"], "thumbs": thumbs})
            assert rated.status_code == 200, rated.text

        # The child trains against its parent (metrics.json's reference), yet DPO on one-token answers,
        # with no pairs to replay from a causal parent, raises the parent's loss on its own test set:
        # 6.05 -> 7.38 after 16 steps at lr 0.05, 6.05 -> 6.67 after 8 at lr 0.02 (7.48 and 6.63 against
        # the base). Hence a short run and a wide tolerance on the original test set.
        code = main(["retrain", str(parent), "--objective", "dpo", "--store", str(store), "--out", str(child),
                     "--min-rows", "8", "--alias", "live", "--alias-file", str(aliases),
                     "--log", str(tmp_path / "decisions.jsonl"), "--tolerance", "1.0",
                     "--set", "train.max_steps=8", "--set", "train.lr=0.02", "--set", "train.eval_every=8"])
        record = json.loads((child / "retrain_decision.json").read_text())
        assert record["objective"] == "dpo" and record["data_kind"] == "preference"
        pairs = [json.loads(line) for line in (root / "child.data" / "train.jsonl").read_text().splitlines()]
        assert pairs and all(p["chosen"] in liked and p["rejected"] not in liked for p in pairs)
        assert record["replay_rows"] == 0  # a causal parent's answers to imitate are no pairs
        decision = record["decision"]
        assert decision["promote"], decision["reason"]
        assert code == 0 and decision["child_new"] < decision["parent_new"]  # the DPO loss on held-out pairs
        assert json.loads(aliases.read_text()) == {"live": str(child.resolve())}
        metrics = json.loads((child / "metrics.json").read_text())  # the child trained on the pairs
        assert metrics["objective"] == "dpo" and metrics["tuned"]["loss"] < metrics["base"]["loss"]
        assert metrics["reference"] == f"parent {parent.resolve()}"
        weights = [load_file(run / "adapter" / "adapter_model.safetensors") for run in (parent, child)]
        assert weights[0].keys() == weights[1].keys()
        assert all(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
        with closing(db.connect(store)) as connection:  # every rating is stored under the key that gave it
            raters = {r["rater"] for r in db.served_ratings(connection, "served")}
        assert raters == {RATER_ID}

        for _ in range(200):  # the server looks at the alias file at most once a second
            if _alias_of(url, "live") == "child":
                break
            threading.Event().wait(0.05)
        assert _alias_of(url, "live") == "child"
        after = _complete(url, "live", PROMPTS[0], max_tokens=6, temperature=0)
        assert after["model"] in ("live", "child")
        assert after["choices"][0]["text"] == _complete(url, "child", PROMPTS[0], max_tokens=6,
                                                        temperature=0)["choices"][0]["text"]
        assert server.pool.adapters["child"].run == child.resolve()
        assert "served" in server.pool.adapters  # named at startup: it stays, and answers by its name
        # The UI on the same server shows the child's lineage and the gate's decision.
        page = httpx.get(url + "/ui/api/run", params={"name": "child"}, headers={"Authorization": f"Bearer {KEY}"},
                         timeout=30).json()
        assert page["parent_name"] == "served" and page["objective"] == "dpo"
        assert page["retrain_decision"]["decision"] == decision



def test_a_reward_run_is_served_and_scores_texts_through_its_route(tmp_path, tiny_model_dir):
    from tunesmith.score import load_scorer

    data = {"path": str(write_jsonl(tmp_path / "pairs.jsonl", preference_rows(40))), "max_length": 64,
            "split": {"validation": 0.15, "test": 0.15}}
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, data, objective={"name": "reward"},
                          train={"max_steps": 4, "eval_every": 4, "mixed_precision": "no"},
                          output={"dir": str(tmp_path / "judge")})
    assert main(["train", str(config)]) == 0
    texts, prompt = ["honestly the film is great", "honestly the film is dull"], "review the film"
    expected = load_scorer(tmp_path / "judge")
    server = build_server({"judge": tmp_path / "judge"}, access=Access({KEY: RATER_ID}), log_requests=False)
    with server.in_thread() as url:
        headers = {"Authorization": f"Bearer {KEY}"}
        models = httpx.get(url + "/v1/models", headers=headers, timeout=30).json()["data"]
        assert {"id": "judge", "scores": "reward"}.items() <= next(m for m in models if m["id"] == "judge").items()

        def score(body: dict) -> httpx.Response:
            return httpx.post(url + "/v1/score", headers=headers, json=body, timeout=60)

        scored = score({"model": "judge", "input": texts, "prompt": prompt})
        assert scored.status_code == 200, scored.text
        got = [d["score"] for d in scored.json()["data"]]
        assert got == pytest.approx(expected.score([expected.frame(prompt, t) for t in texts]), abs=1e-5)
        alone = [d["score"] for d in score({"model": "judge", "input": texts}).json()["data"]]
        assert alone == pytest.approx(expected.score(texts), abs=1e-5) and alone != pytest.approx(got)
        for body, field in (({"model": "judge", "input": []}, "input"), ({"model": "judge", "input": [""]}, "input"),
                            ({"model": "judge", "input": ["x"], "temperature": 1}, "temperature"),
                            ({"input": ["x"]}, "model"), ({"model": "judge", "input": ["x"], "prompt": 3}, "prompt")):
            refused = score(body)
            assert refused.status_code == 400 and field in refused.text, (body, refused.text)
        unknown = score({"model": "served", "input": ["x"]})
        assert unknown.status_code == 404 and "not a served scorer" in unknown.json()["error"]["message"]

        # Merged: the exported model is a plain sequence classifier whose one logit is the same reward.
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        assert main(["export", str(tmp_path / "judge"), "--format", "hf", "--out", str(tmp_path / "merged")]) == 0
        merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
        tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
        with torch.no_grad():
            plain = [merged(**tokenizer(t, return_tensors="pt")).logits[0, 0].item() for t in texts]
        assert plain == pytest.approx(expected.score(texts), abs=1e-4)
