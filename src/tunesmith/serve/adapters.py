"""One base model and the LoRA adapters of many runs, loaded as named adapters of one PEFT model.

Which runs serve, and how, is their method's to say (``Method.serves``): plain LoRA adapters share
batches with each other and the base (PEFT's ``adapter_names`` routing); DoRA adapters, which PEFT
cannot route so, are decoded in batches of their own (``batches``), one adapter active at a time;
IA3 adapters, which a LoRA PEFT model cannot hold, each on a copy of the base of their own.

Runs are read through ``store.Run`` (their config, their saved adapter, their parent), not through
``session.load_run``: that builds a whole model per run, and the point here is one base for all.
Every run must have trained LoRA on a causal LM (its objective's ability ``causal_answers``) on the
same base model and dtype; anything else is refused with the reason. Adapters loaded at run time
come only from the configured directories, and at most ``max_adapters`` stay in memory.

The pool's ``lock`` is held while the engine decodes (from idle until every running request is
done) and while an adapter is loaded or unloaded, so a batch never sees the model change under it;
a load or unload waiting for it stops new requests joining, so the running ones finish and it gets
in. Requests ``claim`` their adapter, which counts the jobs waiting for it: an adapter ``retire``d
(the old target of a moved alias) is unloaded only once no alias points at it and no job waits for
it, so a promotion fails no request already queued.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.errors import TunesmithError
from tunesmith.methods import get_method
from tunesmith.methods.base import APART, MIXED
from tunesmith.model import lay_out_for_decoding, load_model, load_tokenizer, resolve_model
from tunesmith.objectives import lacks
from tunesmith.serve.engine import BASE, Event, Job, decode
from tunesmith.store import Run


@dataclass
class Adapter:
    name: str
    run: Path
    parent: Path | None
    created: int
    how: str = MIXED  # how it is batched (``Method.serves``): MIXED, ALONE or APART


@dataclass
class RunAdapter:
    """What serving needs from a run: its base model, dtype and saved adapter directory."""

    run: Run
    base: str  # the model name as the run's config gives it
    source: str  # where that name resolves to
    dtype: str
    weights: Path
    how: str = MIXED  # ``Method.serves``


def read_run(path: str | Path) -> RunAdapter:
    """A run's adapter, or the reason it cannot be served as one."""
    run = Run(path, writer=False)
    config = run.load_config()
    method = get_method(config.method.name)
    how = method.serves(config.method)
    if how is None:
        raise TunesmithError(f"{run.path}: trained with method {config.method.name}, which is not served beside "
                             "other runs on one base model (LoRA, DoRA and IA3 adapters are); export the merged "
                             "run and serve that on its own")
    if why := lacks(config.objective.name, "causal_answers"):
        raise TunesmithError(f"{run.path}: {why}; only runs that tune a causal LM's answers share its base")
    weights = run.saved(method)
    if not (weights / "adapter_config.json").is_file():
        raise TunesmithError(f"{run.path}: the run has no saved adapter/ (status: {run.status()})")
    return RunAdapter(run, config.model.name, resolve_model(config.model.name), config.model.dtype, weights, how)


