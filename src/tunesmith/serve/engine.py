"""Generation for the server: continuous batching of requests for different adapters, one token per step.

A request is a ``Job``, with its own adapter, prompt and sampling settings. Jobs decode in a ``Lane``
(one per model, and one per adapter that cannot share a batch), which they join at any step and leave
the step they finish: their prompts are prefilled first, left-padded, a chunk of at most
``prefill_tokens`` tokens a step so that a long prompt does not stall the rows decoding beside it;
their rows then join the decoding batch, their KV cache (``DynamicCache``) joined to the running one
along the batch, the shorter left-padded with positions the attention mask hides. Each step runs one
forward pass for every decoding row; PEFT's mixed-adapter batches (``adapter_names``, one name per
row, ``"__base__"`` for the base model) route each row through its own LoRA weights. Each row samples
with its own temperature, top_p and random generator, stops on its own end-of-sequence token, stop
string or token limit, and streams its text as it grows.

A job with a ``grammar`` (``response_format``: ``serve/structured.py``) gives each of its rows its own
``Constraint``: the row's logits lose the tokens the grammar does not allow before it samples, and
the row ends once the grammar is complete. Rows without one are untouched.

A job asking for ``n`` choices is prefilled once: its prompt runs as one row, and the KV cache and
the last logits are then copied into ``n`` rows, each sampling with its own generator. A row whose
sampling fails (bad numbers, a bug) fails its own job alone: it leaves the batch with an error
event, and the other rows go on. A job cancelled (its client gone) leaves the batch at the next step.

Mixed routing has a price. PEFT's ``adapter_names=`` argument walks every module twice on each
forward pass to hook the names into each LoRA layer (about 40 ms a step for SmolLM2-135M on CPU),
and each LoRA layer then splits its batch by adapter. So ``_Routing`` puts those hooks in once, and a
forward pass whose rows all use one adapter (a lone request, or the rows that outlive the others)
runs the plain way: that adapter made active with ``set_adapter``, or all adapters off for the base.

``Scheduler`` feeds the engine: when it is idle, it waits a few milliseconds for requests that arrive
together; while it decodes, it lets the requests that arrived into the running batch at every step.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch

from tunesmith.serve.structured import Constraint

log = logging.getLogger(__name__)

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None  # None: none; k: each token's log-probability and the k most likely
    n: int = 1  # choices for the one prompt
    grammar: str | None = None  # llguidance's, of response_format (structured.grammar_for); None: free text


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (its softmax, before temperature and top_p),
    the ``top`` most likely tokens of its step as (token, log-probability), and where its text starts
    in the answer (characters)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]
    offset: int


@dataclass
class Event:
    """What a job hears from the engine, for each of its choices (``index``): ``text`` (a new piece of
    the answer), then one ``done`` (with the finish reason and the number of generated tokens) or one
    ``error``. With ``Sampling.logprobs``, ``logprobs`` holds the tokens behind ``text`` (a ``done``
    carries any not sent yet)."""

    kind: str
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    index: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Job:
    adapter: str  # an adapter name, or BASE
    prompt_ids: list[int]
    sampling: Sampling
    emit: Callable[[Event], None]  # called on the engine's thread
    cancelled: threading.Event = field(default_factory=threading.Event)


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """One token from one row of logits: greedy at temperature 0, else nucleus sampling."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest set of most likely tokens whose mass reaches top_p (always the first).
        keep = sorted_probs.cumsum(-1) - sorted_probs < sampling.top_p
        keep[0] = True  # a top_p below float32's least number (5e-324) would otherwise keep none
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprob(logits: torch.Tensor, token: int, top: int, offset: int) -> TokenLogprob:
    """``token``'s log-probability in one row of raw ``logits``, with the ``top`` most likely tokens."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    values, ids = logp.topk(min(top, logp.numel())) if top else (logp[:0], logp[:0].long())
    return TokenLogprob(token, float(logp[token]), list(zip(ids.tolist(), values.tolist())), offset)


def choice_seeds(seed: int | None, n: int) -> list[int | None]:
    """The seed of each of ``n`` choices: ``seed`` itself for the first (so ``n=1`` samples as before),
    then seeds drawn from it, so each choice has its own stream and the same request repeats."""
    if seed is None:
        return [None] * n
    draw = torch.Generator().manual_seed(seed)
    return [seed] + [int(torch.randint(2**62, (1,), generator=draw)) for _ in range(n - 1)]


def held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of ``text`` could still begin a stop string, so must not be sent yet."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class _Row:
    """The decoding state of one choice of one job in a batch."""

    def __init__(self, job: Job, index: int, seed: int | None, tokenizer):
        self.job = job
        self.index = index
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = 0  # characters of the answer already emitted
        self.length = 0  # characters of the answer so far
        self.logprobs: list[TokenLogprob] = []  # of tokens whose text is not emitted yet
        self.done = False
        self.constraint: Constraint | None = None  # made at the first step, where a failure is this row's alone
        self.generator = None
        if job.sampling.temperature > 0:
            self.generator = torch.Generator()
            if seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(seed)

    def step(self, logits: torch.Tensor, eos: set[int]) -> int:
        """Sample this row's next token from its ``logits`` (within its grammar, if any) and take it."""
        sampling = self.job.sampling
        allowed = logits
        if sampling.grammar is not None:
            if self.constraint is None:
                self.constraint = Constraint(sampling.grammar, self.tokenizer, eos)
            allowed = self.constraint.mask(logits)
        token = next_token(allowed, sampling, self.generator)
        if sampling.logprobs is not None and token not in eos:
            # The model's own probabilities, as without a grammar: the mask is a rule, not the model.
            self.logprobs.append(token_logprob(logits, token, sampling.logprobs, self.length))
        if self.constraint is not None and token not in eos:
            self.constraint.take(token)
        # A complete grammar allows nothing but the end: the row ends here, not a forward pass later.
        self.push(token, eos, last=self.constraint is not None and self.constraint.complete)
        return token

    def push(self, token: int, eos: set[int], last: bool = False) -> None:
        """Take one generated token: emit the text it completes, and finish where a limit says (``last``:
        the answer is whole, as its grammar says)."""
        sampling = self.job.sampling
        if token in eos:
            self.finish(self._text(), "stop")
            return
        self.ids.append(token)
        text = self._text()
        self.length = len(text)
        cuts = [i for i in (text.find(s) for s in sampling.stop) if i >= 0]
        if cuts:
            cut = min(cuts)
            # The tokens that only spell the stop string are not part of the answer.
            self.logprobs = [t for t in self.logprobs if t.offset < cut]
            self.finish(text[:cut], "stop")
        elif last:
            self.finish(text, "stop")
        elif len(self.ids) >= sampling.max_tokens:
            self.finish(text, "length")
        elif not text.endswith("\ufffd"):  # a character split across tokens waits for its end
            end = len(text) - held_back(text, sampling.stop)
            if end > self.sent:
                self._emit(Event("text", text[self.sent:end]))
                self.sent = end

    def finish(self, text: str, reason: str) -> None:
        if len(text) > self.sent:
            self._emit(Event("text", text[self.sent:]))
        self._emit(Event("done", finish_reason=reason, completion_tokens=len(self.ids)))
        self.done = True

    def cancel(self) -> None:
        self.finish(self._text(), "cancelled")

    def fail(self, message: str) -> None:
        self.job.emit(Event("error", text=message, index=self.index))
        self.done = True

    def _emit(self, event: Event) -> None:
        event.index, event.logprobs, self.logprobs = self.index, self.logprobs, []
        self.job.emit(event)

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)


