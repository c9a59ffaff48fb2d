"""tunesmith serve and the OpenAI fields clients rely on, driven by the real openai client against a
live server on the tiny model: logprobs in the chat and the completions shapes (whole and streamed),
n > 1 (one prefill, its own seed stream per choice), stream_options.include_usage, the fields that
are not implemented refused with 400 naming them, and a non-streamed request dropped once its
client has gone.
"""

from __future__ import annotations

import math
import threading

import httpx
import pytest
import torch
from conftest import record_passes
from test_serve import PROMPT, make_run, peft_model, wait_for_submitted

from tunesmith.serve.engine import Job, Sampling, decode_batch
from tunesmith.serve.options import ServeOptions
from tunesmith.serve.server import build_server
from tunesmith.serve.unsupported import IGNORED, REFUSED

MESSAGES = [{"role": "user", "content": PROMPT}]
SPECIAL = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}  # conftest's tokenizer: named in logprobs, not in text


def visible(tokens: list[str]) -> list[str]:
    return [t if t not in SPECIAL else "" for t in tokens]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fields-runs")
    return {"root": root, "alpha": make_run(root, tiny_model_dir, "alpha", seed=1)}


@pytest.fixture(scope="module")
def served(runs):
    options = ServeOptions(max_prompt_tokens=64, max_tokens=32, max_batch=8, batch_window_ms=20)
    server = build_server({"alpha": runs["alpha"]}, options=options, log_requests=False)
    with server.in_thread() as url:
        yield server, url


@pytest.fixture
def client(served):
    from openai import OpenAI

    return OpenAI(base_url=served[1] + "/v1", api_key="none", max_retries=0)


# logprobs
def test_chat_logprobs_whole_and_streamed(client):
    out = client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=6, temperature=0,
                                         logprobs=True, top_logprobs=3)
    choice = out.choices[0]
    content = choice.logprobs.content
    assert len(content) == out.usage.completion_tokens
    assert "".join(visible([t.token for t in content])) == choice.message.content
    for t in content:
        assert t.logprob <= 0 and t.bytes == list(t.token.encode())
        assert len(t.top_logprobs) == 3
        assert [x.logprob for x in t.top_logprobs] == sorted((x.logprob for x in t.top_logprobs), reverse=True)
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
    chunks = list(client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=6, temperature=0,
                                                 logprobs=True, top_logprobs=3, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    plain = client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == choice.message.content


def test_completion_logprobs_whole_and_streamed(client):
    out = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2)
    choice = out.choices[0]
    lp = choice.logprobs
    assert "".join(visible(lp.tokens)) == choice.text and len(lp.tokens) == out.usage.completion_tokens
    assert lp.text_offset == [len("".join(visible(lp.tokens[:i]))) for i in range(len(lp.tokens))]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert token in top and top[token] == pytest.approx(logprob)
        assert len(top) == 2 and logprob == pytest.approx(max(top.values()))  # greedy: the most likely
    chunks = list(client.completions.create(model="alpha", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2,
                                            stream=True))
    streamed = [(tok, off) for c in chunks if c.choices and c.choices[0].logprobs
                for tok, off in zip(c.choices[0].logprobs.tokens, c.choices[0].logprobs.text_offset)]
    assert streamed == list(zip(lp.tokens, lp.text_offset))


