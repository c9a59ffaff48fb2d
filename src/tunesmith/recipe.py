"""The fine-tuning recipe: set up, evaluate the base, train, evaluate the tuned model, save, report.

One readable function per phase, wired by ``run_training``. What a config turns on beside that fixed
shape (private training, a parent run, a judge, a curriculum, class balance) plugs in as a
``features.Feature``, called at the same points whichever it is. A run directory only looks finished
(``metrics.json``, ``report.md``, status ``complete``) once everything in it has been written; until
then its status says ``running``, ``interrupted``, ``failed`` or (its process gone) ``crashed``.

Several processes (``accelerate launch``, ``torchrun``) run the same recipe: each trains on its
share of every step and evaluates its share of the held-out rows; only the main process writes.
"""

from __future__ import annotations

import hashlib
import json
import math
import resource
import sys
import time
from pathlib import Path

import torch

from tunesmith.config import RunConfig
from tunesmith.data.canaries import canary_record
from tunesmith.data.pipeline import format_stats
from tunesmith.eval.baselines import baselines, compare_line, format_baselines
from tunesmith.eval.classification import format_console, format_report, plot_confusion, plot_reliability
from tunesmith.eval.curve import training_length, validations
from tunesmith.eval.report import plot_losses, write_report
from tunesmith.export.portable import make_portable
from tunesmith.features import Feature, Report, plug_in
from tunesmith.files import write_atomic
from tunesmith.lifecycle.continual import Continual
from tunesmith.methods import count_parameters
from tunesmith.model import set_dropout
from tunesmith.session import Session
from tunesmith.stopping import StopRequest, on_sigterm
from tunesmith.store import Run
from tunesmith.train import distributed, zero
from tunesmith.train.loop import TrainState, fit
from tunesmith.train.processes import cpu_only, setup_threads


def run_training(config: RunConfig, resume: bool = False, on_step=None, parent: str | Path | None = None,
                 base_cache: Path | None = None) -> Path:
    """Train and evaluate as ``config`` says; returns the path of report.md.

    ``parent``: a finished run to continue (``tunesmith train --from``); a resumed run keeps the
    parent its status records. ``base_cache``: a directory where runs of the same base model on the
    same data share the base model's evaluation (a search's trials), keyed by ``base_eval_key``."""
    from accelerate import PartialState

    with on_sigterm() as stop:  # from here on, a SIGTERM stops the run at whatever phase it is in
        processes = PartialState(cpu=cpu_only())
        main = processes.is_main_process
        run = Run(config.output.dir, writer=main)
        run.check_new(resume)
        continual = Continual.open(config, parent or (run.parent if resume else None))
        setup_threads(config.train.threads)
        session = Session(config)
        session.prepare()  # all input problems surface here, before anything is written
        session.check_decision()
        features = plug_in(session, processes, continual)  # the features' too
        if main:
            print(format_stats(session.data.stats))
            for line in filter(None, (feature.plan() for feature in features)):
                print(line)
        with run.ending():
            run.set_status("running", **continual.status())
            run.save_config(config)
            run.save_json("data_stats", session.data.stats)
            run.save_json("labels", session.data.labels)
            if config.data.canaries:
                run.save_json("canaries", canary_record(config.data.canaries, session.data.schema.kind))
            return _run(session, run, resume, on_step, stop, features, base_cache)


