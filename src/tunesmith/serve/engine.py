"""Generation for the server: continuous batching of requests for different adapters, one token per step.

A request is a ``Job``, with its own adapter, prompt and sampling settings. Jobs decode in a ``Lane``
(one per model, and one per adapter that cannot share a batch), which they join at any step and leave
the step they finish: their prompts are prefilled first, a chunk of at most ``prefill_tokens`` tokens
a step so that a long prompt does not stall the rows decoding beside it; their rows then join the
decoding batch. Each row keeps its keys and values in a slot of the lane's ``SlotCache``
(``serve/kvcache.py``: allocated once, kept by the server from batch to batch, written in place at
each row's own positions), and a prompt whose head an earlier prompt on the same adapter had (a
system prompt, a chat template's head) starts from that head's keys and values in the
``PrefixCache``. Each step runs one forward pass for every decoding row; PEFT's mixed-adapter batches
(``adapter_names``, one name per row, ``"__base__"`` for the base model) route each row through its
own LoRA weights. Each row samples with its own temperature, top_p and random generator, stops on its
own end-of-sequence token, stop string or token limit, and streams its text as it grows.

A job with a ``grammar`` (``response_format``: ``serve/structured.py``) gives each of its rows its own
``Constraint``: the row's logits lose the tokens the grammar does not allow before it samples, and
the row ends once the grammar is complete. Rows without one are untouched.

A job asking for ``n`` choices is prefilled once: its prompt runs as one row, and its slot and
its last logits are then copied into ``n`` rows, each sampling with its own generator. A row whose
sampling fails (bad numbers, a bug) fails its own job alone: it leaves the batch with an error
event, and the other rows go on. A job cancelled (its client gone) leaves the batch at the next step.

Llama-family models with plain LoRA adapters run through the engine's own forward pass
(``serve/decoder.py``: fused products, each row's LoRA delta inside them, a few ops a layer); the
rest of this note is about the other models, which run through transformers and PEFT.

Mixed routing has a price. PEFT's ``adapter_names=`` argument walks every module twice on each
forward pass to hook the names into each LoRA layer (about 40 ms a step for SmolLM2-135M on CPU),
and each LoRA layer then splits its batch by adapter, a gather and a scatter per adapter. So
``_Routing`` routes once per decode: plain LoRA linear layers add every row's delta in one stacked
product (``serve/lora_rows.py``), the other LoRA layers get the names through hooks put in once; a
forward pass whose rows all use one adapter (a lone request, or the rows that outlive the others)
runs with that adapter made active with ``set_adapter`` (all adapters off for the base), and its
plain LoRA linear layers add its delta with its own two matrices, fewer calls than PEFT's forward.

``Scheduler`` feeds the engine: when it is idle, it waits a few milliseconds for requests that arrive
together; while it decodes, it lets the requests that arrived into the running batch at every step.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch

from tunesmith.serve.decoder import LlamaDecoder
from tunesmith.serve.held import Held
from tunesmith.serve.kvcache import PrefixCache, SlotCache, attention_masks
from tunesmith.serve.lora_rows import route, stackable
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

    def step(self, logits: torch.Tensor, eos: set[int], best: int) -> int:
        """Sample this row's next token from its ``logits`` (within its grammar, if any) and take it.
        ``best``: the logits' argmax, which the lane takes for all rows at once (greedy rows' token)."""
        sampling = self.job.sampling
        if sampling.grammar is not None:
            if self.constraint is None:
                self.constraint = Constraint(sampling.grammar, self.tokenizer, eos)
            token = next_token(self.constraint.mask(logits), sampling, self.generator)
        else:
            token = best if sampling.temperature == 0 else next_token(logits, sampling, self.generator)
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

    Rows of several adapters go through one stacked product in each plain LoRA linear layer
    (``lora_rows.route``), and through PEFT's ``adapter_names`` in the others, handed to them by hooks
    put in once (PEFT's own argument walks every module twice a pass). Rows of one adapter run with
    that adapter active (or every adapter off for the base), the plain LoRA linear layers through the
    adapter's own matrices in three products (``lora_rows.route``), the others PEFT's plain way.
    """

    def __init__(self, model, mixed: bool):
        self.model, self.mixed = model, mixed
        self.names: list[str] | str | None = None  # each row's adapter, or every row's; None: the plain way
        self.plain: str | None = None  # the adapter the model runs alone now, if any
        self.state = contextlib.ExitStack()
        self.undo: list[Callable[[], None]] = []  # what takes the routing out of the model again

    def use(self, adapters: list[str]) -> None:
        if not self.mixed:
            return
        if not self.undo:
            self._hook()
        if len(set(adapters)) == 1:
            # The other LoRA layers run the plain way; the plain LoRA linear layers take the one
            # adapter's own matrices (lora_rows.route), which is what they would compute.
            self.names = adapters[0]
            if self.plain != adapters[0]:
                self.state.close()
                self.state.enter_context(only_adapter(self.model, adapters[0]))
                self.plain = adapters[0]
            return
        if self.plain == BASE:  # disabled adapters would override the routing
            self.state.close()
            self.plain = None
        self.names = list(adapters)

    def _hook(self) -> None:
        from peft.tuners.lora import LoraLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        def hook(module, args, kwargs):
            return (args, {**kwargs, "adapter_names": self.names}) if isinstance(self.names, list) else None

        for module in self.model.modules():
            if stackable(module):  # one product for all rows (serve/lora_rows.py), not PEFT's per adapter
                self.undo.append(route(module, lambda: self.names))
            elif isinstance(module, (LoraLayer, AuxiliaryTrainingWrapper)):
                self.undo.append(module.register_forward_pre_hook(hook, with_kwargs=True).remove)

    def close(self) -> None:
        self.state.close()
        for undo in self.undo:
            undo()
        self.undo, self.names, self.plain = [], None, None


