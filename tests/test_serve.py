"""tunesmith serve: the server on a tiny Llama with two LoRA runs, driven by the real openai client.

The runs are made directly: a config written the way `tunesmith train` would, and a LoRA adapter
with random (non-zero) weights saved by PEFT, so the two adapters and the base answer differently.
"""

from __future__ import annotations

import json
import threading
import warnings

import httpx
import pytest
import torch
from pydantic import ValidationError
from conftest import review_rows, write_config, write_jsonl

from tunesmith.errors import TunesmithError
from tunesmith.serve.access import Access
from tunesmith.serve.engine import Sampling, held_back, next_token
from tunesmith.serve.options import ServeOptions
from tunesmith.serve.schemas import Feedback
from tunesmith.serve.server import build_server
from tunesmith.store import Run

PROMPT = "honestly the film is"


def make_run(root, model_dir, name: str, seed: int, parent=None, **method):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    run_dir = root / name
    run_dir.mkdir(parents=True)
    data = write_jsonl(root / f"{name}.jsonl", review_rows(20))
    config = write_config(root / f"{name}.yaml", model_dir,
                          {"path": str(data), "format": "classification",
                           "columns": {"text": "review", "label": "sentiment"}},
                          output={"dir": str(run_dir)}, **({"method": method} if method else {}))
    (run_dir / "config.yaml").write_text(config.read_text())
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=4, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(run_dir / "adapter")
    Run(run_dir).set_status("complete", **({"parent": str(parent)} if parent else {}))
    return run_dir


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("served-runs")
    first = make_run(root, tiny_model_dir, "alpha", seed=1)
    second = make_run(root, tiny_model_dir, "beta", seed=2, parent=first)
    spare = make_run(root, tiny_model_dir, "gamma", seed=3)
    return {"root": root, "alpha": first, "beta": second, "gamma": spare}


@pytest.fixture(scope="module")
def served(runs, tiny_model_dir, tmp_path_factory):
    """The server with alpha and beta, keys, small limits, and gamma loadable from the runs' directory."""
    store = tmp_path_factory.mktemp("store") / "store.sqlite"
    options = ServeOptions(max_body_bytes=4000, max_prompt_tokens=64, max_tokens=32, max_concurrent=4,
                           max_adapters=3, batch_window_ms=50)
    server = build_server({"alpha": runs["alpha"], "beta": runs["beta"]}, adapter_dirs=[runs["root"]],
                          aliases={"prod": "alpha"}, options=options, access=Access({"sekret": "team-a"}),
                          store=store, redact_pii=True)
    with server.in_thread() as url:
        yield server, url, store


@pytest.fixture
def client(served):
    from openai import OpenAI

    return OpenAI(base_url=served[1] + "/v1", api_key="sekret", max_retries=0)


def ask(client, model: str, prompt: str = PROMPT, **kwargs) -> str:
    out = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, **kwargs)
    return out.choices[0].text


def post(served, route: str, body, key: str = "sekret") -> httpx.Response:
    return httpx.post(served[1] + route, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def wait_for_submitted(server, n: int, threads) -> None:
    """Start ``threads`` and wait until their ``n`` requests have reached the scheduler."""
    before = server.scheduler.submitted
    for t in threads:
        t.start()
    while server.scheduler.submitted < before + n:
        threading.Event().wait(0.01)


# Sampling maths.
def test_top_p_samples_only_from_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    generator = torch.Generator().manual_seed(0)
    drawn = {next_token(logits, Sampling(1, temperature=1.0, top_p=0.7), generator) for _ in range(200)}
    assert drawn == {0, 1}  # 0.5 < 0.7 needs the second token, and no more
    assert next_token(logits, Sampling(1, temperature=0), None) == 0


def test_same_seed_same_sample():
    logits = torch.randn(50)
    draw = [next_token(logits, Sampling(1, temperature=1.0), torch.Generator().manual_seed(7)) for _ in range(2)]
    assert draw[0] == draw[1]


def test_held_back_keeps_a_possible_stop_start():
    assert held_back("the end is ne", ["near", "x"]) == 2
    assert held_back("the end is", ["near"]) == 0
    assert held_back("abc", []) == 0


# The routes.
def test_chat_and_completion_with_usage(client, served):
    chat = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": PROMPT}],
                                          max_tokens=6, temperature=0)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens <= 6 and chat.usage.prompt_tokens > 0
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    assert chat.choices[0].finish_reason in ("stop", "length")
    done = client.completions.create(model="beta", prompt=PROMPT, max_tokens=5, temperature=0)
    assert done.usage.completion_tokens == 5 and done.choices[0].finish_reason == "length"


