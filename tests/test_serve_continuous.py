"""Continuous batching: requests join the running batch at any step and leave it when they finish.

Greedy answers must be exactly what ``generate`` gives each request alone on its own adapter, however
the requests overlap: joining a batch mid-way (each row in a slot of the lane's KV cache), a long
prompt prefilled a chunk at a time beside rows that decode, rows leaving and their slots taken by
later requests, prompt heads taken from the prefix cache.
"""

from __future__ import annotations

import threading

import pytest
import torch
from test_serve import PROMPT, make_run, peft_model

from tunesmith.serve.engine import BASE, Event, Job, Sampling, Scheduler, decode

LONG_PROMPT = "the film was long and the plot was thin but the cast was good and the ending was " * 2


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("continuous-runs")
    return {"alpha": make_run(root, tiny_model_dir, "alpha", seed=1),
            "beta": make_run(root, tiny_model_dir, "beta", seed=2)}


@pytest.fixture(scope="module")
def model(runs, tiny_model_dir):
    model, tokenizer = peft_model(runs, tiny_model_dir, "alpha", "beta")
    assert next(model.parameters()).dtype == torch.float32
    return model, tokenizer


def alone(model, tokenizer, adapter: str, prompt: str, n: int) -> list[int]:
    """Greedy tokens of ``generate`` for one prompt on one adapter, without the end-of-sequence token."""
    ids = tokenizer(prompt).input_ids
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, adapter_names=[adapter])
    return [t for t in out[0, len(ids):].tolist() if t != tokenizer.eos_token_id]


class Recorder:
    """Each job's generated tokens (from its logprobs) per choice, and the order in which jobs finish."""

    def __init__(self):
        self.tokens: dict[tuple[str, int], list[int]] = {}
        self.finished: list[str] = []

    def job(self, name: str, adapter: str, prompt_ids: list[int], max_tokens: int, n: int = 1) -> Job:
        def emit(event: Event) -> None:
            assert event.kind != "error", event.text
            self.tokens.setdefault((name, event.index), []).extend(t.token for t in event.logprobs)
            if event.kind == "done":
                self.finished.append(name)

        return Job(adapter, prompt_ids, Sampling(max_tokens, temperature=0, logprobs=0, n=n), emit=emit)


def test_requests_joining_at_different_steps_decode_what_each_decodes_alone(model):
    """Requests for two adapters and the base arrive at steps 0, 2, 3, 5 and 9, one with a prompt
    prefilled 8 tokens a step over several steps while others decode; a short one joins while a long
    one decodes and leaves before it. Every choice's tokens are ``generate``'s, greedy, alone."""
    model, tokenizer = model
    specs = {  # name: (arrival step, adapter, prompt, max tokens, n)
        "long": (0, "alpha", PROMPT, 24, 1),
        "short": (2, "beta", "a dull boring story", 3, 1),
        "base-long-prompt": (3, BASE, LONG_PROMPT, 6, 1),
        "two-choices": (5, "alpha", "the", 5, 2),
        "late": (9, "beta", PROMPT, 4, 1),
    }
    recorder = Recorder()
    jobs = {name: recorder.job(name, adapter, tokenizer(prompt).input_ids, max_tokens, n)
            for name, (_, adapter, prompt, max_tokens, n) in specs.items()}
    steps = iter(range(1, 100))
    widths: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                                             with_kwargs=True)

    def more(room: int) -> list[Job]:
        step = next(steps)
        return [jobs[name] for name, spec in specs.items() if spec[0] == step]

    try:
        decode(lambda job: (None, model, True), tokenizer, [jobs["long"]], more, max_rows=8, prefill_tokens=8)
    finally:
        handle.remove()
    assert len(tokenizer(LONG_PROMPT).input_ids) > 16  # prefilled in three chunks or more
    assert widths.count(8) >= 2
    for name, (_, adapter, prompt, max_tokens, n) in specs.items():
        expected = alone(model, tokenizer, adapter, prompt, max_tokens)
        assert expected, name
        for index in range(n):
            assert recorder.tokens[name, index] == expected, (name, index)
    assert len({tuple(recorder.tokens[name, 0]) for name in ("long", "late")}) == 2  # two adapters, two answers
    assert recorder.finished.index("short") < recorder.finished.index("long")


def test_a_short_request_sent_while_a_long_one_decodes_finishes_first(model):
    """Through the scheduler: the short request is submitted once the long one has streamed two pieces;
    it joins the running batch (no second batch starts) and is done before the long one."""
    model, tokenizer = model
    recorder = Recorder()
    scheduler = Scheduler(lambda jobs, more: decode(lambda job: (None, model, True), tokenizer, jobs, more,
                                                    max_rows=4),
                          window_s=0, max_batch=4)
    short = recorder.job("short", "beta", tokenizer("a dull boring story").input_ids, 2)
    long = recorder.job("long", "alpha", tokenizer(PROMPT).input_ids, 30)
    pieces = 0
    both_done = threading.Event()

    def emit(event: Event, record=long.emit) -> None:
        nonlocal pieces
        record(event)
        pieces += 1
        if pieces == 2:
            scheduler.submit(short)
        if event.kind == "done":
            both_done.set()

    long.emit = emit
    scheduler.start()
    try:
        scheduler.submit(long)
        assert both_done.wait(120)
    finally:
        scheduler.stop()
    assert recorder.finished == ["short", "long"]
    assert len(recorder.tokens["long", 0]) == len(alone(model, tokenizer, "alpha", PROMPT, 30))
    assert scheduler.batches == [["alpha"]]  # the short one joined the batch in flight


def test_a_sliding_window_model_keeps_its_window_when_a_longer_row_leaves(tiny_model_dir):
    """Mistral's layers see only the last positions of a sliding window: the slots keep every position,
    and the mask hides those out of the window. A row beside a longer prompt, which leaves first,
    decodes ``generate``'s greedy tokens alone."""
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=4, initializer_range=0.3,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    recorder = Recorder()
    short_prompt = tokenizer("honestly the film is a dull one").input_ids
    jobs = [recorder.job("long-prompt", BASE, tokenizer(LONG_PROMPT).input_ids, 2),
            recorder.job("left", BASE, short_prompt, 8)]
    decode(lambda job: (None, model, False), tokenizer, jobs)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([short_prompt]), max_new_tokens=8, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    expected = [t for t in out[0, len(short_prompt):].tolist() if t != tokenizer.eos_token_id]
    assert len(short_prompt) > config.sliding_window and len(expected) > 2
    assert recorder.tokens["left", 0] == expected


def test_a_failure_outside_the_model_fails_the_running_jobs_instead_of_leaving_them_waiting(model):
    """``place`` raising for a request that joins mid-way: the job already decoding gets an error event
    (its client is answered), and ``decode`` returns."""
    model, tokenizer = model
    events: list[Event] = []
    running = Job("alpha", tokenizer(PROMPT).input_ids, Sampling(20, temperature=0), emit=events.append)
    joining = Job("gone", tokenizer(PROMPT).input_ids, Sampling(4, temperature=0), emit=events.append)

    def place(job: Job):
        if job.adapter == "gone":
            raise KeyError(job.adapter)
        return None, model, True

    arrivals = iter([[], [joining]])
    decode(place, tokenizer, [running], lambda room: next(arrivals, []), max_rows=4)
    assert events[-1].kind == "error" and "gone" in events[-1].text
    assert [e.kind for e in events].count("done") == 0
