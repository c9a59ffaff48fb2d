"""``tunesmith predict RUN --data FILE --out FILE``: every row's prediction, written as it goes.

The input is read through ``data.io.stream_records`` with the run's own reading options (header,
TSV quoting), its input column named as in the run's config, and each text normalised as training
normalised it. A classifier (the classification objective, or a causal run on label data) gives each
row the label its decision rule chooses (``eval.decision``; argmax without one) and every label's
probability, scored as ``eval`` scores them (``objective.label_scores``); another run gives its
generated answer (``objective.answer``).

Rows go out batch by batch. The output is written to ``OUT.partial`` (JSONL for a Parquet output,
converted at the end), beside ``OUT.progress`` (rows and bytes written, updated after each batch
is flushed), and renamed to ``OUT`` only once every row is in: an interrupted run never looks
complete, and the same command continues it. A row that cannot be read or predicted gets an output
row with its ``error`` and no prediction, and is reported on stderr: no row is lost silently.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from tunesmith.data.clean import normalize_text
from tunesmith.data.format import GUESSES
from tunesmith.data.io import Problem, stream_records
from tunesmith.errors import TunesmithError
from tunesmith.files import write_atomic
from tunesmith.session import load_run
from tunesmith.store import Run

OUTPUTS = (".csv", ".jsonl", ".parquet")
SHOWN_PROBLEMS = 20  # on stderr; the summary counts them all


@dataclass
class Row:
    """One input row: its line, its text (None when it cannot be read) and what is wrong with it."""

    line: int
    text: str | None
    error: str = ""


class Predictor:
    """A loaded run and how it predicts a batch of texts: a label and its probabilities, or an answer."""

    def __init__(self, run_dir: str | Path):
        self.run, self.session, self.model = load_run(run_dir)
        self.labels = self.run.labels()
        self.decision = self.run.decision()
        self.objective = self.session.objective
        self.classifies = bool(self.labels) and self.objective.abilities.scores_labels
        data = self.session.config.data
        self.header, self.tsv_quoting = data.header, data.tsv_quoting
        self.column = data.columns.text if self.classifies else (data.columns.prompt or data.columns.text)
        self.guesses = GUESSES["text"] if self.classifies else GUESSES["prompt"] + GUESSES["text"]

    def columns(self) -> list[str]:
        probabilities = [f"p_{label}" for label in self.labels] if self.classifies else []
        return ["line", "input", "prediction", *probabilities, "error"]

    def input_column(self, record: dict, source: Path) -> str:
        """The column the run reads its input from: its config's, or the first of the usual names."""
        found = [c for c in record if not c.startswith("_")]
        column = self.column or next((c for c in self.guesses if c in found), None)
        if column not in found:
            hint = "; columns are named by position (1, 2, ...) as in the run (data.header: false)" \
                if not self.header else ""
            raise TunesmithError(f"{source}: no column {column or self.guesses[0]!r} for the run's input; "
                                 f"columns found: {', '.join(found)}{hint}")
        return column

    def predict(self, rows: list[Row]) -> list[dict]:
        """An output record for every row, in order."""
        readable = [r for r in rows if r.error == ""]
        predicted = {id(r): p for r, p in zip(readable, self._predict([r.text for r in readable]))} \
            if readable else {}
        out = []
        for r in rows:
            record = {"line": r.line, "input": r.text or "", "prediction": "", "error": r.error}
            record |= predicted.get(id(r), {})
            out.append({c: record.get(c) for c in self.columns()})
        return out

    def _predict(self, texts: list[str]) -> list[dict]:
        if not self.classifies:
            new_tokens = self.session.config.eval.max_new_tokens
            if self.objective.abilities.batched_answers:
                answers = self.objective.answers(self.model, texts, self.labels, new_tokens)
            else:
                answers = [self.objective.answer(self.model, t, self.labels, new_tokens) for t in texts]
            return [{"prediction": a.strip()} for a in answers]
        # Scored exactly as eval scores held-out rows (the gold label is a stand-in: only the loss reads it).
        examples = [label_example(self.session.config.data.instruction, t, self.labels[0]) for t in texts]
        encoded = self.objective.encode(examples, self.labels)
        probabilities = self.objective.label_scores(self.model, examples, encoded, self.labels).probabilities
        chosen = self.decision.choose(probabilities, self.labels) if self.decision else probabilities.argmax(axis=1)
        return [{"prediction": self.labels[c], **{f"p_{label}": float(p) for label, p in zip(self.labels, row)}}
                for c, row in zip(chosen.tolist(), probabilities)]


def label_example(instruction: str, text: str, label: str) -> dict:
    """A labelled example as ``data.format.to_examples`` makes it from a row."""
    return {"messages": [{"role": "user", "content": instruction.format(text=text)},
                         {"role": "assistant", "content": label}], "label": label, "_input": text}


def read_rows(predictor: Predictor, path: Path) -> Iterator[Row]:
    """Every row of ``path``, with the run's input text, or with why it cannot be read."""
    column = None
    for record in stream_records(path, predictor.header, predictor.tsv_quoting):
        if isinstance(record, Problem):
            yield Row(record.line, None, record.text)
            continue
        column = column or predictor.input_column(record, path)
        value = record.get(column)
        where = f"{path}:{record['_line']}"
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            kind = "nothing" if value is None else type(value).__name__
            yield Row(record["_line"], None, f"{where}: column {column!r} holds {kind}, expected text")
        elif not (text := normalize_text(str(value))):
            yield Row(record["_line"], None, f"{where}: column {column!r} is empty")
        else:
            yield Row(record["_line"], text)