def test_streaming_equals_the_whole_answer(client):
    whole = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": PROMPT}],
                                           max_tokens=8, temperature=0).choices[0].message.content
    chunks = list(client.chat.completions.create(
        model="beta", messages=[{"role": "user", "content": PROMPT}], max_tokens=8, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[-1].usage.completion_tokens >= 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="alpha", prompt=PROMPT, max_tokens=8, temperature=0, stream=True))
    assert streamed == ask(client, "alpha")


def test_stop_and_seed_are_honoured(client):
    full = ask(client, "alpha")
    assert len(full) > 2
    stop = full[2:4]
    cut = ask(client, "alpha", stop=[stop])
    assert cut == full[: full.index(stop)]
    sampled = [client.completions.create(model="alpha", prompt=PROMPT, max_tokens=8, temperature=1.5, seed=3)
               .choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_models_lists_base_adapters_aliases_and_parents(client, served, runs, tiny_model_dir):
    models = {m.id: m for m in client.models.list().data}
    assert {str(tiny_model_dir), "alpha", "beta", "prod"} <= set(models)
    assert models["beta"].model_extra["parent"] == str(runs["alpha"])
    assert models["alpha"].model_extra["parent"] is None


def test_mixed_batch_matches_each_adapter_alone(client, served, tiny_model_dir):
    server = served[0]
    base = str(tiny_model_dir)
    names = ["alpha", "beta", base, "prod"]
    alone = {name: ask(client, name) for name in names}
    assert len({alone["alpha"], alone["beta"], alone[base]}) == 3  # three models, three answers
    assert alone["prod"] == alone["alpha"]
    together: dict[str, str] = {}
    threads = [threading.Thread(target=lambda n=n: together.__setitem__(n, ask(client, n))) for n in names]
    with server.scheduler.paused():  # every request queues, then all go as one batch
        wait_for_submitted(server, len(names), threads)
    for t in threads:
        t.join()
    assert together == alone
    assert sorted(server.scheduler.batches[-1]) == sorted(["alpha", "beta", "__base__", "alpha"])


def peft_model(runs, tiny_model_dir, *names: str):
    """The tiny model with the adapters of runs ``names`` (the first one active), and its tokenizer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    first, *rest = names
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                      runs[first] / "adapter", adapter_name=first).eval()
    for name in rest:
        model.load_adapter(runs[name] / "adapter", adapter_name=name)
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def decode_texts(model, tokenizer, specs) -> list[str]:
    """``decode_batch`` greedy on ``specs`` (adapter, prompt, max tokens) as one batch: each row's text."""
    from tunesmith.serve.engine import Job, decode_batch

    texts = [""] * len(specs)
    jobs = [Job(name, tokenizer(prompt).input_ids, Sampling(n, temperature=0),
                emit=lambda e, i=i: texts.__setitem__(i, texts[i] + e.text))
            for i, (name, prompt, n) in enumerate(specs)]
    decode_batch(model, tokenizer, jobs, mixed=True)
    return texts


def test_engine_matches_transformers_generate(runs, tiny_model_dir):
    """The decode loop's greedy answers are what peft + transformers' generate gives each prompt alone,
    for rows padded or not, and for a row that finishes early and leaves the batch."""
    model, tokenizer = peft_model(runs, tiny_model_dir, "alpha")
    specs = [("alpha", PROMPT, 6), ("alpha", "a dull boring story", 2), ("alpha", "the", 5)]
    for (_, prompt, n), text in zip(specs, decode_texts(model, tokenizer, specs)):
        ids = tokenizer(prompt).input_ids
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        assert text == tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def test_a_batch_routes_each_row_to_its_adapter_and_takes_one_adapters_matrices_once_one_is_left(
        runs, tiny_model_dir, monkeypatch):
    """Rows of two adapters and the base decode as each would alone with PEFT's own routing, routed
    by one stacked product per LoRA layer (``serve/lora_rows.py``); once the rows left share an
    adapter, each LoRA layer adds that adapter's delta with its own two matrices (PEFT's forward and
    its ``lora_A`` module never run); afterwards no hook or routing stays behind and a base-only batch
    leaves the adapters on."""
    from peft.tuners.lora import LoraLayer

    from tunesmith.serve import lora_rows
    from tunesmith.serve.engine import BASE

    monkeypatch.setenv("TUNESMITH_DECODER", "transformers")  # the path of models serve/decoder.py does not run
    model, tokenizer = peft_model(runs, tiny_model_dir, "alpha", "beta")
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    plain_calls: list[int] = []  # PEFT's own forward runs alpha's lora_A module; the routed products do not
    layer.lora_A["alpha"].register_forward_hook(lambda m, args, out: plain_calls.append(1))
    one: list[int] = []  # the one-adapter path ran in this layer's pass
    pair = lora_rows.StackedLora.pair  # asked only for one adapter's own matrices
    monkeypatch.setattr(lora_rows.StackedLora, "pair", lambda self, name: one.append(1) or pair(self, name))
    routing: list[str] = []  # per forward pass of one LoRA layer: how its rows were routed

    def clear(m, args, kwargs):
        plain_calls.clear()
        one.clear()

    def record(m, args, kwargs, out):
        routed = "forward" in vars(m) and not plain_calls
        routing.append(("one" if one else "stacked") if routed else "plain")

    clearing = layer.register_forward_pre_hook(clear, with_kwargs=True)
    layer.register_forward_hook(record, with_kwargs=True)

    def decode(specs):
        return decode_texts(model, tokenizer, specs)

    def alone(name, prompt, n):
        ids = tokenizer(prompt).input_ids
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, adapter_names=[name])
        return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)

    specs = [("alpha", PROMPT, 6), ("beta", "a dull boring story", 2), (BASE, "the", 3), ("alpha", "the", 5)]
    expected = [alone(*spec) for spec in specs]
    routing.clear()
    assert decode(specs) == expected
    assert len({*expected[:3]}) == 3
    # Three mixed steps (beta leaves after 2 tokens, the base after 3), then alpha's rows alone.
    assert routing == ["stacked"] * 3 + ["one"] * 3
    assert model.active_adapter == "alpha"
    # No hook but the test's own, and no routing, stays behind.
    assert not any(set(m._forward_pre_hooks) - {clearing.id} or "forward" in vars(m)
                   for m in model.modules() if isinstance(m, LoraLayer))

    base = alone(BASE, PROMPT, 4)
    routing.clear()
    assert decode([(BASE, PROMPT, 4)]) == [base]
    assert routing == ["one"] * 4
    assert decode([("beta", PROMPT, 4)]) == [alone("beta", PROMPT, 4)]  # the adapters are on again
    assert model.active_adapter == "beta"


