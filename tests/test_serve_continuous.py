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
from conftest import record_passes
from test_serve import PROMPT, make_run, peft_model

from tunesmith.serve.decoder import LlamaDecoder
from tunesmith.serve.engine import BASE, Caches, Event, Job, Sampling, Scheduler, decode

SYSTEM = "you are a film critic and you answer in one short sentence about the film you were asked about: "
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
    handle = record_passes(model, lambda ids: widths.append(ids.shape[1]))

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


def prefill_widths(model) -> tuple[list[int], object]:
    """The width of each forward pass that runs more than one position (the prefill chunks), and the hook."""
    widths: list[int] = []
    handle = record_passes(model, lambda ids: widths.append(ids.shape[1]) if ids.shape[1] > 1 else None)
    return widths, handle


def test_a_prompt_head_taken_from_the_prefix_cache_gives_the_tokens_of_a_miss(model):
    """Two prompts sharing a system prompt on one adapter: the second starts from the first's blocks (a
    hit; its prefill runs only the positions past them), the same prompt on another adapter misses
    (the cache is keyed per adapter), and every answer is ``generate``'s, greedy, alone."""
    model, tokenizer = model
    caches = Caches(prefix_bytes=2**30, block=4)
    prompts = {"first": ("alpha", SYSTEM + "the plot"), "hit": ("alpha", SYSTEM + "the cast"),
               "other-adapter": ("beta", SYSTEM + "the cast"), "again": ("alpha", SYSTEM + "the cast")}
    recorder = Recorder()
    widths, handle = prefill_widths(model)
    try:
        for name, (adapter, prompt) in prompts.items():  # one at a time, so each finds what the last left
            decode(lambda job: (None, model, True), tokenizer,
                   [recorder.job(name, adapter, tokenizer(prompt).input_ids, 6)], caches=caches)
    finally:
        handle.remove()
    stats = caches.stats()
    assert (stats["prefix_hits"], stats["prefix_misses"]) == (2, 2)
    head = len(tokenizer(SYSTEM).input_ids)
    assert head > 8
    lengths = [len(tokenizer(prompt).input_ids) for _, prompt in prompts.values()]
    assert widths[0] == lengths[0] and widths[2] == lengths[2]  # the misses prefill every position
    assert widths[1] < lengths[1] - 8 and widths[3] <= 4  # the hits skip the head; "again", all but its last block
    for name, (adapter, prompt) in prompts.items():
        assert recorder.tokens[name, 0] == alone(model, tokenizer, adapter, prompt, 6), name
    # Then in one batch, prefilled together from heads of different lengths: two hits and a miss.
    together = {"alpha-hit": ("alpha", SYSTEM + "the ending"), "beta-hit": ("beta", SYSTEM + "the plot"),
                "base-miss": (BASE, SYSTEM + "the plot")}
    decode(lambda job: (None, model, True), tokenizer,
           [recorder.job(name, adapter, tokenizer(prompt).input_ids, 6) for name, (adapter, prompt) in together.items()],
           caches=caches, prefill_tokens=12)
    assert (caches.stats()["prefix_hits"], caches.stats()["prefix_misses"]) == (4, 3)
    for name, (adapter, prompt) in together.items():
        assert recorder.tokens[name, 0] == alone(model, tokenizer, adapter, prompt, 6), name


def test_an_adapter_loaded_again_under_its_name_never_meets_the_old_ones_blocks(runs, tiny_model_dir):
    """``beta`` unloaded, and ``alpha``'s weights loaded as ``beta``: the same prompt misses the prefix
    cache and decodes the new weights' tokens. The old configuration stays held while its blocks are
    kept, so no new one can take its id (the key was its id alone before)."""
    import gc
    import weakref

    model, tokenizer = peft_model(runs, tiny_model_dir, "alpha", "beta")
    caches, recorder, prompt = Caches(prefix_bytes=2**30, block=4), Recorder(), SYSTEM + "the plot"
    assert alone(model, tokenizer, "alpha", prompt, 6) != alone(model, tokenizer, "beta", prompt, 6)

    def run(name: str) -> None:
        decode(lambda job: (None, model, True), tokenizer, [recorder.job(name, "beta", tokenizer(prompt).input_ids, 6)],
               caches=caches)

    run("old")
    old = weakref.ref(model.peft_config["beta"])
    model.delete_adapter("beta")
    model.load_adapter(runs["alpha"] / "adapter", adapter_name="beta")
    LlamaDecoder.of(model)  # the decoder kept for the old adapters goes (it held them too)
    gc.collect()
    assert old() is not None and old() is not model.peft_config["beta"]
    run("new")
    assert caches.stats()["prefix_hits"] == 0 and caches.stats()["prefix_misses"] == 2
    assert recorder.tokens["new", 0] == alone(model, tokenizer, "alpha", prompt, 6)


