"""tunesmith serve: one request's bad input or failure stays its own.

Sampling fields are checked at the edge (400 naming the field, before anything is queued), and a
failure inside generation fails only the request it belongs to: the rest of its batch answers.
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from conftest import record_passes
from test_serve import PROMPT, make_run, peft_model, wait_for_submitted

from tunesmith.serve import engine
from tunesmith.serve.engine import Event, Job, Sampling, Scheduler, decode_batch
from tunesmith.serve.options import ServeOptions
from tunesmith.serve.server import build_server


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("isolation-runs")
    return {"root": root, "alpha": make_run(root, tiny_model_dir, "alpha", seed=1),
            "beta": make_run(root, tiny_model_dir, "beta", seed=2)}


@pytest.fixture(scope="module")
def served(runs):
    options = ServeOptions(max_prompt_tokens=64, max_tokens=32, batch_window_ms=50)
    server = build_server({"alpha": runs["alpha"], "beta": runs["beta"]}, options=options, log_requests=False)
    with server.in_thread() as url:
        yield server, url


def post(url: str, route: str, body: dict) -> httpx.Response:
    return httpx.post(url + route, json=body, timeout=60)


def collect(jobs_events: list[list[Event]]):
    """The text and the last event of each job's events."""
    return [("".join(e.text for e in events if e.kind == "text"), events[-1]) for events in jobs_events]


def run_jobs(model, tokenizer, specs: list[tuple[str, Sampling]]) -> list[list[Event]]:
    """``decode_batch`` on (adapter, sampling) rows of PROMPT as one batch: each job's events."""
    events: list[list[Event]] = [[] for _ in specs]
    ids = tokenizer(PROMPT).input_ids
    jobs = [Job(name, ids, sampling, emit=events[i].append) for i, (name, sampling) in enumerate(specs)]
    decode_batch(model, tokenizer, jobs, mixed=True)
    return events


# The engine.
def test_a_request_whose_sampling_breaks_fails_alone(runs, tiny_model_dir):
    """A temperature of 1e-40 turns its probabilities into nan; before, torch.multinomial's error failed
    the whole batch. Now that row gets an error and the three others answer as they would alone."""
    model, tokenizer = peft_model(runs, tiny_model_dir, "alpha", "beta")
    good = [("alpha", Sampling(6, temperature=0)), ("beta", Sampling(6, temperature=0)),
            ("alpha", Sampling(6, temperature=0.8, seed=5))]
    alone = [collect(run_jobs(model, tokenizer, [spec]))[0][0] for spec in good]
    poisoned = good[:2] + [("beta", Sampling(6, temperature=1e-40))] + good[2:]
    results = collect(run_jobs(model, tokenizer, poisoned))
    bad_text, bad = results.pop(2)
    assert bad.kind == "error" and "generation failed" in bad.text
    assert [(r.kind, r.finish_reason) for _, r in results] == [("done", "length")] * 3
    assert [text for text, _ in results] == alone


def test_a_cancelled_job_leaves_the_batch(runs, tiny_model_dir, monkeypatch):
    """A job cancelled while queued is never prefilled; one cancelled while decoding leaves at the next step."""
    model, tokenizer = peft_model(runs, tiny_model_dir, "alpha")
    widths: list[int] = []
    record_passes(model, lambda ids: widths.append(len(ids)), monkeypatch)
    ids = tokenizer(PROMPT).input_ids
    events: list[list[Event]] = [[], [], []]
    jobs = [Job("alpha", ids, Sampling(8, temperature=0), emit=events[i].append) for i in range(3)]
    jobs[0].cancelled.set()

    def cancel_after_two_tokens(event: Event) -> None:
        events[1].append(event)
        if len(events[1]) == 2:
            jobs[1].cancelled.set()

    jobs[1].emit = cancel_after_two_tokens
    decode_batch(model, tokenizer, jobs, mixed=False)
    assert [e.finish_reason for e in events[0]] == ["cancelled"] and events[0][0].completion_tokens == 0
    assert events[1][-1].finish_reason == "cancelled" and events[1][-1].completion_tokens <= 3
    assert events[2][-1].finish_reason == "length" and events[2][-1].completion_tokens == 8
    assert widths[0] == 2  # the prefill: the cancelled job had no row
    assert widths[-1] == 1  # the cancelled row left; the last steps decode one row


def test_the_scheduler_counts_rows_not_requests():
    """With room for 4 rows, jobs of 3, 3 and 1 choices make two batches: 3 (the second does not fit), then 3 + 1."""
    batches: list[list[int]] = []
    done = threading.Event()

    def run_batch(jobs, more):
        batches.append([job.sampling.n for job in jobs])
        if sum(len(b) for b in batches) == 3:
            done.set()

    scheduler = Scheduler(run_batch, window_s=0.05, max_batch=4)
    with scheduler.paused():
        scheduler.start()
        for n in (3, 3, 1):
            scheduler.submit(Job("a", [1], Sampling(1, n=n), emit=lambda e: None))
    assert done.wait(10)
    scheduler.stop()
    assert batches == [[3], [3, 1]]