def test_logprobs_are_the_models_own_probabilities(client, runs, tiny_model_dir):
    """A classifier-like question: the logprobs given for the next token are the softmax the adapter
    computes, whatever the sampling temperature, and as probabilities sum to at most 1 (so the
    probability of a label token can be read from them)."""
    model, tokenizer = peft_model(runs, tiny_model_dir, "alpha")

    def model_logprobs(ids: list[int]) -> tuple[dict[str, list[float]], list[float]]:
        """Each token text's log-probabilities (byte tokens share the text "\ufffd"), and all of them, descending."""
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
        by_text: dict[str, list[float]] = {}
        for i, v in enumerate(logp.tolist()):
            by_text.setdefault(tokenizer.decode([i]), []).append(v)
        return by_text, sorted(logp.tolist(), reverse=True)

    def assert_the_models(given: dict[str, float], by_text: dict[str, list[float]]) -> None:
        for token, value in given.items():
            assert any(value == pytest.approx(v, abs=1e-4) for v in by_text[token]), token
        assert sum(math.exp(v) for v in given.values()) <= 1 + 1e-6

    prompt = "classify sentiment: a wonderful moving story. review is"
    by_text, ranked = model_logprobs(tokenizer(prompt).input_ids)
    for temperature in (0, 1.5):
        out = client.completions.create(model="alpha", prompt=prompt, max_tokens=1, temperature=temperature,
                                        seed=1, logprobs=20)
        given = out.choices[0].logprobs.top_logprobs[0]  # the 20 most likely, and the one drawn
        assert_the_models(given, by_text)
        assert max(given.values()) == pytest.approx(ranked[0], abs=1e-4)

    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    by_text, ranked = model_logprobs(tokenizer(text, add_special_tokens=False).input_ids)
    chat = client.chat.completions.create(model="alpha", max_tokens=1, temperature=0, logprobs=True, top_logprobs=20,
                                          messages=[{"role": "user", "content": prompt}])
    top = chat.choices[0].logprobs.content[0].top_logprobs
    assert [t.logprob for t in top] == pytest.approx(ranked[:20], abs=1e-4)
    assert_the_models({t.token: t.logprob for t in top}, by_text)


# n > 1
def test_n_choices_share_one_prefill_and_have_their_own_seed_streams(runs, tiny_model_dir, monkeypatch):
    """A job of n=3 runs its prompt once (one row), then decodes three rows; with a seed, choice 0 is
    the n=1 answer and the others differ, and the whole repeats."""
    model, tokenizer = peft_model(runs, tiny_model_dir, "alpha")
    shapes: list[tuple[int, int]] = []
    record_passes(model, lambda ids: shapes.append(tuple(ids.shape)), monkeypatch)
    ids = tokenizer(PROMPT).input_ids

    def texts(sampling: Sampling) -> list[str]:
        out = [""] * sampling.n
        decode_batch(model, tokenizer, [Job("alpha", ids, sampling, emit=lambda e: out.__setitem__(
            e.index, out[e.index] + e.text))], mixed=False)
        return out

    three = texts(Sampling(6, temperature=1.0, seed=11, n=3))
    assert shapes[0] == (1, len(ids)) and shapes[1:] == [(3, 1)] * 5
    assert texts(Sampling(6, temperature=1.0, seed=11, n=3)) == three
    assert texts(Sampling(6, temperature=1.0, seed=11))[0] == three[0]
    assert len(set(three)) > 1
    greedy = texts(Sampling(6, temperature=0, n=2))
    assert greedy[0] == greedy[1] == texts(Sampling(6, temperature=0))[0]


def test_n_choices_through_the_client(client):
    out = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=5, temperature=1.0, seed=3, n=3)
    assert [c.index for c in out.choices] == [0, 1, 2]
    again = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=5, temperature=1.0, seed=3, n=3)
    assert [c.text for c in again.choices] == [c.text for c in out.choices]
    single = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=5, temperature=1.0, seed=3)
    assert single.choices[0].text == out.choices[0].text
    assert out.usage.completion_tokens == 15 and out.usage.prompt_tokens == single.usage.prompt_tokens
    chunks = list(client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=4, temperature=1.0,
                                                 seed=3, n=2, stream=True, stream_options={"include_usage": True}))
    whole = client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=4, temperature=1.0, seed=3, n=2)
    for i in range(2):
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
        assert text == whole.choices[i].message.content
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].index == i][-1] == "length"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 8


def test_n_over_the_batch_is_400(client):
    from openai import BadRequestError

    with pytest.raises(BadRequestError) as err:
        client.completions.create(model="alpha", prompt=PROMPT, max_tokens=2, n=9)
    assert err.value.param == "n"


