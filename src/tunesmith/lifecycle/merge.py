"""``tunesmith merge``: several runs' adapters combined into one, through PEFT's
``add_weighted_adapter``, written as a new run.

The new run holds the merged adapter in ``adapter/`` (so ``tunesmith eval`` and ``generate`` read it
like any run), and, with ``into_base``, the adapter folded into the base weights in ``merged/``: a
plain transformers directory (safetensors). Its report scores the merged adapter on every parent's
test set against that parent alone.

How runs combine is their method's ability (``Method.merges``, a ``methods.base.Merging``): LoRA
offers ``linear`` (weighted sums of the A and the B matrices), ``ties`` and ``dare_ties`` (sparsify
each adapter's update to ``density``, elect a sign per weight, add the agreeing ones) and ``svd``
(the weighted sum of the full updates, cut back to a rank by SVD), all but ``svd`` for adapters of
one rank; (IA)³ ``linear`` (each vector the weighted sum of the runs' vectors).
"""

from __future__ import annotations

from pathlib import Path

import torch

from tunesmith.errors import TunesmithError
from tunesmith.eval.report import metrics_table
from tunesmith.export.portable import make_portable
from tunesmith.methods import REGISTRY as METHODS
from tunesmith.methods import get_method
from tunesmith.methods.base import Merging
from tunesmith.objectives import lacks
from tunesmith.session import Session
from tunesmith.store import Run
from tunesmith.store.lineage import describe

HOW = ("linear", "ties", "dare_ties", "svd")  # every way some method merges (``Merging.hows``)


def check_runs(paths: list[str | Path], how: str, weights: list[float]) -> list[Run]:
    """The runs, if their adapters can merge as asked; one line naming the problem otherwise."""
    if len(paths) < 2:
        raise TunesmithError("merge: give at least two runs")
    if how not in HOW:
        raise TunesmithError(f"merge --how: unknown method {how!r}; known: {', '.join(HOW)}")
    if len(weights) != len(paths):
        raise TunesmithError(f"merge --weights: {len(weights)} weights for {len(paths)} runs; give one per run")
    runs = [Run(p, writer=False) for p in paths]
    configs = []
    for run in runs:
        if not (run.path / "config.yaml").is_file():
            raise TunesmithError(f"merge: {run.path}: not a tunesmith run directory (no config.yaml)")
        if run.status() != "complete":
            raise TunesmithError(f"merge: {run.path}: the run is not complete (status: {run.status()})")
        config = run.load_config()
        merging(run, config)
        if why := lacks(config.objective.name, "causal_answers"):
            raise TunesmithError(f"merge: {run.path}: {why}; only adapters of a causal LM merge (another "
                                 "head is trained whole, not as an adapter)")
        configs.append(config)
    first = describe(runs[0])["model"]
    for run, config in zip(runs[1:], configs[1:]):
        if describe(run)["model"] != first:
            raise TunesmithError(f"merge: {run.path} tuned model {config.model.name!r}, {runs[0].path} tuned "
                                 f"{first!r}; adapters merge only on one base model")
        if config.method.name != configs[0].method.name:
            raise TunesmithError(f"merge: {run.path} used method {config.method.name}, {runs[0].path} "
                                 f"{configs[0].method.name}; adapters merge only with adapters of their method")
    merges = merging(runs[0], configs[0])
    if how not in merges.hows:
        raise TunesmithError(f"merge --how {how}: {configs[0].method.name} adapters merge by "
                             f"{', '.join(merges.hows)} only")
    if problem := merges.check({r.path.name: c.method for r, c in zip(runs, configs)}, how):
        raise TunesmithError(f"merge {problem}")
    return runs


def merging(run: Run, config) -> Merging:
    """How the run's adapters merge (``Method.merges``); one line naming the ability where they cannot."""
    if merges := get_method(config.method.name).merges(config.method):
        return merges
    can = [name for name, method in METHODS.items() if method.merges(method.options())]
    raise TunesmithError(f"merge: {run.path}: method {config.method.name}, with its options, lacks the ability "
                         f"merges: PEFT cannot combine its adapters with others (methods that merge: "
                         f"{', '.join(can)}; a LoRA adapter with DoRA does not)")


