"""tunesmith serve: response_format json_object and json_schema through constrained decoding.

The tiny model's weights are random, so left to itself it writes no JSON at all: every answer that
parses and validates here does so because the grammar's mask left it no other token. Driven by the
real openai client against a live server, and the mask itself checked step by step against a slow
reference that tries every token of the vocabulary.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
import torch
from conftest import NEGATIVE, NOUNS, POSITIVE, make_tokenizer
from test_serve import PROMPT, make_run, peft_model

from tunesmith.serve import structured
from tunesmith.serve.engine import Event, Job, Sampling, decode_batch
from tunesmith.serve.options import ServeOptions
from tunesmith.serve.schemas import ChatRequest
from tunesmith.serve.server import build_server

REVIEW = {
    "type": "object",
    "properties": {
        "label": {"enum": ["positive", "negative"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 10},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["label", "score", "tags"],
    "additionalProperties": False,
}
REVIEW_FORMAT = {"type": "json_schema", "json_schema": {"name": "review", "schema": REVIEW, "strict": True}}
PROMPTS = [f"classify sentiment: a {word} {noun}" for word, noun in zip(POSITIVE + NEGATIVE, NOUNS * 2)]
PROMPTS += [f"review is {word}" for word in POSITIVE[:4]]


def nested(depth: int) -> dict:
    schema = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("structured-runs")
    return {"root": root, "alpha": make_run(root, tiny_model_dir, "alpha", seed=1)}


@pytest.fixture(scope="module")
def served(runs):
    options = ServeOptions(max_prompt_tokens=64, max_tokens=120, max_batch=8, batch_window_ms=20)
    server = build_server({"alpha": runs["alpha"]}, options=options, log_requests=False)
    with server.in_thread() as url:
        yield server, url


@pytest.fixture
def client(served):
    from openai import OpenAI

    return OpenAI(base_url=served[1] + "/v1", api_key="none", max_retries=0)


# Through the openai client.
def test_json_schema_answers_parse_and_validate_for_20_prompts(client):
    assert len(PROMPTS) == 20
    answers = []
    for i, prompt in enumerate(PROMPTS):
        sampled = {"temperature": 1.0, "seed": i} if i % 2 else {"temperature": 0}
        out = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": prompt}],
                                             max_tokens=120, response_format=REVIEW_FORMAT, **sampled)
        choice = out.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        answer = json.loads(choice.message.content)
        jsonschema.validate(answer, REVIEW)
        answers.append(answer)
    assert len({json.dumps(a) for a in answers}) > 1  # the model chose, within the grammar


def test_without_the_grammar_the_tiny_model_writes_no_json(client):
    """What makes the test above mean something: the same model, unconstrained, does not write JSON."""
    for prompt in PROMPTS[:5]:
        out = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": prompt}],
                                             max_tokens=40, temperature=0)
        with pytest.raises(json.JSONDecodeError):
            json.loads(out.choices[0].message.content)


def test_json_object_answers_parse_whole_and_streamed(client):
    """Any object: a finished answer parses. The random model may also write one long key until the
    token limit; that answer says "length" and is the start of an object (see the test below)."""
    reasons = []
    for i, prompt in enumerate(PROMPTS[:8]):
        out = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": prompt}],
                                             max_tokens=60, temperature=1.0, seed=i,
                                             response_format={"type": "json_object"})
        choice = out.choices[0]
        reasons.append(choice.finish_reason)
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
        else:
            assert choice.finish_reason == "length" and choice.message.content.startswith("{")
    assert reasons.count("stop") >= 4, reasons
    chunks = list(client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": PROMPT}],
                                                 max_tokens=120, temperature=0, stream=True,
                                                 response_format=REVIEW_FORMAT))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), REVIEW)
    # /v1/completions takes it too (as vLLM does).
    out = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=120, temperature=0,
                                    extra_body={"response_format": REVIEW_FORMAT})
    jsonschema.validate(json.loads(out.choices[0].text), REVIEW)


def test_n_choices_each_follow_the_grammar(client):
    out = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": PROMPT}], n=3,
                                         max_tokens=120, temperature=1.0, seed=3, response_format=REVIEW_FORMAT)
    answers = [json.loads(c.message.content) for c in out.choices]
    for answer in answers:
        jsonschema.validate(answer, REVIEW)
    assert len({json.dumps(a) for a in answers}) > 1


def test_max_tokens_cut_mid_json_is_length(client):
    """As OpenAI: the token limit ends the answer where it is; finish_reason says so, and the JSON is incomplete."""
    out = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": PROMPT}],
                                         max_tokens=5, temperature=0, response_format=REVIEW_FORMAT)
    choice = out.choices[0]
    assert choice.finish_reason == "length" and out.usage.completion_tokens == 5
    assert choice.message.content.startswith('{"')
    with pytest.raises(json.JSONDecodeError):
        json.loads(choice.message.content)


INVALID = [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}, "not"),  # not implemented
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}, "nowhere"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "("}}}, "regex"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "thing"}}}, "thing"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"minimum": "low"}}}, "minimum"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1, 2]}}, "schema"),
    # A $ref to itself compiles, but no answer can start: refused here, not a 500 at the first token.
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$defs": {"a": {"$ref": "#/$defs/a"}},
                                                                     "$ref": "#/$defs/a"}}}, "enforced"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": nested(100)}}, "nested"),
    ({"type": "json_schema", "json_schema": {"name": "no spaces", "schema": {}}}, "name"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "name"),
    ({"type": "json_schema"}, "json_schema"),
    ({"type": "json_object", "json_schema": {"name": "x"}}, "json_schema"),
    ({"type": "xml"}, "response_format"),
    ("json", "response_format"),
]


@pytest.mark.parametrize(("response_format", "why"), INVALID, ids=[str(i) for i in range(len(INVALID))])
def test_an_invalid_or_unsupported_schema_is_400_naming_response_format(served, response_format, why):
    for route, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}]}),
                        ("/v1/completions", {"prompt": PROMPT})):
        out = httpx.post(served[1] + route, json={"model": "alpha", "max_tokens": 4, **body,
                                                  "response_format": response_format}, timeout=30)
        assert out.status_code == 400, out.text
        error = out.json()["error"]
        assert error["param"].startswith("response_format") and why in error["message"], error


def test_a_schema_nested_thousands_deep_is_refused_before_llguidance_sees_it():
    """llguidance turns a Python dict into its own JSON recursively: a schema 10,000 levels deep
    overflowed its stack and killed the whole process (a segmentation fault, not an exception)."""
    tokenizer = make_tokenizer()
    body = ChatRequest(model="m", messages=[{"role": "user", "content": "x"}],
                       response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": nested(10_000)}})
    with pytest.raises(ValueError, match="nested over"):
        structured.grammar_for(body.response_format, tokenizer, {tokenizer.eos_token_id})
    assert structured.nesting(nested(10)) == 11 and structured.nesting(nested(10_000)) == structured.MAX_NESTING + 1


def test_text_and_null_ask_for_free_text(client):
    plain = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": PROMPT}],
                                           max_tokens=6, temperature=0)
    for response_format in ({"type": "text"}, None):
        out = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": PROMPT}], max_tokens=6,
                                             temperature=0, extra_body={"response_format": response_format})
        assert out.choices[0].message.content == plain.choices[0].message.content


# The mask, step by step.
BOOL = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
BOOL_ANSWERS = ['{"ok": true}', '{"ok": false}']


def grammar(schema: dict, tokenizer) -> str:
    body = ChatRequest(model="m", messages=[{"role": "user", "content": "x"}],
                       response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": schema}})
    return structured.grammar_for(body.response_format, tokenizer, {tokenizer.eos_token_id})


def test_the_mask_allows_exactly_the_tokens_that_continue_a_valid_answer():
    """At each step, the tokens left finite are those whose text keeps the answer a prefix of a valid
    one (the slow reference: every token of the vocabulary tried); the end of sequence only once the
    answer is whole. Logits that favour the highest token ids (none of them JSON) cannot get out."""
    tokenizer = make_tokenizer()
    eos = tokenizer.eos_token_id
    constraint = structured.Constraint(grammar(BOOL, tokenizer), tokenizer, {eos})
    texts = [tokenizer.decode([t]) for t in range(len(tokenizer))]
    logits = torch.arange(len(tokenizer), dtype=torch.float32)
    answer = ""
    for _ in range(len(BOOL_ANSWERS[1])):
        masked = constraint.mask(logits)
        allowed = {t for t in range(len(tokenizer)) if masked[t] > float("-inf")}
        reference = {t for t, text in enumerate(texts)
                     if text and t not in tokenizer.all_special_ids
                     and any(a.startswith(answer + text) for a in BOOL_ANSWERS)}
        assert allowed == reference, answer
        assert all(masked[t] == logits[t] for t in allowed)
        token = int(masked.argmax())
        constraint.take(token)
        answer += texts[token]
        if constraint.complete:
            break
    assert answer in BOOL_ANSWERS and constraint.complete
    assert answer == '{"ok": true}'  # "t" outranks "f" in the arange logits: the model's choice, within the grammar


def test_a_constrained_row_beside_free_rows_leaves_them_as_they_were(runs, tiny_model_dir):
    """Batch-mates: rows without a response_format answer as they would alone, and a row whose grammar
    fails (here a grammar llguidance refuses, straight to the engine) fails alone."""
    model, tokenizer = peft_model(runs, tiny_model_dir, "alpha")
    ids = tokenizer(PROMPT).input_ids
    review = grammar(REVIEW, tokenizer)

    def run(samplings: list[Sampling]) -> list[list[Event]]:
        events: list[list[Event]] = [[] for _ in samplings]
        decode_batch(model, tokenizer, [Job("alpha", ids, s, emit=events[i].append) for i, s in enumerate(samplings)],
                     mixed=True)
        return events

    def text(events: list[Event]) -> str:
        return "".join(e.text for e in events if e.kind == "text")

    free = [Sampling(8, temperature=0), Sampling(8, temperature=0.9, seed=4)]
    alone = [text(run([s])[0]) for s in free]
    batch = run([free[0], Sampling(120, temperature=0, grammar=review), free[1],
                 Sampling(120, temperature=0, grammar="%%% not a grammar")])
    assert [text(batch[0]), text(batch[2])] == alone
    jsonschema.validate(json.loads(text(batch[1])), REVIEW)
    assert batch[3][-1].kind == "error" and "grammar" in batch[3][-1].text
    assert [batch[i][-1].finish_reason for i in (0, 1, 2)] == ["length", "stop", "length"]


def test_the_engine_ends_a_row_once_its_grammar_is_complete(runs, tiny_model_dir):
    """Once the JSON is whole the grammar allows nothing but the end: the row stops there, with
    "stop", not at its token limit; and "stop" too when the JSON is whole at the limit's last token."""
    model, tokenizer = peft_model(runs, tiny_model_dir, "alpha")

    def answer(max_tokens: int) -> tuple[str, Event]:
        events: list[Event] = []
        decode_batch(model, tokenizer, [Job("alpha", tokenizer(PROMPT).input_ids,
                                            Sampling(max_tokens, temperature=0, grammar=grammar(BOOL, tokenizer)),
                                            emit=events.append)], mixed=True)
        return "".join(e.text for e in events if e.kind == "text"), events[-1]

    text, done = answer(50)
    assert text in BOOL_ANSWERS and done.finish_reason == "stop" and done.completion_tokens < 50
    assert answer(done.completion_tokens) == (text, done)
    cut, short = answer(done.completion_tokens - 1)
    assert short.finish_reason == "length" and text.startswith(cut) and cut != text