def _run(session: Session, run: Run, resume: bool, on_step, stop: StopRequest, features: list[Feature],
         base_cache: Path | None = None) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    config = session.config
    trackers = "tensorboard" if _has_tensorboard() else None
    # The scheduler steps once per optimizer step: the loop already counts steps over all processes.
    accelerator = Accelerator(cpu=cpu_only(), log_with=trackers, project_dir=str(run.path),
                              step_scheduler_with_optimizer=False)
    distributed.load_whole(accelerator)
    zero.check_offload(accelerator)
    if trackers:
        accelerator.init_trackers("tensorboard", config={"method": config.method.name, "lr": config.train.lr})
    set_seed(config.train.seed)
    model = session.load_model(session.data.labels)
    if "device_map" not in session.method.load_kwargs(config.method):
        model = model.to(accelerator.device)  # a quantised model is placed by its loader and cannot move
    if config.train.dropout is not None:
        set_dropout(model, config.train.dropout)

    base = evaluate_base(session, run, model, resume, accelerator, base_cache)
    for feature in features:  # ``Continuing``, always among them, applies the method
        model = feature.start(session, run, model, resume, accelerator)
    trainable, total = count_parameters(model)
    if accelerator.is_main_process:
        print(f"method {config.method.name}: {trainable:,} trainable parameters of {total:,} "
              f"({100 * trainable / total:.2f}%)")
    options = {}
    for feature in features:
        options |= feature.fit_options(session, accelerator)
    train = session.data.encoded["train"]
    batches = options.pop("batches") if "batches" in options else session.objective.batches(train)
    started = time.perf_counter()
    state = fit(model, accelerator, batches, session.data.encoded["validation"], config.train, run.checkpoints,
                run.metrics_log, resume=resume and run.has_checkpoint(), on_step=on_step, stop=stop, **options)
    seconds = time.perf_counter() - started
    sharded = distributed.sharded(accelerator)
    if sharded:  # the weights are gathered (every process takes part) and the model rebuilt whole on each
        model = unsharded(session, distributed.trainable_weights(model), accelerator.device)
    tuned = evaluate_tuned(session, model, accelerator)
    for feature in features:
        feature.evaluate(session, model, accelerator)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # closes the trackers, and the process group: no collective after it
    if not accelerator.is_main_process:
        return run.report
    return finish(session, run, model, base, tuned, state, seconds, trainable, total, features)


def unsharded(session: Session, weights: dict, device) -> torch.nn.Module:
    """The tuned model whole on this process: the method applied to the base again, with the trained
    weights gathered from every process. Sharded training leaves each process a slice of the model it
    trained, which evaluation, saving and merging need whole."""
    model = session.method.apply(session.load_model(session.data.labels), session.config.method)
    distributed.load_weights(model, weights)
    return model.to(device)


def evaluate_base(session: Session, run: Run, model, resume: bool, processes,
                  cache: Path | None = None) -> dict | None:
    """The base model's metrics and samples, for the main process (the others get None): kept for a
    resumed run, read from ``cache`` when a run before this one evaluated the same base on the same
    held-out data, or else scored by every process (``Session.score``, ``Session.samples``)."""
    main = processes.is_main_process
    base = run.load_json("base_eval") if resume and main else None
    shared = cache / f"{base_eval_key(session.config)}.json" if cache is not None else None
    if base is None and main and shared is not None and shared.is_file():
        base = json.loads(shared.read_text())
        print(f"base model's evaluation read from {shared}")
        run.save_json("base_eval", base)
    # The main process says whether to score, so that every process takes part or none does.
    if distributed.main_says(base is None, processes):
        if main:
            print("evaluating the base model on held-out data" + _by(session, processes) + " ...")
        metrics, samples = session.score(model, processes), session.samples(model, processes)
        if main:
            base = {"metrics": metrics, "samples": samples}
            run.save_json("base_eval", base)
    if not main:
        return None
    if shared is not None and not shared.is_file():
        shared.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(shared, json.dumps(base))  # a worker beside this one reads it whole or not at all
    print("base: " + _fmt(base["metrics"]))
    return base


