"""The fine-tuning recipe: setup, evaluate the base, train, evaluate the tuned model, save, report.

A run directory only looks finished (``metrics.json``, ``report.md``, ``status.json`` saying
``complete``) once everything in it has been written; until then ``status.json`` says ``running``,
``interrupted`` or ``failed``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch

from tunesmith.config import RunConfig, load_config, save_config
from tunesmith.data.format import Encoder
from tunesmith.data.pipeline import PreparedData, format_stats, prepare_data
from tunesmith.errors import TunesmithError
from tunesmith.eval.metrics import evaluate, generate_samples
from tunesmith.eval.report import plot_losses, write_report
from tunesmith.methods import count_parameters, get_method
from tunesmith import tasks
from tunesmith.model import load_model, load_tokenizer, resolve_model, set_dropout
from tunesmith.train.loop import Batches, train

log = logging.getLogger(__name__)


def set_status(run_dir: Path, status: str, **extra) -> None:
    (run_dir / "status.json").write_text(json.dumps({"status": status, **extra}, indent=1))


def read_status(run_dir: Path) -> str | None:
    path = run_dir / "status.json"
    return json.loads(path.read_text()).get("status") if path.is_file() else None


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Never overwrite a run; resume only one that has a checkpoint and has not finished."""
    status = read_status(run_dir)
    if resume:
        if status == "complete":
            raise TunesmithError(f"output.dir {run_dir}: this run is already complete; nothing to resume")
        if not (run_dir / "checkpoints" / "last" / "state.json").is_file():
            raise TunesmithError(f"output.dir {run_dir}: no checkpoint to resume from")
    elif run_dir.exists() and any(run_dir.iterdir()):
        what = f"a run (status: {status})" if status else "files"
        raise TunesmithError(
            f"output.dir {run_dir} already holds {what}; choose another output.dir "
            "(--set output.dir=...) or pass --resume to continue it"
        )


def setup_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


class Session:
    """What the recipe steps share: config, tokenizer, data, method and the batching geometry."""

    def __init__(self, config: RunConfig):
        self.config = config
        self.task = config.model.task
        self.method = get_method(config.method.name)
        if self.task != "causal" and not self.method.packs:
            raise TunesmithError(f"method.name: {self.method.name} serves causal LMs only, not model.task {self.task}")
        self.model_source = resolve_model(config.model.name)
        self.tokenizer = load_tokenizer(self.model_source)
        # Templates frame prompts for causal LMs only; the other tasks tokenise their inputs directly.
        self.encoder = (Encoder(self.tokenizer, config.data.template, config.data.system_prompt,
                                config.data.max_length) if self.task == "causal" else None)
        self.data: PreparedData = (prepare_data(config.data, self.tokenizer) if self.task == "causal"
                                   else self._prepare_task_data())
        self.row_len = config.data.max_length
        self.batch_tokens = max(config.train.batch_tokens, self.row_len)
        self.pad_id = self.tokenizer.pad_token_id
        # Rows of one example when packing is off, or for methods that cannot pack (prompt learning).
        self.one_per_row = not (config.train.packing and self.method.packs)
        self.direct = self.method.direct_decoder

    def _prepare_task_data(self) -> PreparedData:
        from tunesmith.data.pipeline import SPLITS, load_splits

        splits, schema, stats = load_splits(self.config.data)
        tasks.check_task_data(self.task, schema.kind)
        labels = sorted({e["label"] for e in splits["train"]}) if schema.kind == "classification" else []
        max_length = self.config.data.max_length
        if self.task == "classification":
            encoded = {n: tasks.encode_classification(splits[n], self.tokenizer, labels, max_length) for n in SPLITS}
        else:
            encoded = {n: tasks.encode_seq2seq(splits[n], self.tokenizer, max_length) for n in SPLITS}
        return PreparedData(schema, splits, encoded, labels, stats)

    def load_model(self):
        kwargs = self.method.load_kwargs(self.config.method)
        return load_model(self.model_source, self.task, self.config.model.dtype, self.data.labels, **kwargs)

    def batches(self, items: list[dict]):
        """The training-loop view of ``items`` for this task."""
        train = self.config.train
        if self.task == "causal":
            return Batches(items, self.batch_tokens, self.row_len, train.seed, self.pad_id,
                           one_per_row=self.one_per_row, direct=self.direct)
        return tasks.TaskBatches(items, self.batch_tokens, train.seed, self.pad_id, self.task)

    def test_set(self) -> tuple[list[dict], list[dict]]:
        n = self.config.eval.max_examples
        examples, encoded = self.data.examples["test"], self.data.encoded["test"]
        if not examples:
            examples, encoded = self.data.examples["validation"], self.data.encoded["validation"]
        return examples[:n], encoded[:n]

    def score(self, model) -> dict:
        examples, encoded = self.test_set()
        if not examples:
            raise TunesmithError("data: no test or validation rows to evaluate on")
        if self.task != "causal":
            return tasks.evaluate_task(model, self.batches(encoded), self.data.labels, examples, self.tokenizer,
                                       self.config.data.max_length)
        return evaluate(model, self.encoder, examples, encoded, self.data.labels, self.batch_tokens,
                        self.row_len, self.pad_id, self.direct, one_per_row=self.one_per_row)

    def samples(self, model) -> list[dict]:
        examples = self.test_set()[0][: self.config.eval.samples]
        if self.task != "causal":
            return tasks.task_samples(model, self.task, examples, self.tokenizer, self.data.labels,
                                      self.config.data.max_length, self.config.eval.max_new_tokens)
        return generate_samples(model, self.tokenizer, self.encoder, examples, self.config.eval.max_new_tokens)