class Caches:
    """The KV caches the server keeps from batch to batch: a ``SlotCache`` for each lane of each model
    (lanes on one model take turns, each with its own rows), and a ``PrefixCache`` per model, its blocks
    keyed by adapter, of at most ``prefix_bytes``."""

    def __init__(self, prefix_bytes: int = 256 * 2**20, block: int = 16):
        self.prefix_bytes, self.block = prefix_bytes, block
        self._models: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # a model unloaded takes its caches

    def of(self, model, key: Hashable) -> tuple[SlotCache, PrefixCache]:
        lanes, prefixes = self._models.setdefault(model, ({}, PrefixCache(self.prefix_bytes, self.block)))
        return lanes.setdefault(key, SlotCache()), prefixes

    def stats(self) -> dict[str, int]:
        """Prefix-cache hits, misses, tokens reused and evictions, and the bytes each kind of cache holds."""
        totals = {"prefix_hits": 0, "prefix_misses": 0, "prefix_tokens_reused": 0, "prefix_evictions": 0,
                  "prefix_bytes": 0, "slot_bytes": 0}
        for lanes, prefixes in list(self._models.values()):
            for name, value in vars(prefixes.stats).items():
                totals[f"prefix_{name}"] += value
            totals["prefix_bytes"] += prefixes.nbytes
            totals["slot_bytes"] += sum(slots.nbytes for slots in lanes.values())
        return totals


class _Prefill:
    """New jobs' prompts, prefilled together in slots of their own, a chunk of positions at a time."""

    def __init__(self, jobs: list[Job]):
        self.jobs = jobs
        self.adapters = [job.adapter for job in jobs]
        self.lengths = torch.tensor([len(job.prompt_ids) for job in jobs])
        self.first: int | None = None  # the slot of the first prompt, once placed
        self.done = torch.zeros(len(jobs), dtype=torch.long)  # positions of each prompt in its slot
        self.logits: list[torch.Tensor | None] = [None] * len(jobs)  # of each prompt's last token

    @property
    def rows(self) -> int:
        return sum(job.sampling.n for job in self.jobs)