def eos_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(configured) if isinstance(configured, list) else {configured}
    return {i for i in ids if i is not None}


@contextlib.contextmanager
def only_adapter(model, name: str):
    """Run a PEFT model as adapter ``name`` alone (``BASE``: with its adapters off) inside the block."""
    if name == BASE:
        with model.disable_adapter():
            yield
    else:
        model.set_adapter(name)
        yield


class _Routing:
    """Which adapter each row of a forward pass of a PEFT model goes through (``use``, before each pass).

    Rows of several adapters are routed by PEFT's ``adapter_names``, handed to each LoRA layer by hooks
    put in once (PEFT's own argument walks every module twice a pass); rows of one adapter run the
    plain way, that adapter active (or every adapter off for the base), which costs nothing per row.
    """

    def __init__(self, model, mixed: bool):
        self.model, self.mixed = model, mixed
        self.names: list[str] | None = None  # what the hooks hand on; None: the plain way
        self.plain: str | None = None  # the adapter the model runs alone now, if any
        self.state = contextlib.ExitStack()
        self.handles: list = []

    def use(self, adapters: list[str]) -> None:
        if not self.mixed:
            return
        if len(set(adapters)) == 1:
            self.names = None
            if self.plain != adapters[0]:
                self.state.close()
                self.state.enter_context(only_adapter(self.model, adapters[0]))
                self.plain = adapters[0]
            return
        if self.plain == BASE:  # disabled adapters would override the routing
            self.state.close()
            self.plain = None
        if not self.handles:
            self._hook()
        self.names = list(adapters)

    def _hook(self) -> None:
        from peft.tuners.lora import LoraLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        def hook(module, args, kwargs):
            return None if self.names is None else (args, {**kwargs, "adapter_names": self.names})

        self.handles = [module.register_forward_pre_hook(hook, with_kwargs=True) for module in self.model.modules()
                        if isinstance(module, (LoraLayer, AuxiliaryTrainingWrapper))]

    def close(self) -> None:
        self.state.close()
        for handle in self.handles:
            handle.remove()
        self.handles, self.names, self.plain = [], None, None