class AdapterPool:
    def __init__(self, base: str, dtype: str = "float32", max_adapters: int = 8,
                 adapter_dirs: list[Path] = (), aliases: dict[str, str] | None = None, device: str = "cpu",
                 weights_dtype: torch.dtype | None = None):
        self.base_name = base
        self.weights_dtype = weights_dtype  # what the model is cast to after loading (``--dtype``); None: ``dtype``
        self.source = resolve_model(base)
        self.dtype = dtype
        self.max_adapters = max_adapters
        self.adapter_dirs = [Path(d).resolve() for d in adapter_dirs]
        self.tokenizer = load_tokenizer(self.source)
        # load_model never passes trust_remote_code: a served model runs no code from its directory.
        self.device = device
        self.model = self._base_model()
        self.adapters: dict[str, Adapter] = {}
        self.apart: dict[str, torch.nn.Module] = {}  # APART adapters, each on its own copy of the base
        self.aliases: dict[str, str] = dict(aliases or {})
        self.lock = threading.Lock()
        self.created = int(time.time())
        self.pending: Counter[str] = Counter()  # per adapter: jobs claimed and not yet decoded
        self.retiring: set[str] = set()  # adapters to unload once nothing needs them
        self._claims = threading.Lock()  # guards pending (taken inside lock, never the other way)
        self.changes_waiting = 0  # loads and unloads waiting for ``lock``: no request joins meanwhile

    def _base_model(self) -> torch.nn.Module:
        # load_model never passes trust_remote_code: a served model runs no code from its directory.
        model = load_model(self.source, dtype=self.dtype).to(self.device, self.weights_dtype).eval().requires_grad_(False)
        lay_out_for_decoding(model)  # batched decoding runs 1.6x faster on CPU (model.py says why)
        return model

    @classmethod
    def from_runs(cls, runs: dict[str, Path], base: str | None = None, **kwargs) -> AdapterPool:
        """A pool on the runs' shared base model (or ``base``), with each run's adapter under its name."""
        read = {name: read_run(path) for name, path in runs.items()}
        if base is None and not read:
            raise TunesmithError("serve: give at least one run, or the base model with --base")
        first = next(iter(read.values()), None)
        pool = cls(base or first.base, dtype=first.dtype if first else "float32", **kwargs)
        problems = [pool._mismatch(r) for r in read.values()]
        if any(problems):
            raise TunesmithError(*problems)
        for name, r in read.items():
            pool._add(name, r)
        return pool

    # What requests name.
    def resolve(self, model: str) -> str | None:
        """The adapter a request's ``model`` names (BASE for the base model), or None."""
        if model == self.base_name:
            return BASE
        name = self.aliases.get(model, model)
        return name if name in self.adapters else None

    def claim(self, model: str) -> str | None:
        """``resolve``, counting one more job for the adapter; ``run`` counts it off once decoded."""
        with self._claims:
            name = self.resolve(model)
            if name is not None:
                self.pending[name] += 1
            return name

    def models(self) -> list[dict]:
        """The entries of ``/v1/models``: the base, then every adapter and alias."""
        entries = [{"id": self.base_name, "object": "model", "created": self.created,
                    "owned_by": "tunesmith", "root": self.source, "parent": None}]
        for adapter in self.adapters.values():
            entries.append({"id": adapter.name, "object": "model", "created": adapter.created,
                            "owned_by": "tunesmith", "root": str(adapter.run), "base": self.base_name,
                            "parent": str(adapter.parent) if adapter.parent else None})
        for alias, name in self.aliases.items():
            entries.append({"id": alias, "object": "model", "created": self.created, "owned_by": "tunesmith",
                            "root": name, "base": self.base_name, "alias_of": name, "parent": None})
        return entries

    # Run time changes.
    def load(self, name: str, path: str) -> None:
        """Load the run at ``path`` as adapter ``name`` (``/v1/load_lora_adapter``)."""
        if not self.adapter_dirs:
            raise TunesmithError("loading adapters at run time is off: start the server with --adapter-dir DIR")
        try:
            resolved = Path(path).expanduser().resolve()
        except (RuntimeError, ValueError, OSError) as err:  # "~nobody", a NUL byte, a loop of links
            raise TunesmithError(f"lora_path {path!r}: {err}") from None
        if not any(resolved.is_relative_to(d) for d in self.adapter_dirs):
            raise TunesmithError(f"lora_path {path!r} is outside the adapter directories "
                                 f"({', '.join(map(str, self.adapter_dirs))})")
        if not resolved.is_dir():
            raise TunesmithError(f"lora_path {path!r}: no such run directory")
        run = read_run(resolved)
        problem = self._mismatch(run)
        if problem:
            raise TunesmithError(problem)
        self._add(name, run)

    def unload(self, name: str) -> None:
        """Remove adapter ``name`` from memory (``/v1/unload_lora_adapter``); aliases to it go too."""
        with self._changing():
            if name not in self.adapters:
                raise TunesmithError(f"lora_name {name!r}: no such adapter is loaded")
            self._drop(name)
            self.aliases = {a: n for a, n in self.aliases.items() if n != name}

    def retire(self, name: str) -> None:
        """Unload adapter ``name`` as soon as no alias points at it and no claimed job waits for it
        (now, or after the batch that decodes its last job). An alias pointed back at it first keeps it."""
        with self._changing():
            self.retiring.add(name)
            self._unload_retired()

    def _unload_retired(self) -> None:
        """Unload the retiring adapters nothing needs any more; the caller holds ``lock``. Claims wait
        meanwhile, so no request can take an adapter that is going."""
        with self._claims:
            for name in list(self.retiring):
                if name in self.aliases.values() or name not in self.adapters:
                    self.retiring.discard(name)  # wanted again, or gone already
                elif not self.pending[name]:
                    self.retiring.discard(name)
                    self._drop(name)

    def _drop(self, name: str) -> None:
        if self.apart.pop(name, None) is not None:  # its own model goes with it
            del self.adapters[name]
            return
        others = [other for other in self.adapters if other != name and other not in self.apart]
        if others and name in self.model.active_adapters:
            # A batch of one adapter made it active (engine.only_adapter); hand that on first, or PEFT
            # warns that it picked another active adapter itself. Batches set theirs anyway.
            self.model.set_adapter(others[0])
        self.model.delete_adapter(name)
        del self.adapters[name]
        if not others:
            # A PEFT model with no adapter cannot run forward; go back to the plain base model.
            self.model = self.model.unload()

    def set_alias(self, alias: str, name: str) -> None:
        """Point ``alias`` at adapter ``name``, live: the next request for the alias uses it."""
        if name not in self.adapters:
            raise TunesmithError(f"model {name!r}: no such adapter is loaded")
        if alias == self.base_name or alias in self.adapters:
            raise TunesmithError(f"alias {alias!r} already names a model")
        self.aliases[alias] = name

    def _mismatch(self, run: RunAdapter) -> str | None:
        if run.source != self.source or run.dtype != self.dtype:
            return (f"{run.run.path}: trained on {run.base} ({run.dtype}); this server's base is "
                    f"{self.base_name} ({self.dtype}); all adapters must share one base model")
        return None

    def _add(self, name: str, run: RunAdapter) -> None:
        from peft import PeftModel

        with self._changing():
            if name in self.adapters or name in self.aliases or name == self.base_name or name == BASE:
                raise TunesmithError(f"lora_name {name!r}: already loaded (unload it first)")
            if len(self.adapters) >= self.max_adapters:
                raise TunesmithError(f"at most {self.max_adapters} adapters stay in memory "
                                     f"(--max-adapters); unload one first")
            if run.how == APART:
                self.apart[name] = PeftModel.from_pretrained(self._base_model(), run.weights, adapter_name=name).eval()
            elif isinstance(self.model, PeftModel):
                self.model.load_adapter(run.weights, adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, run.weights, adapter_name=name).eval()
            self.adapters[name] = Adapter(name, run.run.path, run.run.parent, int(time.time()), run.how)

    @contextlib.contextmanager
    def _changing(self):
        """``lock``, for a change of the model: the engine lets no new request join while this waits."""
        with self._claims:
            self.changes_waiting += 1
        try:
            with self.lock:
                yield
        finally:
            with self._claims:
                self.changes_waiting -= 1

    # Generation.
    def place(self, job: Job) -> tuple[str, torch.nn.Module, bool]:
        """Where ``job`` decodes (``engine.decode``'s lanes): the base's and the adapters that mix in
        one share a lane on the shared model; each other adapter (``Method.serves``: DoRA ALONE, IA3
        APART, on its own model) has a lane of its own."""
        from peft import PeftModel

        if job.adapter == BASE or self.adapters[job.adapter].how == MIXED:
            return BASE, self.model, isinstance(self.model, PeftModel)
        model = self.apart.get(job.adapter, self.model)
        return job.adapter, model, isinstance(model, PeftModel)

    def run(self, jobs: list[Job], more=None, max_rows: int = 16, prefill_tokens: int = 512, caches=None) -> None:
        """Decode ``jobs``, and those ``more(room)`` hands in while they decode (the scheduler's
        ``run_batch``); a job whose adapter has gone fails alone."""
        decoded = list(jobs)

        def live(new: list[Job]) -> list[Job]:
            kept = []
            for job in new:
                if job.adapter == BASE or job.adapter in self.adapters:
                    kept.append(job)
                else:
                    job.emit(Event("error", text=f"adapter {job.adapter!r} was unloaded"))
            return kept

        def joining(room: int) -> list[Job]:
            if self.changes_waiting:  # let the running requests finish, so the change gets the lock
                return []
            new = more(room)
            decoded.extend(new)
            return live(new)

        with self.lock:
            try:
                decode(self.place, self.tokenizer, live(jobs), joining if more else None, max_rows, prefill_tokens,
                       caches)
            finally:
                with self._claims:
                    for job in decoded:
                        self.pending[job.adapter] -= 1
                        if self.pending[job.adapter] <= 0:
                            del self.pending[job.adapter]  # (a job run without a claim: tests)
                if self.retiring:
                    self._unload_retired()