def test_load_and_unload_at_run_time(client, served, runs):
    assert post(served, "/v1/load_lora_adapter", {"lora_name": "g", "lora_path": str(runs["gamma"])}).status_code == 200
    assert "g" in {m.id for m in client.models.list().data}
    answer = ask(client, "g")
    assert answer not in (ask(client, "alpha"), ask(client, "beta"))
    again = post(served, "/v1/load_lora_adapter", {"lora_name": "g2", "lora_path": str(runs["gamma"])})
    assert again.status_code == 400 and "at most 3 adapters" in again.json()["error"]["message"]
    assert post(served, "/v1/unload_lora_adapter", {"lora_name": "g"}).status_code == 200
    from openai import NotFoundError

    with pytest.raises(NotFoundError):
        ask(client, "g")


def test_paths_outside_the_adapter_directories_are_refused(served, runs, tiny_model_dir, tmp_path):
    for path in (str(tiny_model_dir), str(runs["root"] / ".." / tiny_model_dir.name), "/etc"):
        response = post(served, "/v1/load_lora_adapter", {"lora_name": "evil", "lora_path": path})
        assert response.status_code == 400
        assert "outside the adapter directories" in response.json()["error"]["message"]


def test_wrong_key_is_401(served):
    from openai import AuthenticationError, OpenAI

    with pytest.raises(AuthenticationError):
        OpenAI(base_url=served[1] + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(served[1] + "/health").json()["status"] == "ok"  # health needs no key


def test_oversized_request_is_413_and_caps_are_400(client):
    from openai import APIStatusError, BadRequestError

    with pytest.raises(APIStatusError) as err:
        ask(client, "alpha", prompt="word " * 2000)
    assert err.value.status_code == 413
    with pytest.raises(BadRequestError, match="at most 64"):
        ask(client, "alpha", prompt="the film " * 60)
    with pytest.raises(BadRequestError, match="cap of 32"):
        client.completions.create(model="alpha", prompt=PROMPT, max_tokens=500)


def test_oversized_body_without_a_length_is_413(served):
    def chunks():
        yield b'{"model": "alpha", "prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    response = httpx.post(served[1] + "/v1/completions", content=chunks(), timeout=30,
                          headers={"Authorization": "Bearer sekret", "Content-Type": "application/json"})
    assert response.status_code == 413, response.text
    assert "over 4000 bytes" in response.json()["error"]["message"]