def _left_padded(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, attention mask and position ids of ``prompts`` left-padded to the longest: positions
    count real tokens only, so a padded row sees what it would alone."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _joinable(cache) -> bool:
    """Whether rows of ``cache`` can be joined with others' (plain layers that keep every position)."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in cache.layers)


def _join(cache, other) -> None:
    """Append ``other``'s rows to ``cache``'s, the shorter left-padded (the attention mask hides it)."""
    for mine, theirs in zip(cache.layers, other.layers):
        width = max(mine.keys.shape[-2], theirs.keys.shape[-2])
        mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
        mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)])


def _pad_left(states: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(states, (0, 0, width - states.shape[-2], 0))


def _pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(mask, (width - mask.shape[1], 0))


def _crop_left(cache, columns: int) -> None:
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[:, :, columns:], layer.values[:, :, columns:]


class _Prefill:
    """New jobs' prompts, run as one left-padded batch, a chunk of columns at a time."""

    def __init__(self, jobs: list[Job], adapters: list[str], pad: int):
        self.jobs, self.adapters = jobs, adapters
        self.ids, self.mask, self.positions = _left_padded([job.prompt_ids for job in jobs], pad)
        self.done = 0  # columns prefilled
        self.cache = None

    @property
    def rows(self) -> int:
        return sum(job.sampling.n for job in self.jobs)


class Lane:
    """The running batch on one model. Jobs join at any step: their prompts are prefilled, at most
    ``prefill_tokens`` a step so a long one does not stall the rows decoding, then their rows join the
    decoding batch (the KV caches joined along the batch, left-padded). A row leaves at the step it
    finishes, fails or is cancelled.

    ``routing``: how rows go through their adapters on ``model``, shared by every lane on that model.
    """

    def __init__(self, model, tokenizer, routing: _Routing, prefill_tokens: int = 512):
        self.model, self.tokenizer = model, tokenizer
        self.prefill_tokens = prefill_tokens
        self.routing = routing
        self.eos = eos_ids(model, tokenizer)
        self.pad = tokenizer.pad_token_id
        self.device = next(model.parameters()).device
        self.filling: list[_Prefill] = []
        self.rows: list[_Row] = []
        self.adapters: list[str] = []  # of each row
        self.tokens: list[int] = []  # each row's next input token
        self.cache = None
        self.mask = torch.zeros(0, 0, dtype=torch.long)  # over the cache's positions
        self.positions = torch.zeros(0, 1, dtype=torch.long)  # each row's next position

    @property
    def size(self) -> int:
        """Rows decoding and rows to come from the prompts being prefilled."""
        return len(self.rows) + sum(p.rows for p in self.filling)

    def add(self, jobs: list[Job]) -> None:
        """Queue ``jobs`` (each names its adapter) to be prefilled together and join."""
        for job in jobs:
            if job.cancelled.is_set():  # its client left while it queued
                for index in range(job.sampling.n):
                    job.emit(Event("done", finish_reason="cancelled", index=index))
        jobs = [job for job in jobs if not job.cancelled.is_set()]
        if jobs:
            self.filling.append(_Prefill(jobs, [job.adapter for job in jobs], self.pad))

    def step(self) -> None:
        """A chunk of the oldest prompt waiting, then one token for every decoding row."""
        # Caches that drop positions (sliding windows) cannot be padded and joined: such prompts wait
        # for the running rows to finish.
        if self.filling and (not self.rows or _joinable(self.cache)):
            self._prefill(self.filling[0])
        if self.rows:
            self._decode()

    def fail(self, message: str) -> None:
        """The model itself failed: every job in the lane gets ``message``, and the lane is empty."""
        for prefill in self.filling:
            for job in prefill.jobs:
                job.emit(Event("error", text=message))
        for row in self.rows:
            row.fail(message)
        self.filling, self.rows, self.adapters, self.tokens, self.cache = [], [], [], [], None

    def _forward(self, ids, mask, positions, cache, adapters):
        self.routing.use(adapters)
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=positions.to(self.device), past_key_values=cache, use_cache=True)
        return out.past_key_values, out.logits[:, -1].cpu()

    def _prefill(self, prefill: _Prefill) -> None:
        columns = max(1, self.prefill_tokens // len(prefill.jobs))
        start, end = prefill.done, min(prefill.done + columns, prefill.ids.shape[1])
        prefill.cache, logits = self._forward(prefill.ids[:, start:end], prefill.mask[:, :end],
                                              prefill.positions[:, start:end], prefill.cache, prefill.adapters)
        prefill.done = end
        if end < prefill.ids.shape[1]:
            return
        self.filling.pop(0)
        jobs = prefill.jobs
        rows = [_Row(job, index, seed, self.tokenizer) for job in jobs
                for index, seed in enumerate(choice_seeds(job.sampling.seed, job.sampling.n))]
        # Each prompt was prefilled once, as one row; a job's n choices are copies of it from here on.
        choices = torch.tensor([j for j, job in enumerate(jobs) for _ in range(job.sampling.n)])
        cache, mask = prefill.cache, prefill.mask
        if len(choices) > len(jobs):
            cache.batch_select_indices(choices.to(self.device))
            logits, mask = logits[choices], mask[choices]
        tokens = self._sample(rows, logits)
        live = [i for i, row in enumerate(rows) if not row.done]
        if not live:
            return
        if len(live) < len(rows):
            cache.batch_select_indices(torch.tensor(live, device=self.device))
            mask = mask[live]
        rows, tokens = [rows[i] for i in live], [tokens[i] for i in live]
        positions = mask.sum(-1, keepdim=True)
        if not self.rows:
            self.cache, self.mask, self.positions = cache, mask, positions
        else:
            _join(self.cache, cache)
            width = max(self.mask.shape[1], mask.shape[1])
            self.mask = torch.cat([_pad_mask(self.mask, width), _pad_mask(mask, width)])
            self.positions = torch.cat([self.positions, positions])
        self.rows += rows
        self.tokens += tokens
        self.adapters += [row.job.adapter for row in rows]

    def _decode(self) -> None:
        mask = torch.cat([self.mask, torch.ones(len(self.rows), 1, dtype=self.mask.dtype)], dim=1)
        self.cache, logits = self._forward(torch.tensor(self.tokens)[:, None], mask, self.positions,
                                           self.cache, self.adapters)
        self.mask, self.positions = mask, self.positions + 1
        self.tokens = self._sample(self.rows, logits)
        live = [i for i, row in enumerate(self.rows) if not row.done]
        if len(live) < len(self.rows):
            # Finished rows leave the batch (and the cache) at once, so they cost nothing more.
            index = torch.tensor(live, dtype=torch.long)
            self.cache.batch_select_indices(index.to(self.device))
            self.rows = [self.rows[i] for i in live]
            self.tokens = [self.tokens[i] for i in live]
            self.adapters = [self.adapters[i] for i in live]
            self.mask, self.positions = self.mask[index], self.positions[index]
            if not live:
                self.cache = None
                return
            # Positions no row attends to any more (the padding of a longer prompt gone) are dropped,
            # where every layer keeps every position (a sliding window's keys are not the mask's columns).
            unused = int(self.mask.any(0).int().argmax())
            if unused and _joinable(self.cache):
                _crop_left(self.cache, unused)
                self.mask = self.mask[:, unused:]

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        """Each row's next token from its logits; a row cancelled, finished or failed is marked done."""
        step = []
        for i, row in enumerate(rows):
            step.append(self.pad)
            if row.job.cancelled.is_set():
                row.cancel()
                continue
            try:
                step[-1] = row.step(logits[i], self.eos)
            except Exception as err:  # this request's own failure: the rest of the batch goes on
                log.exception("generation failed for one request")
                row.fail(f"generation failed: {err}")
                row.job.cancelled.set()  # and its other choices stop
        return step


Place = Callable[[Job], tuple[Hashable, torch.nn.Module, bool]]


@torch.no_grad()
def decode(place: Place, tokenizer, jobs: list[Job], more: Callable[[int], list[Job]] | None = None,
           max_rows: int | None = None, prefill_tokens: int = 512) -> None:
    """Decode ``jobs``, and any that ``more(room)`` hands in at each step, until every one has finished.

    ``place(job)`` says which lane a job decodes in: a key (jobs with the same key share a batch), the
    model, and whether it is a PEFT model whose rows each name their adapter. Lanes take turns, one
    step each. ``more`` is asked at every step for jobs of at most ``room`` rows in all (``max_rows``
    less the rows decoding or waiting for their prefill); events go to each job's ``emit``.
    """
    lanes: dict[Hashable, Lane] = {}
    routings: dict[int, _Routing] = {}  # one per model: lanes on one model take turns with its state

    def enter(new: list[Job]) -> None:
        grouped: dict[Hashable, list[Job]] = {}
        for job in new:
            key, model, mixed = place(job)
            if key not in lanes:
                routing = routings.setdefault(id(model), _Routing(model, mixed))
                lanes[key] = Lane(model, tokenizer, routing, prefill_tokens)
            grouped.setdefault(key, []).append(job)
        for key, group in grouped.items():
            lanes[key].add(group)

    enter(jobs)
    try:
        while True:
            if more is not None:
                room = (max_rows or 0) - sum(lane.size for lane in lanes.values())
                if room > 0:
                    enter(more(room))
            busy = [lane for lane in lanes.values() if lane.size]
            if not busy:
                return
            for lane in busy:
                try:
                    lane.step()
                except Exception as err:  # the model failed: this lane's jobs fail, the others go on
                    log.exception("generation failed")
                    lane.fail(f"generation failed: {err}")
    except Exception as err:  # anything else: no job may be left waiting for an answer
        log.exception("generation failed")
        for lane in lanes.values():
            lane.fail(f"generation failed: {err}")
    finally:
        for routing in routings.values():
            routing.close()


def decode_batch(model, tokenizer, jobs: list[Job], mixed: bool) -> None:
    """Decode ``jobs`` together on ``model`` until each has finished (``Lane`` says how)."""
    decode(lambda job: (None, model, mixed), tokenizer, jobs)


class Scheduler:
    """Continuous batching: requests join the running batch at any step, up to ``max_batch`` rows (a job
    of ``n`` choices is ``n`` rows), and leave it when they finish.

    When the engine is idle, the first request waits ``window_s`` for others to arrive with it, so that
    requests sent together are prefilled together. ``run_batch(jobs, more)`` does the decoding
    (``AdapterPool.run``, through ``decode``), called on this scheduler's own thread; it asks ``more(room)``
    at each step for the requests that arrived since, at most ``room`` rows of them, in order.
    """

    def __init__(self, run_batch: Callable[[list[Job], Callable[[int], list[Job]]], None], window_s: float = 0.005,
                 max_batch: int = 16):
        self.run_batch = run_batch
        self.window_s = window_s
        self.max_batch = max_batch
        self.queue: queue.Queue[Job] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tunesmith-scheduler", daemon=True)
        self._open = threading.Event()
        self._open.set()
        self._next: Job | None = None  # a job that did not fit: it goes first when there is room
        self.submitted = 0
        self.batches: list[list[str]] = []  # the adapters of each batch started from idle, newest last (bounded)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        self.submitted += 1
        self.queue.put(job)

    @contextlib.contextmanager
    def paused(self):
        """No batch starts and no request joins inside this block; requests queue up, then go as one
        batch (tests use it)."""
        self._open.clear()
        try:
            yield
        finally:
            self._open.set()

    def more(self, room: int) -> list[Job]:
        """The requests waiting, in order, while they fit in ``room`` rows."""
        taken: list[Job] = []
        while self._open.is_set():
            job, self._next = self._next, None
            if job is None:
                try:
                    job = self.queue.get_nowait()
                except queue.Empty:
                    break
            if job.sampling.n > room:
                self._next = job
                break
            taken.append(job)
            room -= job.sampling.n
        return taken

    def _loop(self) -> None:
        while not self._stop.is_set():
            first, self._next = self._next, None
            if first is None:
                try:
                    first = self.queue.get(timeout=0.1)
                except queue.Empty:
                    continue
            self._open.wait()
            batch, rows = [first], first.sampling.n
            # The window runs from the first request: later arrivals do not extend it.
            deadline = time.monotonic() + self.window_s
            while rows < self.max_batch:
                try:
                    job = self.queue.get(timeout=max(deadline - time.monotonic(), 0))
                except queue.Empty:
                    break
                if rows + job.sampling.n > self.max_batch:
                    self._next = job
                    break
                batch.append(job)
                rows += job.sampling.n
            self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        self.batches = self.batches[-99:] + [[job.adapter for job in batch]]
        try:
            self.run_batch(batch, self.more)
        except Exception as err:  # one bad batch must not stop the server
            log.exception("generation failed")
            for job in batch:
                job.emit(Event("error", text=f"generation failed: {err}"))
