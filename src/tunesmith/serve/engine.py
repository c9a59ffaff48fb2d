"""Generation for the server: requests for different adapters decoded together, one token per step.

A batch is a list of ``Job``s, each with its own adapter, prompt and sampling settings. The rows
are left-padded and run through one forward pass per step; PEFT's mixed-adapter batches
(``adapter_names=``, one name per row, ``"__base__"`` for the base model) route each row through
its own LoRA weights. Each row samples with its own temperature, top_p and random generator, stops
on its own end-of-sequence token, stop string or token limit, and streams its text as it grows.

A job with a ``grammar`` (``response_format``: ``serve/structured.py``) gives each of its rows its own
``Constraint``: the row's logits lose the tokens the grammar does not allow before it samples, and
the row ends once the grammar is complete. Rows without one are untouched.

A job asking for ``n`` choices is prefilled once: its prompt runs as one row, and the KV cache and
the last logits are then copied into ``n`` rows, each sampling with its own generator. A row whose
sampling fails (bad numbers, a bug) fails its own job alone: it leaves the batch with an error
event, and the other rows go on. A job cancelled (its client gone) leaves the batch at the next step.

Mixed routing has a price. PEFT's ``adapter_names=`` argument walks every module twice on each
forward pass to hook the names into each LoRA layer (about 40 ms a step for SmolLM2-135M on CPU),
and each LoRA layer then splits its batch by adapter. So ``routed`` puts those hooks in once a
batch instead of once a step, and once every row left in a batch uses one adapter (a lone request,
or the rows that outlive the others), the batch runs the plain way: that adapter made active with
``set_adapter``, or all adapters off for the base. Before, a lone request decoded about 1.6x slower
than ``generate`` with one active adapter.

``Scheduler`` is the micro-batching loop: it waits a few milliseconds for requests to arrive
together, then decodes them as one batch on its own thread.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
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
def routed(model, adapters: list[str]):
    """Each LoRA layer of PEFT ``model`` gets ``adapters`` (one name per row) as its ``adapter_names``
    inside the block. The list is read at every call, so the caller edits it in place as rows leave."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    def hook(module, args, kwargs):
        return args, {**kwargs, "adapter_names": adapters}

    handles = [module.register_forward_pre_hook(hook, with_kwargs=True) for module in model.modules()
               if isinstance(module, (LoraLayer, AuxiliaryTrainingWrapper))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def only_adapter(model, name: str):
    """Run a PEFT model as adapter ``name`` alone (``BASE``: with its adapters off) inside the block."""
    if name == BASE:
        with model.disable_adapter():
            yield
    else:
        model.set_adapter(name)
        yield


@torch.no_grad()
def decode_batch(model, tokenizer, jobs: list[Job], mixed: bool) -> None:
    """Decode ``jobs`` together until each has finished; events go to each job's ``emit``.

    ``mixed``: the model is a PEFT model, and each job names its adapter (or ``BASE``).
    """
    for job in jobs:
        if job.cancelled.is_set():  # its client left while it queued
            for index in range(job.sampling.n):
                job.emit(Event("done", finish_reason="cancelled", index=index))
    jobs = [job for job in jobs if not job.cancelled.is_set()]
    if not jobs:
        return
    rows = [_Row(job, index, seed, tokenizer) for job in jobs
            for index, seed in enumerate(choice_seeds(job.sampling.seed, job.sampling.n))]
    # Each prompt is prefilled once, as one row; a job's n choices are copies of it from then on.
    choices = torch.tensor([j for j, job in enumerate(jobs) for _ in range(job.sampling.n)])
    eos = eos_ids(model, tokenizer)
    width = max(len(job.prompt_ids) for job in jobs)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(j.prompt_ids)) + j.prompt_ids for j in jobs])
    mask = torch.tensor([[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in jobs])
    # Left padding: positions count real tokens only, so a padded row sees what it would alone.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    adapters = [job.adapter for job in jobs]
    device = next(model.parameters()).device
    cache = None
    with contextlib.ExitStack() as routing:
        if mixed and len(set(adapters)) > 1:
            routing.enter_context(routed(model, adapters))
        while rows:
            if mixed and len(set(adapters)) == 1:
                # Rows only ever leave a batch, so from here on it stays one adapter's.
                routing.close()
                routing.enter_context(only_adapter(model, adapters[0]))
                mixed = False
            out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                        position_ids=positions.to(device), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits = out.logits[:, -1].cpu()
            if choices is not None:  # the prefill is done: each job's row becomes its n choices
                if len(choices) > len(jobs):
                    cache.batch_select_indices(choices.to(device))
                    logits, mask, positions = logits[choices], mask[choices], positions[choices]
                    adapters[:] = [adapters[j] for j in choices.tolist()]
                choices = None
            step = []
            for i, row in enumerate(rows):
                step.append(pad)
                if row.job.cancelled.is_set():
                    row.cancel()
                    continue
                try:
                    step[-1] = row.step(logits[i], eos)
                except Exception as err:  # this request's own failure: the rest of the batch goes on
                    log.exception("generation failed for one request")
                    row.fail(f"generation failed: {err}")
                    row.job.cancelled.set()  # and its other choices stop
            live = [i for i, row in enumerate(rows) if not row.done]
            if len(live) < len(rows):
                # Finished rows leave the batch (and the cache), so they cost nothing more.
                if not live:
                    return
                index = torch.tensor(live)
                cache.batch_select_indices(index.to(device))
                rows, step = [rows[i] for i in live], [step[i] for i in live]
                adapters[:] = [adapters[i] for i in live]  # in place: ``routed`` reads this list
                mask, positions = mask[index], positions[index]
            input_ids = torch.tensor(step)[:, None]
            mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype)], dim=1)
            positions = positions[:, -1:] + 1


class Scheduler:
    """Micro-batching: requests that arrive within ``window_s`` of the first are decoded together,
    up to ``max_batch`` rows (a job of ``n`` choices is ``n`` rows).

    ``run_batch(jobs)`` does the decoding (``AdapterPool.run``); it is called on this scheduler's
    own thread, one batch at a time.
    """

    def __init__(self, run_batch: Callable[[list[Job]], None], window_s: float = 0.005, max_batch: int = 16):
        self.run_batch = run_batch
        self.window_s = window_s
        self.max_batch = max_batch
        self.queue: queue.Queue[Job] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tunesmith-scheduler", daemon=True)
        self._open = threading.Event()
        self._open.set()
        self._next: Job | None = None  # a job that did not fit the last batch: it opens the next
        self.submitted = 0
        self.batches: list[list[str]] = []  # the adapters of each batch run, newest last (bounded)

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
        """No batch starts inside this block; requests queue up, then go as one batch (tests use it)."""
        self._open.clear()
        try:
            yield
        finally:
            self._open.set()

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
            self.run_batch(batch)
        except Exception as err:  # one bad batch must not stop the server
            log.exception("generation failed")
            for job in batch:
                job.emit(Event("error", text=f"generation failed: {err}"))