def test_over_the_concurrency_limit_is_429(client, served):
    from openai import RateLimitError

    server = served[0]
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(ask(client, "alpha"))) for _ in range(4)]
    with server.scheduler.paused():  # four requests in flight (the limit), held
        wait_for_submitted(server, 4, threads)
        with pytest.raises(RateLimitError) as err:
            ask(client, "beta")
        assert err.value.response.headers["retry-after"] == "1"
    for t in threads:
        t.join()
    assert len(answers) == 4


def test_requests_are_logged_redacted_and_rated(client, served):
    from tunesmith.store import db

    out = client.chat.completions.create(
        model="prod", messages=[{"role": "user", "content": "mail me at jane.doe@example.com"}],
        max_tokens=4, temperature=0)
    store = db.connect(served[2])
    row = store.execute("SELECT * FROM answers WHERE id = ?", (out.id,)).fetchone()
    assert row["source"] == "served" and row["run"] == "alpha"
    assert row["prompt"] == "mail me at <EMAIL>"
    assert row["completion_tokens"] == out.usage.completion_tokens and row["latency_ms"] > 0
    assert json.loads(row["meta"])["key_id"] == "team-a"
    rated = post(served, "/v1/feedback", {"id": out.id, "thumbs": "up", "comment": "good"})
    assert rated.status_code == 200, rated.text
    rating = store.execute("SELECT * FROM ratings WHERE answer_id = ?", (out.id,)).fetchone()
    assert rating["score"] == 1.0 and rating["rater"] == "team-a"
    assert post(served, "/v1/feedback", {"id": "nope", "score": 1}).status_code == 404
    assert post(served, "/v1/feedback", {"id": out.id}).status_code == 400
    for field, value in (("label", "x" * 257), ("id", "")):
        unbounded = post(served, "/v1/feedback", {"id": out.id, "score": 1, field: value})
        assert (unbounded.status_code, unbounded.json()["error"]["param"]) == (400, field)
    # Over this test server's body cap, and not JSON as httpx writes it: checked on the schema alone.
    for field, value in (("comment", "c" * 4001), ("score", float("inf"))):
        with pytest.raises(ValidationError, match=field):
            Feedback(**{"id": out.id, "score": 1, field: value})