def merged_model(runs: list[Run], how: str, weights: list[float], density: float):
    """A PEFT model whose only adapter, ``default``, is the runs' adapters merged; and the first run's
    session, its method's options those of the merged adapter."""
    from peft import PeftModel

    session = Session(runs[0].load_config())
    base = session.load_model(runs[0].labels())
    names = [f"run{i}" for i in range(len(runs))]
    model = PeftModel.from_pretrained(base, runs[0].saved(session.method), adapter_name=names[0])
    for name, run in zip(names[1:], runs[1:]):
        model.load_adapter(run.saved(session.method), adapter_name=name)
    torch.manual_seed(0)  # dare drops weights at random
    options = session.config.method
    try:
        changed = session.method.merges(options).combine(model, names, weights, how, density)
    except ValueError as err:
        raise TunesmithError(f"merge: PEFT cannot merge these adapters: {err}") from None
    session.config.method = options.model_copy(update=changed)
    model.set_adapter("default")
    for name in names:
        model.delete_adapter(name)
    model.eval()
    return model, session


def merge_runs(paths: list[str | Path], how: str, weights: list[float], out: str | Path, into_base: bool = False,
               density: float = 0.5) -> Path:
    """Merge the runs' adapters into the new run ``out``; returns its report."""
    runs = check_runs(paths, how, weights)
    target = Run(out)
    if target.path.exists() and any(target.path.iterdir()):
        raise TunesmithError(f"merge --out {target.path}: the directory already holds files; choose another")
    model, session = merged_model(runs, how, weights, density)
    config = session.config
    config.output = config.output.model_copy(update={"dir": str(target.path)})
    record = {"merged_from": [str(r.path.resolve()) for r in runs], "how": how, "weights": weights}
    target.set_status("running", **record)
    try:
        target.save_config(config)
        target.save_json("labels", runs[0].labels())
        saved = target.saved(session.method)
        model.save_pretrained(saved)
        session.tokenizer.save_pretrained(saved)
        make_portable(target, saved, session.origin, session.method.name)
        tests = score_on_parents(runs, model)
        if into_base:
            merged = session.method.merge(model)
            merged.save_pretrained(target.merged, safe_serialization=True)
            session.tokenizer.save_pretrained(target.merged)
        summary = {"model": config.model.name, "objective": config.objective.name, "method": config.method.name,
                   **record, "density": density if how in ("ties", "dare_ties") else None, "tests": tests}
        target.save_json("metrics", summary)
        report = write_merge_report(target, summary)
    except BaseException as err:
        target.set_status("failed", error=str(err))
        raise
    target.set_status("complete")
    return report


def score_on_parents(runs: list[Run], merged) -> dict:
    """Each parent's test set: the parent alone and the merged adapter."""
    from tunesmith.session import load_run

    tests = {}
    for run in runs:
        _, session, alone = load_run(run.path)
        session.prepare(run.labels() or None)
        tests[str(run.path.resolve())] = {"alone": session.score(alone), "merged": session.score(merged)}
        del alone
    return tests


def write_merge_report(run: Run, summary: dict) -> Path:
    weights = ", ".join(f"{w:g}" for w in summary["weights"])
    out = [f"# tunesmith merge: {run.path.name}", "",
           f"{len(summary['merged_from'])} {summary['method']} adapters of `{summary['model']}` merged with PEFT's "
           f"`{summary['how']}` (weights {weights}"
           + (f", density {summary['density']:g}" if summary["density"] is not None else "") + ").", ""]
    for parent, scores in summary["tests"].items():
        out += [f"## On the test set of `{parent}`", "",
                metrics_table(scores["alone"], scores["merged"], (f"{Path(parent).name} alone", "merged")), ""]
    if (run.merged / "config.json").is_file():
        out += ["The merged full model (plain transformers, safetensors) is in `merged/`.", ""]
    path = run.report
    path.write_text("\n".join(out))
    return path