# stream_options
def test_include_usage_adds_a_last_chunk_with_usage(client):
    chunks = list(client.completions.create(model="alpha", prompt=PROMPT, max_tokens=4, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(client.completions.create(model="alpha", prompt=PROMPT, max_tokens=4, temperature=0, stream=True))
    assert all(c.usage is None for c in plain) and plain[-1].choices


# Fields not implemented
REFUSALS = [
    ("chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ("chat", {"tool_choice": "required"}, "tool_choice"),
    ("chat", {"functions": [{"name": "f"}]}, "functions"),
    ("chat", {"logit_bias": {"5": 100}}, "logit_bias"),
    ("chat", {"presence_penalty": 0.5}, "presence_penalty"),
    ("completions", {"frequency_penalty": 1.0}, "frequency_penalty"),
    ("completions", {"best_of": 2}, "best_of"),
    ("completions", {"echo": True}, "echo"),
    ("completions", {"suffix": "end"}, "suffix"),
    ("chat", {"top_k": 5}, "top_k"),  # vLLM's, not OpenAI's: unknown here, so refused
    ("chat", {"modalities": ["text", "audio"]}, "modalities"),
]


@pytest.mark.parametrize(("route", "extra", "field"), REFUSALS, ids=[f for _, _, f in REFUSALS])
def test_fields_not_implemented_are_400_naming_them(client, route, extra, field):
    from openai import BadRequestError

    with pytest.raises(BadRequestError) as err:
        if route == "chat":
            client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=2, extra_body=extra)
        else:
            client.completions.create(model="alpha", prompt=PROMPT, max_tokens=2, extra_body=extra)
    assert err.value.param == field and field in err.value.message


def test_fields_that_ask_for_nothing_are_accepted(client):
    out = client.chat.completions.create(
        model="alpha", messages=MESSAGES, max_tokens=2, temperature=0, tools=[], presence_penalty=0,
        frequency_penalty=0, response_format={"type": "text"}, logit_bias={}, user="u-1", metadata={"a": "b"},
        store=False, extra_body={"top_k": None})
    assert out.choices[0].message.content is not None
    assert client.completions.create(model="alpha", prompt=PROMPT, max_tokens=2, echo=False, best_of=1,
                                     suffix=None).choices


def test_the_table_covers_every_field_of_the_openai_client():
    """Every parameter of the installed client's two create calls is implemented, refused or ignored."""
    import inspect

    from openai.resources.chat.completions import Completions as Chat
    from openai.resources.completions import Completions

    from tunesmith.serve.schemas import ChatRequest, CompletionRequest

    skip = {"self", "extra_headers", "extra_query", "extra_body", "timeout"}
    for create, schema in ((Chat.create, ChatRequest), (Completions.create, CompletionRequest)):
        fields = set(inspect.signature(create).parameters) - skip
        unknown = fields - set(schema.model_fields) - set(REFUSED) - IGNORED
        assert not unknown, f"add {unknown} to serve/unsupported.py"


# A client that leaves
def test_a_non_streamed_request_whose_client_left_is_dropped(served):
    """The client gives up while its request waits for a batch; the engine never decodes it."""
    server, url = served
    seen: list[bool] = []
    run_batch = server.scheduler.run_batch

    def recording(jobs, more):
        seen.extend(job.cancelled.is_set() for job in jobs)
        run_batch(jobs, more)

    server.scheduler.run_batch = recording
    try:
        def impatient():
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(url + "/v1/completions", json={"model": "alpha", "prompt": PROMPT, "max_tokens": 8},
                           timeout=0.5)

        thread = threading.Thread(target=impatient)
        with server.scheduler.paused():
            wait_for_submitted(server, 1, [thread])
            thread.join()
            threading.Event().wait(0.5)  # the server looks for the disconnect every 0.1 s
        for _ in range(100):
            if seen:
                break
            threading.Event().wait(0.05)
    finally:
        server.scheduler.run_batch = run_batch
    assert seen == [True]


def test_docs_security_lists_the_refused_and_ignored_fields():
    import re
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "security.md").read_text()
    section = doc[doc.index("## OpenAI fields"):]
    table = re.findall(r"^\| `(\w+)` \|", section, re.MULTILINE)
    assert table == list(REFUSED)
    ignored = section[section.index("Accepted and ignored"):section.index("Any other field")]
    assert IGNORED <= set(re.findall(r"`(\w+)`", ignored))