class Lane:
    """The running batch on one model. Jobs join at any step: their prompts are prefilled, at most
    ``prefill_tokens`` a step so a long one does not stall the rows decoding, then their rows join the
    decoding batch. A row leaves at the step it finishes, fails or is cancelled.

    Each row has a slot of ``slots`` (``kvcache.SlotCache``): the decoding rows hold slots 0..n-1, so a
    pass reads a view of them; the prompts being prefilled hold the last slots, and move down to
    n.. when they join. A row that leaves frees its slot for the last row, moved into it. A prompt
    starts with the blocks of its head that ``prefixes`` holds for its adapter, and leaves its own there.

    ``routing``: how rows go through their adapters on ``model``, shared by every lane on that model.
    ``decoder``: the model's own forward pass for serving (``serve/decoder.py``), where it has one;
    without, transformers' forward with ``routing``.
    """

    def __init__(self, model, tokenizer, routing: _Routing, slots: SlotCache, prefixes: PrefixCache,
                 prefill_tokens: int = 512, decoder: LlamaDecoder | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.decoder = decoder
        self.prefill_tokens = prefill_tokens
        self.routing = routing
        self.slots, self.prefixes = slots, prefixes
        self.eos = eos_ids(model, tokenizer)
        self.pad = tokenizer.pad_token_id
        self.device = next(model.parameters()).device
        self.dtype = model.get_input_embeddings().weight.dtype
        self.filling: list[_Prefill] = []
        self.rows: list[_Row] = []
        self.adapters: list[str] = []  # of each row
        self.tokens: list[int] = []  # each row's next input token
        self.lengths = torch.zeros(0, dtype=torch.long)  # each row's positions in its slot: its next position

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
            self.filling.append(_Prefill(jobs))

    def step(self) -> None:
        """A chunk of the oldest prompt waiting, then one token for every decoding row."""
        if self.filling:
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
        self.filling, self.rows, self.adapters, self.tokens = [], [], [], []
        self.lengths = self.lengths[:0]

    def _forward(self, first: int, ids: torch.Tensor, starts: torch.Tensor, adapters: list[str],
                 keep: int | torch.Tensor = 1) -> torch.Tensor:
        """One pass over slots ``first``.. (a row per row of ``ids``, from position ``starts``); the
        logits of the chunk's positions ``keep`` (an index tensor, or the last ``keep``)."""
        if self.decoder is not None:
            return self.decoder.forward(ids, starts, self.slots, first, adapters, keep).cpu()
        tokens = ids.shape[1]
        width = self.slots.bind(first, starts, tokens)
        masks = attention_masks(self.model.config, starts, tokens, width, self.dtype)
        masks = {k: m.to(self.device) for k, m in masks.items()} if isinstance(masks, dict) else masks.to(self.device)
        positions = starts[:, None] + torch.arange(tokens)
        self.routing.use(adapters)
        out = self.model(input_ids=ids.to(self.device), attention_mask=masks, position_ids=positions.to(self.device),
                         cache=self.slots, use_cache=True,
                         logits_to_keep=keep.to(self.device) if isinstance(keep, torch.Tensor) else keep)
        return out.logits.float().cpu()

    def _adapter_key(self, name: str) -> Hashable:
        # The adapter's config object too: an adapter unloaded and loaded again under its name (other
        # weights) must not meet the keys of the old one. Held, not its id: a freed config's id may be
        # the next one's.
        return name, Held(getattr(self.model, "peft_config", {}).get(name))

    def _place(self, prefill: _Prefill) -> None:
        """Slots for ``prefill``'s prompts (the last ones, past every row that may decode meanwhile),
        each started with the head of its prompt that the prefix cache holds."""
        length = max(len(job.prompt_ids) + job.sampling.max_tokens for job in prefill.jobs)
        self.slots.reserve(len(self.rows) + prefill.rows, length)
        prefill.first = self.slots.slots - len(prefill.jobs)
        for b, job in enumerate(prefill.jobs):
            blocks = self.prefixes.lookup(self._adapter_key(job.adapter), job.prompt_ids)
            for i, layers in enumerate(blocks):
                self.slots.write(prefill.first + b, i * self.prefixes.block, layers)
            prefill.done[b] = len(blocks) * self.prefixes.block

    def _remember(self, prefill: _Prefill) -> None:
        """Leave the blocks of ``prefill``'s prompts that the prefix cache lacks there."""
        block = self.prefixes.block
        for b, job in enumerate(prefill.jobs):
            key = self._adapter_key(job.adapter)
            for end in self.prefixes.wanted(key, job.prompt_ids):
                self.prefixes.store(key, job.prompt_ids, end, self.slots.read(prefill.first + b, end - block, end))

    def _prefill(self, prefill: _Prefill) -> None:
        if prefill.first is None:
            self._place(prefill)
        jobs = prefill.jobs
        tokens = min(int((prefill.lengths - prefill.done).max()), max(1, self.prefill_tokens // len(jobs)))
        ids = torch.full((len(jobs), tokens), self.pad, dtype=torch.long)
        for b, job in enumerate(jobs):  # right-padded: each prompt goes on from its own position
            chunk = job.prompt_ids[int(prefill.done[b]):int(prefill.done[b]) + tokens]
            ids[b, :len(chunk)] = torch.tensor(chunk, dtype=torch.long)
        last = (prefill.lengths - 1 - prefill.done).tolist()  # where each prompt's last token is in this chunk
        ending = [b for b in range(len(jobs)) if 0 <= last[b] < tokens]
        keep = sorted({last[b] for b in ending})
        logits = self._forward(prefill.first, ids, prefill.done, prefill.adapters,
                               torch.tensor(keep) if keep else 1)
        for b in ending:
            prefill.logits[b] = logits[b, keep.index(last[b])]
        prefill.done = torch.minimum(prefill.done + tokens, prefill.lengths)
        if bool((prefill.done < prefill.lengths).any()):
            return
        self.filling.pop(0)
        self._remember(prefill)
        rows = [_Row(job, index, seed, self.tokenizer) for job in jobs
                for index, seed in enumerate(choice_seeds(job.sampling.seed, job.sampling.n))]
        # Each prompt was prefilled once, as one row; a job's n choices are copies of it from here on.
        choices = [j for j, job in enumerate(jobs) for _ in range(job.sampling.n)]
        tokens = self._sample(rows, torch.stack([prefill.logits[j] for j in choices]))
        live = [i for i, row in enumerate(rows) if not row.done]
        first = len(self.rows)
        self.slots.move([prefill.first + choices[i] for i in live], list(range(first, first + len(live))))
        self.rows += [rows[i] for i in live]
        self.tokens += [tokens[i] for i in live]
        self.adapters += [rows[i].job.adapter for i in live]
        self.lengths = torch.cat([self.lengths, prefill.lengths[[choices[i] for i in live]]])

    def _decode(self) -> None:
        logits = self._forward(0, torch.tensor(self.tokens)[:, None], self.lengths, self.adapters)
        self.lengths = self.lengths + 1
        self.tokens = self._sample(self.rows, logits[:, -1])
        if any(row.done for row in self.rows):
            self._leave()

    def _leave(self) -> None:
        """Finished rows leave the batch at once, so they cost nothing more: the last rows move into the
        slots they free, so that the rows left hold slots 0..n-1."""
        left = sum(not row.done for row in self.rows)
        holes = [i for i in range(left) if self.rows[i].done]
        movers = [i for i in range(left, len(self.rows)) if not self.rows[i].done]
        self.slots.move(movers, holes)
        order = list(range(left))
        for hole, mover in zip(holes, movers):
            order[hole] = mover
        self.rows = [self.rows[i] for i in order]
        self.tokens = [self.tokens[i] for i in order]
        self.adapters = [self.adapters[i] for i in order]
        self.lengths = self.lengths[order]

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        """Each row's next token from its logits; a row cancelled, finished or failed is marked done."""
        step = []
        # One reduction over the batch: an argmax per row over a 49k vocabulary was a fifth of a tiny
        # model's step (benchmarks/profile_engine.py --tiny), and torch's CPU argmax runs about three
        # times slower than max's indices (the same first maximum, as generate's argmax takes).
        best = logits.max(-1).indices.tolist()
        for i, row in enumerate(rows):
            step.append(self.pad)
            if row.job.cancelled.is_set():
                row.cancel()
                continue
            try:
                step[-1] = row.step(logits[i], self.eos, best[i])
            except Exception as err:  # this request's own failure: the rest of the batch goes on
                log.exception("generation failed for one request")
                row.fail(f"generation failed: {err}")
                row.job.cancelled.set()  # and its other choices stop
        return step


Place = Callable[[Job], tuple[Hashable, torch.nn.Module, bool]]


@torch.no_grad()
def decode(place: Place, tokenizer, jobs: list[Job], more: Callable[[int], list[Job]] | None = None,
           max_rows: int | None = None, prefill_tokens: int = 512, caches: Caches | None = None) -> None:
    """Decode ``jobs``, and any that ``more(room)`` hands in at each step, until every one has finished.

    ``place(job)`` says which lane a job decodes in: a key (jobs with the same key share a batch), the
    model, and whether it is a PEFT model whose rows each name their adapter. Lanes take turns, one
    step each. ``more`` is asked at every step for jobs of at most ``room`` rows in all (``max_rows``
    less the rows decoding or waiting for their prefill); events go to each job's ``emit``. ``caches``:
    the KV caches to decode in and leave for the next call (the server's); without, caches of this call.
    """
    caches = caches if caches is not None else Caches()
    lanes: dict[Hashable, Lane] = {}
    routings: dict[int, _Routing] = {}  # one per model: lanes on one model take turns with its state
    decoders: dict[int, LlamaDecoder | None] = {}  # one per model, with its adapters as they are in this call

    def enter(new: list[Job]) -> None:
        grouped: dict[Hashable, list[Job]] = {}
        for job in new:
            key, model, mixed = place(job)
            if key not in lanes:
                routing = routings.setdefault(id(model), _Routing(model, mixed))
                if id(model) not in decoders:
                    decoders[id(model)] = LlamaDecoder.of(model)
                lanes[key] = Lane(model, tokenizer, routing, *caches.of(model, key), prefill_tokens,
                                  decoders[id(model)])
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

    ``caches``: the KV caches that ``run_batch`` decodes in, whose counts ``stats`` reports.

    When the engine is idle, the first request waits ``window_s`` for others to arrive with it, so that
    requests sent together are prefilled together. ``run_batch(jobs, more)`` does the decoding
    (``AdapterPool.run``, through ``decode``), called on this scheduler's own thread; it asks ``more(room)``
    at each step for the requests that arrived since, at most ``room`` rows of them, in order.
    """

    def __init__(self, run_batch: Callable[[list[Job], Callable[[int], list[Job]]], None], window_s: float = 0.005,
                 max_batch: int = 16, caches: Caches | None = None):
        self.run_batch = run_batch
        self.caches = caches  # the KV caches ``run_batch`` decodes in, for ``stats``
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

    def stats(self) -> dict[str, int]:
        """Requests submitted, and the KV caches' counts (``Caches.stats``: prefix-cache hits and misses)."""
        return {"submitted": self.submitted, **(self.caches.stats() if self.caches is not None else {})}

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
