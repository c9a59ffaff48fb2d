"""A run directory: what is in it, where, and what state the run is in.

Layout (every later feature reads runs through ``Run``, never by file name)::

    status.json       running | interrupted | failed | crashed | pruned | complete, with pid, host, the
                      process's command line (what the UI's Stop checks before it signals), times,
                      parent (pruned: a search trial stopped early for its poor validation loss)
    config.yaml       the resolved configuration
    labels.json       the class labels, in the order the model's outputs use
    data_stats.json   rows read, dropped and kept, personal data found, token lengths, leakage
    canaries.json     with data.canaries: the template and every secret put into the training split
    decision.json     with eval.decision: the decision rule chosen on the validation split after training
    base_eval.json    the base model's metrics and samples (kept so that a resumed run skips them)
    curriculum_scores.json  with train.curriculum by base_loss: each training item's base-model loss
    metrics.jsonl     one line per step and per validation
    checkpoints/      last/ (resume; after a crash while saving, last.tmp/ or last.old/ may hold the newest,
                      ``train.checkpoint_names.latest_checkpoint``) and best.safetensors (early stopping)
    adapter/ | model/ the saved method weights, or the whole model (``Method.saved_as``)
    merged/           the merged model, with output.merge
    model_source.json where the base model came from here (a local directory, a GGUF file), beside the
                      name the saved weights give it, its Hub id (``export.portable``)
    metrics.json      base and tuned metrics: written last but one, so it means the run finished
    report.md         the report, with loss.png
    privacy_audit.json  written by ``tunesmith privacy audit``: canary exposure, membership inference
    launch.log        the output of a run started from ``tunesmith ui`` (written before the run starts)
    judged.json, judged.png  a judged evaluation (``eval.judge``, ``tunesmith judge``): answers of tuned
                      and base model, their scores by a judge run, the win-rate and the KL

A run whose status says ``running`` but whose process is gone (killed, out of memory, machine
rebooted) reads as ``crashed``. Only one process writes: a ``Run`` made with ``writer=False`` (the
other processes of a multi-process run) reads but never writes. Reading a run imports no model stack
(torch, transformers, the session): its tuned model is ``session.load_run``'s.
"""

from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

from tunesmith.errors import TunesmithError
from tunesmith.eval.decision import Decision
from tunesmith.files import write_atomic
from tunesmith.train.checkpoint_names import latest_checkpoint

UNFINISHED = ("running", "interrupted", "failed", "crashed", "pruned")
# The sections that mark an alignment run's config in place of data: the keys of
# align.options.LOADERS, which sits above this layer (tests/test_align_grpo_run.py holds them equal).
ALIGNMENT_SECTIONS = ("ppo", "grpo")