class Output:
    """``OUT.partial`` and ``OUT.progress`` while rows are written; ``OUT`` once all are in."""

    def __init__(self, out: Path, columns: list[str], run: Path, data: Path):
        self.out, self.columns = out, columns
        self.final_format = out.suffix.lower()
        if self.final_format not in OUTPUTS:
            raise TunesmithError(f"--out {out}: unsupported output type ({out.suffix or 'no suffix'}); "
                                 f"use one of {', '.join(OUTPUTS)}")
        # Parquet cannot be appended to: its rows gather as JSONL until the end.
        self.format = ".jsonl" if self.final_format == ".parquet" else self.final_format
        self.partial = out.with_name(out.name + ".partial")
        self.progress = out.with_name(out.name + ".progress")
        self.identity = {"run": str(run.resolve()), "data": str(data.resolve()), "columns": columns}
        self.rows = self.errors = 0

    def start(self) -> int:
        """The rows already written by an earlier run of the same command (0 for a new output)."""
        if self.out.exists():
            raise TunesmithError(f"--out {self.out}: the file exists; predictions are never written over a file "
                                 "(choose another --out)")
        if not self.partial.exists():
            self.progress.unlink(missing_ok=True)
            return 0
        record = json.loads(self.progress.read_text()) if self.progress.is_file() else {}
        if {k: record.get(k) for k in self.identity} != self.identity:
            raise TunesmithError(f"--out {self.out}: {self.partial} exists but is not this command's output "
                                 f"(its run, data or columns differ, or {self.progress.name} is missing); "
                                 "move it away or choose another --out")
        # A batch half-written when the run stopped is cut off: it will be written again.
        with self.partial.open("r+b") as f:
            f.truncate(record["bytes"])
        self.rows, self.errors = record["rows"], record["errors"]
        return self.rows

    def write(self, records: list[dict]) -> None:
        text = io.StringIO()
        if self.format == ".csv":
            writer = csv.writer(text, lineterminator="\n")
            if self.rows == 0:
                writer.writerow(self.columns)
            writer.writerows([[record[c] for c in self.columns] for record in records])
        else:
            text.writelines(json.dumps(record) + "\n" for record in records)
        with self.partial.open("a", encoding="utf-8", newline="") as f:
            f.write(text.getvalue())
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        self.rows += len(records)
        write_atomic(self.progress, json.dumps({**self.identity, "rows": self.rows, "errors": self.errors,
                                                   "bytes": size}))

    def finish(self) -> None:
        if self.rows == 0:
            self.write([])  # the header, or an empty file
        if self.final_format == ".parquet":
            _jsonl_to_parquet(self.partial, self.out, self.columns)
            self.partial.unlink()
        else:
            self.partial.rename(self.out)
        self.progress.unlink()


def _jsonl_to_parquet(source: Path, target: Path, columns: list[str], rows: int = 4096) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {"line": pa.int64(), "input": pa.string(), "prediction": pa.string(), "error": pa.string()}
    schema = pa.schema([(c, types.get(c, pa.float64())) for c in columns])
    written = target.with_name(target.name + ".tmp")
    with source.open(encoding="utf-8") as f, pq.ParquetWriter(written, schema) as writer:
        while batch := [json.loads(line) for line in islice(f, rows)]:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
    written.rename(target)


def count_rows(predictor: Predictor, path: Path) -> int:
    """How many rows ``path`` holds (a pass that reads without predicting), for the progress bar."""
    return sum(1 for _ in stream_records(path, predictor.header, predictor.tsv_quoting))


def predict_file(run_dir: str | Path, data: str | Path, out: str | Path, batch_size: int = 32) -> dict:
    """Predict every row of ``data`` into ``out``; returns the summary (rows, predicted, errors)."""
    from tqdm.auto import tqdm

    data, out = Path(data), Path(out)
    if not Path(run_dir).is_dir():
        raise TunesmithError(f"{run_dir}: no such run directory")
    Run(run_dir, writer=False).load_config()  # a directory that is no run says so before a model loads
    if not data.is_file():
        raise TunesmithError(f"--data {data}: file not found")
    predictor = Predictor(run_dir)
    output = Output(out, predictor.columns(), Path(run_dir), data)
    done = output.start()
    total = count_rows(predictor, data)
    if done > total:
        raise TunesmithError(f"--out {out}: {output.partial} holds {done} rows but {data} has {total}: "
                             "it is not this file's output")
    rows = read_rows(predictor, data)
    if done:
        last_written = _last_line(output.partial, output.format)
        for row in islice(rows, done):  # the rows already written: the last must be the one last written
            pass
        if row.line != last_written:
            raise TunesmithError(f"--out {out}: the rows already written end at line {last_written}, but row "
                                 f"{done} of {data} is at line {row.line}: {data} changed since")
    bar = tqdm(total=total, initial=done, unit="row", desc="predict", file=sys.stderr, dynamic_ncols=True)
    with bar:
        while batch := list(islice(rows, batch_size)):
            records = predictor.predict(batch)
            for record in records:
                if record["error"]:
                    output.errors += 1
                    if output.errors <= SHOWN_PROBLEMS:
                        bar.write(f"error: {record['error']}", file=sys.stderr)
            output.write(records)
            bar.update(len(batch))
    output.finish()
    return {"rows": output.rows, "resumed_after": done, "errors": output.errors, "out": str(out)}


def _last_line(partial: Path, fmt: str) -> int:
    """The input line of the last row written to ``partial``."""
    last = None
    with partial.open(encoding="utf-8", newline="") as f:
        if fmt == ".csv":
            for last in csv.reader(f):
                pass
            return int(last[0])
        for line in f:
            if line.strip():
                last = line
    return int(json.loads(last)["line"])