# The server.
def test_a_poisoned_request_in_a_batch_of_four_fails_alone(served, monkeypatch):
    """Four requests decoded as one batch; the sampling of one (seed 666) raises. Three answer 200
    with what they answer alone; that one gets 500 with the reason."""
    server, url = served
    real = engine.next_token

    def poisoned(logits, sampling, generator):
        if sampling.seed == 666:
            raise RuntimeError("poisoned row")
        return real(logits, sampling, generator)

    monkeypatch.setattr(engine, "next_token", poisoned)
    bodies = [{"model": m, "prompt": PROMPT, "max_tokens": 6, "temperature": 0} for m in ("alpha", "beta", "alpha")]
    bodies.insert(1, {"model": "beta", "prompt": PROMPT, "max_tokens": 6, "temperature": 0.7, "seed": 666})
    alone = [post(url, "/v1/completions", b).json()["choices"][0]["text"] for b in (bodies[0], bodies[2], bodies[3])]
    answers: dict[int, httpx.Response] = {}
    threads = [threading.Thread(target=lambda i=i, b=b: answers.__setitem__(i, post(url, "/v1/completions", b)))
               for i, b in enumerate(bodies)]
    with server.scheduler.paused():
        wait_for_submitted(server, 4, threads)
    for t in threads:
        t.join()
    assert len(server.scheduler.batches[-1]) == 4
    assert [answers[i].status_code for i in range(4)] == [200, 500, 200, 200]
    assert "poisoned row" in answers[1].json()["error"]["message"]
    assert [answers[i].json()["choices"][0]["text"] for i in (0, 2, 3)] == alone


BAD_FIELDS = [
    ({"temperature": 1e-40}, "temperature"),
    ({"temperature": -1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"seed": 18446744073709551616}, "seed"),
    ({"seed": -1}, "seed"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 10**30}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": "x" * 10_000}, "stop"),
    ({"n": 0}, "n"),
    ({"n": 10**6}, "n"),
]


@pytest.mark.parametrize(("fields", "param"), BAD_FIELDS, ids=[repr(f)[:40] for f, _ in BAD_FIELDS])
def test_bad_sampling_fields_are_400_naming_the_field(served, fields, param):
    url = served[1]
    for route, body in (("/v1/completions", {"prompt": PROMPT}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}]})):
        # json.dumps writes NaN as a lenient client would (httpx's json= refuses to).
        response = httpx.post(url + route, content=json.dumps({"model": "alpha", **body, **fields}), timeout=60,
                              headers={"Content-Type": "application/json"})
        assert response.status_code == 400, (route, response.text)
        error = response.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error", error
        assert param in error["message"]


def test_message_count_and_lengths_are_bounded(served):
    url = served[1]
    cases = [({"messages": [{"role": "user", "content": "hi"}] * 300}, "messages"),
             ({"messages": [{"role": "user", "content": "x" * 200_000}]}, "messages.0.content"),
             ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x" * 200_000}]}]},
              "messages.0.content"),
             ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
              "messages.0.content"),
             ({"messages": [{"role": "x" * 100, "content": "hi"}]}, "messages.0.role"),
             ({"messages": []}, "messages")]
    for body, param in cases:
        response = post(url, "/v1/chat/completions", {"model": "alpha", **body})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param, response.text
    for prompt in (["a", "b"], "x" * 200_000):
        response = post(url, "/v1/completions", {"model": "alpha", "prompt": prompt})
        assert response.status_code == 400 and response.json()["error"]["param"] == "prompt", response.text


def test_a_tiny_temperature_is_refused_and_its_batch_mates_answer(served):
    """The issue's case end to end: three completions queued together with a 1e-40 temperature
    request answered 500. That request is refused before it is queued; the three answer."""
    server, url = served
    body = {"model": "alpha", "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    answers: dict[int, int] = {}
    threads = [threading.Thread(target=lambda i=i: answers.__setitem__(
        i, post(url, "/v1/completions", body).status_code)) for i in range(3)]
    with server.scheduler.paused():
        wait_for_submitted(server, 3, threads)
        tiny = post(url, "/v1/completions", {**body, "model": "beta", "temperature": 1e-40})
    for t in threads:
        t.join()
    assert tiny.status_code == 400 and tiny.json()["error"]["param"] == "temperature"
    assert answers == {0: 200, 1: 200, 2: 200}