def test_slots_freed_by_finished_requests_are_reused_by_later_ones(model):
    """Six requests of three adapters through two slots, arriving while others decode, then a second
    call on the same caches: the slot tensors are allocated once and never grow past two rows, and
    every answer is ``generate``'s."""
    model, tokenizer = model
    caches = Caches(prefix_bytes=0)
    specs = [("alpha", PROMPT, 5), ("beta", "a dull boring story", 2), (BASE, "the", 7), ("beta", PROMPT, 3),
             ("alpha", "a dull boring story", 4), (BASE, PROMPT, 2)]
    recorder = Recorder()
    jobs = [recorder.job(str(i), adapter, tokenizer(prompt).input_ids, n) for i, (adapter, prompt, n) in enumerate(specs)]
    waiting = list(jobs[1:])

    def more(room: int) -> list[Job]:
        return [waiting.pop(0) for _ in range(min(room, len(waiting)))]

    decode(lambda job: (None, model, True), tokenizer, jobs[:1], more, max_rows=2, caches=caches)
    slots, _ = caches.of(model, None)
    pointers = [t.data_ptr() for t in slots.keys]
    assert slots.slots == 2 and pointers
    again = recorder.job("again", "beta", tokenizer(PROMPT).input_ids, 3)
    decode(lambda job: (None, model, True), tokenizer, [again], caches=caches)
    assert [t.data_ptr() for t in slots.keys] == pointers  # the same tensors, not new ones
    assert len(recorder.finished) == len(specs) + 1
    for i, (adapter, prompt, n) in enumerate(specs):
        assert recorder.tokens[str(i), 0] == alone(model, tokenizer, adapter, prompt, n), i
    assert recorder.tokens["again", 0] == recorder.tokens["3", 0]


def test_a_prompt_longer_than_the_prefix_cache_budget_decodes_right_and_the_cache_stays_in_budget(model):
    """A budget of three blocks and a prompt of many: the oldest blocks are evicted as the newer ones come,
    the cache never holds more than its budget, and the prompt, sent twice, gives ``generate``'s tokens."""
    model, tokenizer = model
    probe, probe_ids = Caches(prefix_bytes=2**30, block=4), tokenizer("the film is long and dull").input_ids
    decode(lambda job: (None, model, True), tokenizer, [Recorder().job("probe", "alpha", probe_ids, 1)], caches=probe)
    block_bytes = probe.stats()["prefix_bytes"] // ((len(probe_ids) - 1) // 4)  # the whole blocks before its last token
    assert block_bytes > 0
    caches = Caches(prefix_bytes=3 * block_bytes, block=4)
    ids = tokenizer(LONG_PROMPT).input_ids
    assert len(ids) > 6 * 4
    recorder = Recorder()
    for name in ("first", "second"):
        decode(lambda job: (None, model, True), tokenizer, [recorder.job(name, "alpha", ids, 5)], caches=caches,
               prefill_tokens=8)
        assert caches.stats()["prefix_bytes"] <= 3 * block_bytes
    assert caches.stats()["prefix_evictions"] > 0
    expected = alone(model, tokenizer, "alpha", LONG_PROMPT, 5)
    assert recorder.tokens["first", 0] == expected and recorder.tokens["second", 0] == expected