def process_cmdline(pid: int | str = "self") -> list[str] | None:
    """A process's command line as the kernel holds it (``/proc/PID/cmdline``); None where it cannot
    be read (no such process, no /proc)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0")[:-1]]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    # A killed process that its parent has not reaped yet (a search worker, while the parent waits
    # on another) is a zombie: it still answers signal 0, but it is gone.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


class Run:
    def __init__(self, path: str | Path, writer: bool = True):
        self.path = Path(path)
        self.writer = writer

    # Layout.
    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics_log(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def report(self) -> Path:
        return self.path / "report.md"

    @property
    def loss_plot(self) -> Path:
        return self.path / "loss.png"

    @property
    def confusion_plot(self) -> Path:
        return self.path / "confusion.png"

    @property
    def reliability_plot(self) -> Path:
        return self.path / "reliability.png"

    @property
    def curriculum_scores(self) -> Path:
        return self.path / "curriculum_scores.json"

    @property
    def launch_log(self) -> Path:
        return self.path / "launch.log"

    def is_new(self) -> bool:
        """Nothing here yet but, for a run started from the UI, the log it writes to."""
        return not self.path.exists() or all(p == self.launch_log for p in self.path.iterdir())

    @property
    def merged(self) -> Path:
        return self.path / "merged"

    def saved(self, method) -> Path:
        """Where ``method`` (a ``methods.base.Method``) saves what it trained."""
        return self.path / method.saved_as

    def has_checkpoint(self) -> bool:
        """Whether ``--resume`` has a complete checkpoint to start from (``last``, or what a crash
        while saving left in its place: see ``train.checkpoint``)."""
        return latest_checkpoint(self.checkpoints) is not None

    # Life.
    def record(self) -> dict:
        """status.json as written, with ``running`` read as ``crashed`` when its process is gone."""
        path = self.path / "status.json"
        if not path.is_file():
            return {}
        record = json.loads(path.read_text())
        if (record.get("status") == "running" and record.get("host") == socket.gethostname()
                and isinstance(record.get("pid"), int) and not _alive(record["pid"])):
            record["status"] = "crashed"
        return record

    def status(self) -> str | None:
        return self.record().get("status")

    def set_status(self, status: str, **extra) -> None:
        """Record the run's state; ``running`` also records this process, and the start time once."""
        if not self.writer:
            return
        record = {k: v for k, v in self.record().items() if k not in ("error", "resume")}
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if status == "running":
            record |= {"pid": os.getpid(), "host": socket.gethostname(), "cmdline": process_cmdline()}
            record.setdefault("started_at", now)
        record |= {"status": status, "updated_at": now, **extra}
        self._write("status.json", json.dumps(record, indent=1))

    @contextmanager
    def ending(self):
        """``with run.ending():`` around a run's work sets the status it ends with: ``interrupted`` on
        Ctrl-C or SIGTERM, ``failed`` (with the error) on any other exception, ``complete`` otherwise."""
        try:
            yield self
        except KeyboardInterrupt:
            self.set_status("interrupted")
            raise
        except BaseException as err:
            self.set_status("failed", error=str(err))
            raise
        self.set_status("complete")

    def check_new(self, resume: bool) -> None:
        """Never overwrite a run; resume only one that has started and not finished."""
        status = self.status()
        if resume:
            if status == "complete":
                raise TunesmithError(f"output.dir {self.path}: this run is already complete; nothing to resume")
            if status == "running":
                record = self.record()
                raise TunesmithError(f"output.dir {self.path}: the run is still running "
                                     f"(pid {record.get('pid')} on {record.get('host')})")
            if status is None:
                raise TunesmithError(f"output.dir {self.path}: no run there to resume; start it without --resume")
            # A run stopped before its first checkpoint (during its base evaluation, say) starts its
            # training again from the beginning, keeping what it had finished (the base evaluation).
        elif not self.is_new():
            what = f"a run (status: {status})" if status else "files"
            raise TunesmithError(
                f"output.dir {self.path} already holds {what}; choose another output.dir "
                "(--set output.dir=...) or pass --resume to continue it"
            )

    # Contents.
    def save_config(self, config) -> None:
        self._write("config.yaml", yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))

    def alignment(self) -> str | None:
        """The alignment command that wrote the run, ``ppo`` or ``grpo``: the section its config has in
        place of ``data:``; None for any other run."""
        path = self.path / "config.yaml"
        raw = (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
        return next((section for section in ALIGNMENT_SECTIONS if section in raw), None)

    def load_config(self):
        """The training run's ``RunConfig``; one line for a directory that holds none (a PPO or GRPO
        run's config is ``align.options``'s, which only the alignment commands read)."""
        if not (self.path / "config.yaml").is_file():
            raise TunesmithError(f"{self.path}: not a tunesmith run directory (no config.yaml)")
        if kind := self.alignment():
            raise TunesmithError(f"{self.path} is a {kind.upper()} run (tunesmith {kind}), which this command "
                                 "does not read: "
                                 "its evaluation is in its report.md and metrics.json, and `tunesmith generate "
                                 f"{self.path} PROMPT` answers with its policy")
        # The config's option classes are the registries' (methods, objectives): the model stack, which
        # only a reader of the config needs; a reader of the status, metrics or labels does not.
        from tunesmith.config import load_config

        return load_config(self.path / "config.yaml")

    def save_json(self, name: str, value) -> None:
        """``labels``, ``data_stats``, ``canaries``, ``base_eval``, ``metrics``, ``privacy_audit`` or
        ``judged`` (name.json)."""
        self._write(f"{name}.json", json.dumps(value, indent=1))

    def load_json(self, name: str, default=None):
        path = self.path / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else default

    def metrics_records(self) -> list[dict]:
        """The records of metrics.jsonl (a last line torn by a crash left out)."""
        if not self.metrics_log.is_file():
            return []
        records = []
        for line in self.metrics_log.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return records

    def labels(self) -> list[str]:
        """The class labels the run trained on ([] for a run without labels)."""
        return self.load_json("labels", [])

    def decision(self) -> Decision | None:
        """The decision rule chosen on validation after training (``eval.decision``); None: argmax."""
        record = self.load_json("decision")
        return Decision.from_json(record) if record else None

    @property
    def parent(self) -> Path | None:
        """The run this one continued from, if any."""
        parent = self.record().get("parent")
        return Path(parent) if parent else None

    def _write(self, name: str, text: str) -> None:
        if not self.writer:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path / name, text)