def run_training(config: RunConfig, resume: bool = False, on_step=None) -> Path:
    """Train and evaluate as ``config`` says; returns the path of report.md."""
    run_dir = Path(config.output.dir)
    check_run_dir(run_dir, resume)
    setup_threads(config.train.threads)
    session = Session(config)  # all input problems surface here, before anything is written
    print(format_stats(session.data.stats))
    run_dir.mkdir(parents=True, exist_ok=True)
    set_status(run_dir, "running", pid=os.getpid())
    save_config(config, run_dir / "config.yaml")
    (run_dir / "data_stats.json").write_text(json.dumps(session.data.stats, indent=1))
    (run_dir / "labels.json").write_text(json.dumps(session.data.labels))
    try:
        report = _run(session, run_dir, resume, on_step)
    except KeyboardInterrupt:
        set_status(run_dir, "interrupted")
        raise
    except BaseException as err:
        set_status(run_dir, "failed", error=str(err))
        raise
    set_status(run_dir, "complete")
    return report


def _run(session: Session, run_dir: Path, resume: bool, on_step) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    config = session.config
    trackers = "tensorboard" if _has_tensorboard() else None
    accelerator = Accelerator(log_with=trackers, project_dir=str(run_dir))
    if trackers:
        accelerator.init_trackers("tensorboard", config={"method": config.method.name, "lr": config.train.lr})
    set_seed(config.train.seed)
    model = session.load_model()
    if "device_map" not in session.method.load_kwargs(config.method):
        model = model.to(accelerator.device)  # a quantised model is placed by its loader and cannot move
    if config.train.dropout is not None:
        set_dropout(model, config.train.dropout)

    base_path = run_dir / "base_eval.json"
    if resume and base_path.is_file():
        base = json.loads(base_path.read_text())
    else:
        print("evaluating the base model on held-out data ...")
        base = {"metrics": session.score(model), "samples": session.samples(model)}
        base_path.write_text(json.dumps(base, indent=1))
    print("base: " + _fmt(base["metrics"]))

    model = session.method.apply(model, config.method)
    trainable, total = count_parameters(model)
    print(f"method {config.method.name}: {trainable:,} trainable parameters of {total:,} "
          f"({100 * trainable / total:.2f}%)")
    batches = session.batches(session.data.encoded["train"])
    started = time.perf_counter()
    state = train(model, accelerator, batches, session.data.encoded["validation"], config.train, run_dir,
                  resume=resume, on_step=on_step)
    seconds = time.perf_counter() - started
    accelerator.end_training()
    model = accelerator.unwrap_model(model)

    print("evaluating the tuned model on held-out data ...")
    tuned = session.score(model)
    print("tuned: " + _fmt(tuned))
    tuned_samples = session.samples(model)

    method = session.method
    out_dir = run_dir / ("model" if method.name == "full" else "adapter")
    method.save(model, out_dir)
    session.tokenizer.save_pretrained(out_dir)
    if config.output.merge and method.merge is not None:
        merged = method.merge(model)
        merged.save_pretrained(run_dir / "merged")
        session.tokenizer.save_pretrained(run_dir / "merged")

    summary = {
        "model": config.model.name,
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
    samples = [{**b, "base": b["output"], "tuned": t["output"]} for b, t in zip(base["samples"], tuned_samples)]
    has_plot = plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
    # metrics.json and report.md last: their presence means the run finished.
    (run_dir / "metrics.json").write_text(json.dumps(summary, indent=1))
    return write_report(run_dir, summary, session.data.stats, samples, has_plot)


def peak_memory_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _has_tensorboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None


def _fmt(metrics: dict) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def run_labels(run_dir: Path) -> list[str] | None:
    """The class labels a run trained on (labels.json), or None for a run from before they were saved."""
    path = Path(run_dir) / "labels.json"
    return json.loads(path.read_text()) if path.is_file() else None


def load_run(run_dir: Path):
    """The tuned model of a finished (or at least saved) run, with its session."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise TunesmithError(f"{run_dir}: not a tunesmith run directory (no config.yaml)")
    config = load_config(run_dir / "config.yaml")
    method = get_method(config.method.name)
    saved = run_dir / ("model" if method.name == "full" else "adapter")
    if not saved.is_dir():
        raise TunesmithError(f"{run_dir}: the run has no saved {saved.name}/ (status: {read_status(run_dir)})")
    source = resolve_model(config.model.name)
    base = load_model(source, config.model.task, config.model.dtype, run_labels(run_dir),
                      **method.load_kwargs(config.method))
    model = method.load(base, saved)
    model.eval()
    return config, model, load_tokenizer(source)


def evaluate_run(run_dir: Path, data_file: str | None = None) -> tuple[dict, dict]:
    """Base and tuned metrics on the run's test split, or on every row of ``data_file``."""
    config, model, _ = load_run(run_dir)
    if data_file:
        if not Path(data_file).is_file():
            raise TunesmithError(f"{data_file}: file not found")
        from tunesmith.config import SplitConfig

        config.data = config.data.model_copy(update={
            "path": str(Path(data_file).resolve()), "train": None, "validation": None, "test": None,
            "max_rows": None, "split": SplitConfig(validation=0.0, test=0.0, stratify=False)})
    session = Session(config)
    if data_file:
        session.data.examples["test"] = session.data.examples["train"]
        session.data.encoded["test"] = session.data.encoded["train"]
    tuned = session.score(model)
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            base = session.score(model)
    else:
        base = session.score(session.load_model())
    return base, tuned


def generate_stream(run_dir: Path, prompt: str, max_new_tokens: int) -> str:
    """Print the tuned model's answer to ``prompt`` token by token, as the run's template frames it."""
    from transformers import TextStreamer

    config, model, tokenizer = load_run(run_dir)
    if config.model.task != "causal":
        example = {"text": prompt, "label": None, "messages": [{"role": "assistant", "content": ""}]}
        (sample,) = tasks.task_samples(model, config.model.task, [example], tokenizer, run_labels(run_dir) or [],
                                       config.data.max_length, max_new_tokens)
        print(sample["output"])
        return sample["output"]
    encoder = Encoder(tokenizer, config.data.template, config.data.system_prompt, config.data.max_length)
    text = config.data.instruction.format(text=prompt) if _is_classification(run_dir) else prompt
    framed = encoder.prompt_text({"messages": [{"role": "user", "content": text}]})
    ids = tokenizer(framed, add_special_tokens=False, return_tensors="pt").input_ids
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, streamer=streamer, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _is_classification(run_dir: Path) -> bool:
    stats = run_dir / "data_stats.json"
    return stats.is_file() and json.loads(stats.read_text()).get("format") == "classification"