def test_bfloat16_weights_decode_in_a_bfloat16_kv_cache(model, monkeypatch):
    """``--dtype bfloat16``: the slots take the model's dtype, and two adapters and the base in one batch
    decode what ``generate`` decodes for each alone on the same bfloat16 model, through transformers'
    forward (bit for bit; serve/decoder.py's own forward rounds in another order: its bfloat16 test is
    in tests/test_serve_decoder.py)."""
    import copy

    monkeypatch.setenv("TUNESMITH_DECODER", "transformers")
    model, tokenizer = model
    model = copy.deepcopy(model).to(torch.bfloat16)
    caches = Caches()
    specs = {"a": ("alpha", PROMPT), "b": ("beta", "a dull boring story"), "base": (BASE, SYSTEM + "the plot")}
    recorder = Recorder()
    decode(lambda job: (None, model, True), tokenizer,
           [recorder.job(name, adapter, tokenizer(prompt).input_ids, 6) for name, (adapter, prompt) in specs.items()],
           caches=caches)
    slots, _ = caches.of(model, None)
    assert {t.dtype for t in slots.keys + slots.values} == {torch.bfloat16}
    for name, (adapter, prompt) in specs.items():
        assert recorder.tokens[name, 0] == alone(model, tokenizer, adapter, prompt, 6), name


@pytest.mark.parametrize(("flag", "forced", "expected"), [
    ("run", "1", None), ("float32", "1", torch.float32), ("bfloat16", "0", torch.bfloat16),
    ("auto", "1", torch.bfloat16), ("auto", "0", torch.float32)])
def test_the_dtype_option_resolves_auto_as_training_does(monkeypatch, flag, forced, expected):
    """``auto`` is bfloat16 where the CPU runs it natively; ``TUNESMITH_AUTO_BF16`` overrides, as in training."""
    from tunesmith.serve.options import ServeOptions

    monkeypatch.setenv("TUNESMITH_AUTO_BF16", forced)
    assert ServeOptions(dtype=flag, device="cpu").weights_dtype() == expected


def test_an_unknown_dtype_is_refused():
    from pydantic import ValidationError

    from tunesmith.serve.options import ServeOptions

    with pytest.raises(ValidationError, match="dtype"):
        ServeOptions(dtype="float16")