def test_base_alone_then_adapters_loaded_and_unloaded(runs, tiny_model_dir):
    """A pool started on the base alone becomes a PEFT model at its first load, and answers as the
    base again once every adapter is gone."""
    from tunesmith.serve.adapters import AdapterPool
    from tunesmith.serve.engine import BASE, Job

    pool = AdapterPool(str(tiny_model_dir), adapter_dirs=[runs["root"]])

    def answer(adapter: str) -> str:
        pieces = []
        ids = pool.tokenizer(PROMPT).input_ids
        pool.run([Job(adapter, ids, Sampling(6, temperature=0), emit=lambda e: pieces.append(e.text))])
        return "".join(pieces)

    base = answer(BASE)
    pool.load("a", str(runs["alpha"]))
    assert pool.resolve("a") == "a" and answer("a") != base
    pool.load("b", str(runs["beta"]))
    beta = answer("b")  # now the active adapter
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT warns when it has to pick a new active adapter itself
        pool.unload("b")
    assert answer("a") not in (base, beta)
    pool.unload("a")
    assert pool.resolve("a") is None and answer(BASE) == base
    with pytest.raises(TunesmithError, match="outside the adapter directories"):
        pool.load("b", str(runs["root"]) + "/../x")


def _alias_of(url: str, alias: str) -> str | None:
    models = httpx.get(url + "/v1/models", timeout=30).json()["data"]
    return next((m["alias_of"] for m in models if m["id"] == alias), None)


def test_a_promotion_in_the_alias_file_moves_live_traffic(runs, tmp_path):
    """retrain's write_alias moves ``prod`` from alpha to gamma (not loaded yet) while the server runs."""
    from openai import OpenAI

    from tunesmith.retrain.loop import write_alias

    aliases = tmp_path / "aliases.json"
    write_alias(aliases, "prod", runs["alpha"])
    server = build_server({"alpha": runs["alpha"]}, adapter_dirs=[runs["root"]], alias_file=aliases,
                          options=ServeOptions(batch_window_ms=0), log_requests=False)
    with server.in_thread() as url:
        client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        assert _alias_of(url, "prod") == "alpha"
        before = ask(client, "prod")
        assert before == ask(client, "alpha")
        write_alias(aliases, "prod", runs["gamma"])
        for _ in range(200):  # the server looks at the file at most once a second
            if _alias_of(url, "prod") == "gamma":
                break
            threading.Event().wait(0.05)
        assert _alias_of(url, "prod") == "gamma"
        after = client.completions.create(model="prod", prompt=PROMPT, max_tokens=8, temperature=0)
        assert after.choices[0].text == ask(client, "gamma") != before
        assert server.pool.adapters["gamma"].run == runs["gamma"].resolve()
        assert "alpha" in server.pool.adapters  # named at startup: it stays after the alias left it