def base_eval_key(config: RunConfig) -> str:
    """What the base model's evaluation depends on, hashed: the model, the objective, the data and
    how it is laid out and scored, and the method's name (a method may load the base differently,
    QLoRA quantised). Not the method's options, the learning rate or the steps, which a search varies."""
    dumped = config.model_dump(mode="json")
    train = dumped["train"]
    key = {
        "model": dumped["model"], "objective": dumped["objective"], "data": dumped["data"], "eval": dumped["eval"],
        "method": dumped["method"]["name"],
        "layout": {k: train[k] for k in ("batch_tokens", "seed", "packing", "shared_prefix")},
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def evaluate_tuned(session: Session, model, processes) -> dict | None:
    """The tuned model's decision rule (``eval.decision``), metrics, classification report and samples,
    scored by every process; the main process gets them, the others None."""
    decision = session.choose_decision(model, processes)
    if processes.is_main_process:
        print("evaluating the tuned model on held-out data" + _by(session, processes) + " ...")
    metrics, classes = session.score_report(model, processes)
    samples = session.samples(model, processes)
    return {"decision": decision, "metrics": metrics, "classes": classes, "samples": samples} \
        if processes.is_main_process else None


def finish(session: Session, run: Run, model, base: dict, evaluated: dict, state: TrainState, seconds: float,
           trainable: int, total: int, features: list[Feature]) -> Path:
    """Save the tuned model (``evaluated``: its ``evaluate_tuned``), and write metrics.json and the
    report, each feature's entries and sections among them."""
    config, method = session.config, session.method
    decision, tuned, classes = evaluated["decision"], evaluated["metrics"], evaluated["classes"]
    if decision:
        run.save_json("decision", decision.to_json())
        print(decision.describe())
    print("tuned: " + _fmt(tuned))
    tuned_samples = evaluated["samples"]

    saved = run.saved(method)
    method.save(model, saved)
    session.tokenizer.save_pretrained(saved)
    make_portable(run, saved, session.origin, method.name)
    if config.output.merge and method.merge is not None:
        merged = method.merge(model)
        merged.save_pretrained(run.merged)
        session.tokenizer.save_pretrained(run.merged)

    summary = {
        "model": config.model.name,
        "objective": config.objective.name,
        "method": method.name,
        "trainable_params": trainable,
        "total_params": total,
        "steps": state.step,
        "stopped_early": state.stopped_early,
        "best_step": state.best_step,
        "train_seconds": seconds,
        "tokens_per_s": state.input_tokens / max(seconds, 1e-9),
        "test_examples": len(session.test_set()[0]),
        "best_val_loss": state.best_val if math.isfinite(state.best_val) else None,
        "peak_memory_mb": peak_memory_mb(),
        "base": base["metrics"],
        "tuned": tuned,
    }
    if torch.cuda.is_available():
        summary["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    sections = []
    if decision:
        summary["decision"] = decision.to_json()
        sections += ["## Decision rule", "", decision.describe() + "; the tuned figures use it.", ""]
    if classes:
        summary["classification"] = classes
        summary["baselines"] = baselines(session.data.examples, session.test_set()[0], session.data.labels)
        sections += classification_sections(run, classes, summary["baselines"], tuned)
    length = training_length(validations(run.metrics_records()), best_kept=state.kept_step == state.best_step)
    if length:
        summary["training_length"] = length
        sections += ["## Training length", "", length["line"] + ".", ""]
        print(length["line"])
    report = Report(summary, sections)
    for feature in features:
        feature.finish(session, run, model, state, report)
    samples = [{**b, "base": b["output"], "tuned": t["output"]} for b, t in zip(base["samples"], tuned_samples)]
    has_plot = plot_losses(run.metrics_log, run.loss_plot)
    # metrics.json and report.md last: their presence means the run finished.
    run.save_json("metrics", summary)
    return write_report(run.path, summary, session.data.stats, samples, has_plot, report.sections)


def classification_sections(run: Run, classes: dict, found: dict, tuned: dict) -> list[str]:
    """The report's classification report and baselines (printed too), with their two plots."""
    plot_confusion(classes, run.confusion_plot)
    plot_reliability(classes, run.reliability_plot)
    print(format_console(classes))
    print(compare_line(found, tuned))
    return ["## Classification report (tuned model, test split)", "", *format_report(classes), "",
            f"![confusion matrix]({run.confusion_plot.name}) ![reliability diagram]({run.reliability_plot.name})", "",
            "## Against two baselines on the same splits", "",
            "Trained on this run's training split, scored on the same test rows as the tuned model.", "",
            *format_baselines(found, tuned), ""]


def peak_memory_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _has_tensorboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None


def _by(session: Session, processes) -> str:
    n = session.scoring_processes(processes)
    return f" ({n} processes, a share of the rows each)" if n > 1 else ""


def _fmt(metrics: dict) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