def test_stacked_lora_deltas_match_peft_mixed_batches(model):
    """``lora_rows.route``: each row of a batch mixing two adapters and the base gets, from one stacked
    product, what PEFT's ``adapter_names`` gives it; undone, the layer runs PEFT's own forward again."""
    from tunesmith.serve.lora_rows import route, stackable

    model, _ = model
    layers = [m for m in model.modules() if stackable(m)]
    assert layers
    layer = layers[0]
    names = ["alpha", "beta", BASE, "alpha"]
    x = torch.randn(len(names), 3, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = layer(x, adapter_names=names)
        undo = route(layer, lambda: names)
        try:
            got = layer(x)
        finally:
            undo()
        assert "forward" not in vars(layer)
        plain = layer(x)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(expected[0], expected[1])  # the two adapters differ, and the test can tell
    assert not torch.allclose(plain[1], expected[1])  # the active adapter alone is not what beta's row got


def test_one_adapters_own_matrices_match_peft_plain_forward(model):
    """``lora_rows.route`` with one name for every row: the layer gives what PEFT's plain forward gives
    with that adapter active (and the base layer's output for the base), in float32 and with the
    base layer in bfloat16 beside a float32 adapter, as ``serve --dtype bfloat16`` loads them."""
    from tunesmith.serve.lora_rows import route, stackable

    model, _ = model
    layer = next(m for m in model.modules() if stackable(m))
    x = torch.randn(2, 3, layer.in_features, generator=torch.Generator().manual_seed(0))
    active = model.active_adapter

    def routed(name: str, inputs: torch.Tensor) -> torch.Tensor:
        undo = route(layer, lambda: name)
        try:
            return layer(inputs)
        finally:
            undo()

    try:
        with torch.no_grad():
            outputs = {}
            for name in ("alpha", "beta"):
                model.set_adapter(name)
                outputs[name] = layer(x)
                torch.testing.assert_close(routed(name, x), outputs[name])
            torch.testing.assert_close(routed(BASE, x), layer.base_layer(x))
            assert not torch.allclose(outputs["alpha"], outputs["beta"])  # the adapters differ, and the test can tell
            assert not torch.allclose(outputs["alpha"], layer.base_layer(x))
            layer.base_layer.to(torch.bfloat16)
            try:
                half = x.to(torch.bfloat16)
                torch.testing.assert_close(routed("beta", half), layer(half))
                assert routed("beta", half).dtype == torch.bfloat16
            finally:
                layer.base_layer.to(torch.float32)
    finally:
        model.set_adapter(active)


def test_a_new_lane_starts_from_blocks_another_lane_left(model):
    """Lanes on one model share its prefix cache: a lane whose slots were never used yet takes a head
    another lane stored (its slots made for it) and decodes ``generate``'s tokens."""
    model, tokenizer = model
    caches = Caches(block=4)
    recorder = Recorder()
    ids = tokenizer(SYSTEM + "the plot").input_ids
    for lane in ("first", "second"):
        decode(lambda job, lane=lane: (lane, model, True), tokenizer, [recorder.job(lane, "alpha", ids, 6)],
               caches=caches)
    assert caches.stats()["prefix_hits"] == 1
    expected = alone(model, tokenizer, "alpha", SYSTEM + "the plot", 6)
    assert recorder.tokens["first", 0] == expected and recorder.tokens["second", 0] == expected


def test_a_bfloat16_server_reuses_a_chat_head_and_counts_the_hit(runs, tmp_path):
    """``serve --dtype bfloat16``: the pool's model is bfloat16; two chat requests with one system
    prompt on one adapter, the second a prefix-cache hit in ``Scheduler.stats()``."""
    import httpx

    from tunesmith.serve.options import ServeOptions
    from tunesmith.serve.server import build_server

    server = build_server({"alpha": runs["alpha"]}, options=ServeOptions(dtype="bfloat16", max_tokens=8),
                          store=tmp_path / "store.sqlite")
    assert server.pool.model.get_input_embeddings().weight.dtype == torch.bfloat16
    with server.in_thread() as url:
        for question in ("the plot?", "the cast?"):
            reply = httpx.post(url + "/v1/chat/completions", timeout=60, json={
                "model": "alpha", "max_tokens": 4, "temperature": 0,
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]})
            assert reply.status_code == 200, reply.text
        served = httpx.get(url + "/v1/stats", timeout=30).json()  # an open server's caller is an admin
    stats = server.scheduler.stats()
    assert stats["prefix_hits"] == 1 and stats["prefix_misses"] == 1 and stats["prefix_tokens_reused"] >= 16
    assert stats["slot_bytes"] > 0
    assert served == {"object": "tunesmith.stats", "in_flight": 0, "queued": 0, "max_batch": server.scheduler.max_batch,
                      **stats}


def test_work_apart_runs_in_a_thread_that_has_ended_when_it_returns():
    """``openmp.apart``: the work runs on another thread, which is gone once its result (or its
    exception, the work's own) is back, so an OpenMP pool it made is gone with it."""
    import threading

    from tunesmith.serve.openmp import apart

    seen: list[threading.Thread] = []

    def work(a, b=0):
        seen.append(threading.current_thread())
        return torch.ones(a).sum().item() + b

    assert apart(work, 3, b=1) == 4.0
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()

    def fail():
        raise ValueError("the work's own error")

    with pytest.raises(ValueError, match="the work's own error"):
        apart(fail)


def test_work_awaited_from_a_route_runs_apart_and_keeps_the_loop_going():
    """``openmp.awaited``: ``apart`` from async code; the event loop runs other tasks meanwhile, and the
    work's thread (neither the loop's nor a pool thread) is gone when the result is back."""
    import asyncio
    import threading

    from tunesmith.serve.openmp import awaited

    seen: list[threading.Thread] = []
    release = threading.Event()

    def work(a):
        seen.append(threading.current_thread())
        assert release.wait(5)
        return a * 2

    async def main():
        task = asyncio.create_task(awaited(work, 21))
        await asyncio.sleep(0.05)  # the loop is free while the work waits
        assert not task.done()
        release.set()
        return await task

    assert asyncio.run(main()) == 42
    assert seen[0].name == "tunesmith-apart" and not seen[0].is_alive()