def test_a_bad_alias_file_is_logged_and_the_aliases_stay(runs, tiny_model_dir, tmp_path, caplog):
    from tunesmith.serve.adapters import AdapterPool
    from tunesmith.serve.aliases import AliasFile

    pool = AdapterPool(str(tiny_model_dir), adapter_dirs=[runs["root"]], max_adapters=1)
    path = tmp_path / "aliases.json"
    watch = AliasFile(pool, path, every_s=0)
    watch.refresh()  # no file yet: nothing to do
    assert pool.aliases == {}
    path.write_text(json.dumps({"prod": str(runs["alpha"])}))
    watch.refresh()
    assert pool.aliases == {"prod": "alpha"} and list(pool.adapters) == ["alpha"]
    cases = {"{not json": "line 1: not JSON", "[1, 2]": "expected a JSON object",
             json.dumps({"prod": 3}): "alias 'prod': expected a non-empty run directory",
             json.dumps({"prod": "/etc"}): "outside the adapter directories",
             json.dumps({"prod": str(runs["beta"])}): "at most 1 adapters"}
    for text, message in cases.items():
        caplog.clear()
        path.write_text(text)
        watch.refresh()  # logs, and neither raises nor moves the alias
        assert message in caplog.text
        assert pool.aliases == {"prod": "alpha"} and list(pool.adapters) == ["alpha"]
    path.write_text("{}")
    watch.refresh()
    assert pool.aliases == {}  # an alias taken out of the file goes
    assert pool.adapters == {}  # and so does the adapter the file loaded for it


def test_promotions_unload_the_old_adapter_once_its_queued_requests_are_answered(runs, tiny_model_dir, tmp_path):
    """Three promotions with room for two adapters: each old target leaves memory, but not before the
    request already claimed for it has been decoded with it."""
    from tunesmith.serve.adapters import AdapterPool
    from tunesmith.serve.aliases import AliasFile
    from tunesmith.serve.engine import Job

    pool = AdapterPool(str(tiny_model_dir), adapter_dirs=[runs["root"]], max_adapters=2)
    path = tmp_path / "aliases.json"
    watch = AliasFile(pool, path, every_s=0)

    def promote(run: str) -> None:
        path.write_text(json.dumps({"prod": str(runs[run])}))
        watch.refresh()
        assert pool.aliases == {"prod": run}

    promote("alpha")
    queued = pool.claim("prod")  # a request for prod, waiting for its batch
    promote("beta")
    assert queued == "alpha" and set(pool.adapters) == {"alpha", "beta"}  # alpha waits for its request
    events = []
    pool.run([Job(queued, pool.tokenizer(PROMPT).input_ids, Sampling(4, temperature=0), emit=events.append)])
    assert [e.kind for e in events][-1] == "done" and "error" not in [e.kind for e in events]
    assert set(pool.adapters) == {"beta"} and not pool.pending
    promote("gamma")  # nothing waits for beta: it goes at once
    assert set(pool.adapters) == {"gamma"}
    promote("alpha")  # a third promotion still finds room
    assert set(pool.adapters) == {"alpha"}


def test_runs_on_another_base_are_refused(runs, tiny_model_dir, tmp_path):
    """(A method not served on a shared base: tests/test_serve_methods.py.)"""
    from conftest import make_model_dir

    other = make_run(tmp_path, make_model_dir(tmp_path / "other-base"), "other", seed=1)
    with pytest.raises(TunesmithError, match="all adapters must share one base model"):
        build_server({"alpha": runs["alpha"], "other": other}, log_requests=False)


def test_binding_beyond_localhost_needs_keys(runs, capsys):
    from conftest import cli_fails

    cli_fails(capsys, ["serve", str(runs["alpha"]), "--host", "0.0.0.0", "--store", str(runs["root"] / "s.db")],
              "binding beyond localhost needs API keys")


def test_the_commands_in_docs_serving_parse():
    import re
    import shlex
    from pathlib import Path

    from tunesmith.cli import build_parser

    doc = (Path(__file__).parent.parent / "docs" / "serving.md").read_text()
    lines = [line.split("#")[0].strip() for block in re.findall(r"```bash\n(.*?)```", doc, re.DOTALL)
             for line in block.splitlines()]
    commands = [shlex.split(line)[1:] for line in lines if line.startswith("tunesmith ")]
    assert len(commands) == 3
    for argv in commands:
        assert build_parser().parse_args(argv).command == "serve"
