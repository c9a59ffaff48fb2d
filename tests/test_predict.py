"""tunesmith predict: every row's prediction into a file, streamed, resumable, errors with their line,
probabilities equal to eval's."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import cli_fails, review_rows, write_config, write_jsonl

from tunesmith.cli import main


@pytest.fixture(scope="module")
def label_run(tmp_path_factory, tiny_model_dir):
    """A causal run on label data, trained briefly."""
    tmp = tmp_path_factory.mktemp("label-run")
    path = write_jsonl(tmp / "reviews.jsonl", review_rows(120))
    data = {"path": str(path), "format": "classification", "columns": {"text": "review", "label": "sentiment"},
            "label_map": {"fresh": "positive", "rotten": "negative"}, "instruction": "classify sentiment: {text}",
            "max_length": 64, "split": {"validation": 0.15, "test": 0.15}}
    config = write_config(tmp / "c.yaml", tiny_model_dir, data, train={"max_steps": 8, "eval_every": 8})
    assert main(["train", str(config)]) == 0
    return tmp / "run"


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory, tiny_model_dir):
    """A classification-objective run (a head on the tiny Llama), trained briefly."""
    tmp = tmp_path_factory.mktemp("classifier-run")
    path = write_jsonl(tmp / "reviews.jsonl", review_rows(120))
    data = {"path": str(path), "format": "classification", "columns": {"text": "review", "label": "sentiment"},
            "max_length": 64, "split": {"validation": 0.15, "test": 0.15}}
    config = write_config(tmp / "c.yaml", tiny_model_dir, data, objective={"name": "classification"},
                          train={"max_steps": 8, "eval_every": 8})
    assert main(["train", str(config)]) == 0
    return tmp / "run"


def eval_probabilities(run_dir, data_file) -> dict[int, np.ndarray]:
    """Each row's label probabilities as `tunesmith eval --data` scores them, by input line."""
    from tunesmith.data.options import SplitConfig
    from tunesmith.session import Session
    from tunesmith.session import load_run

    run, session, model = load_run(run_dir)
    config = session.config
    config.data = config.data.model_copy(update={"path": str(data_file), "split": SplitConfig(
        validation=0.0, test=0.0, stratify=False)})
    session = Session(config)
    data = session.prepare(run.labels())
    scores = session.objective.label_scores(model, data.examples["train"], data.encoded["train"], data.labels)
    return {e["_line"]: p for e, p in zip(data.examples["train"], scores.probabilities)}


@pytest.mark.parametrize("which", ["label_run", "classifier_run"])
def test_probabilities_equal_evals(which, request, tmp_path, capsys):
    run = request.getfixturevalue(which)
    rows = review_rows(30, seed=5)
    with (tmp_path / "new.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["review", "sentiment"])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "pred.csv"
    assert main(["predict", str(run), "--data", str(tmp_path / "new.csv"), "--out", str(out), "--batch-size", "7"]) == 0
    predicted = list(csv.DictReader(out.open()))
    labels = json.loads((run / "labels.json").read_text())
    assert [r["error"] for r in predicted] == [""] * 30 and [r["input"] for r in predicted] == [r["review"] for r in rows]
    want = eval_probabilities(run, tmp_path / "new.csv")
    for row in predicted:
        got = np.array([float(row[f"p_{label}"]) for label in labels])
        np.testing.assert_allclose(got, want[int(row["line"])], atol=1e-5)
        assert row["prediction"] == labels[int(got.argmax())]
    assert not (tmp_path / "pred.csv.partial").exists() and not (tmp_path / "pred.csv.progress").exists()


def test_bad_rows_are_reported_by_line_and_kept_and_an_interrupted_output_continues(label_run, tmp_path,
                                                                                    capsys, monkeypatch):
    from tunesmith.predict import Output

    lines = [json.dumps({"review": r["review"]}) for r in review_rows(20, seed=2)]
    lines[3] = "{not json"
    lines[8] = json.dumps({"review": "   "})
    lines[12] = json.dumps({"review": ["a", "list"]})
    lines[15] = json.dumps({"other": "no review here"})
    (tmp_path / "new.jsonl").write_text("\n".join(lines) + "\n")
    argv = ["predict", str(label_run), "--data", str(tmp_path / "new.jsonl"), "--out", str(tmp_path / "p.jsonl"),
            "--batch-size", "4"]

    write = Output.write
    calls = []

    def stopping(self, records):
        calls.append(len(records))
        if len(calls) == 3:
            raise KeyboardInterrupt  # as Ctrl-C between two batches
        write(self, records)

    monkeypatch.setattr(Output, "write", stopping)
    assert main(argv) == 130
    assert not (tmp_path / "p.jsonl").exists()  # an interrupted output never looks complete
    assert len((tmp_path / "p.jsonl.partial").read_text().splitlines()) == 8
    with (tmp_path / "p.jsonl.partial").open("a") as partial:
        partial.write('{"line": 9, "inp')  # a batch cut off mid-write: written again on resuming
    capsys.readouterr()
    monkeypatch.setattr(Output, "write", write)
    assert main(argv) == 1
    captured = capsys.readouterr()
    out = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["line"] for r in out] == list(range(1, 21))
    errors = {r["line"]: r["error"] for r in out if r["error"]}
    assert sorted(errors) == [4, 9, 13, 16]
    assert "new.jsonl:4: malformed JSON" in errors[4] and "new.jsonl:9: column 'review' is empty" in errors[9]
    assert "holds list" in errors[13]
    assert "holds nothing" in errors[16]
    assert all(r["prediction"] in ("positive", "negative") for r in out if not r["error"])
    assert "new.jsonl:13" in captured.err and "20 rows, continuing after the 8 rows" in captured.out
    assert "4 rows could not be read" in captured.out


def test_an_output_that_is_not_this_commands_is_never_written_over(label_run, tmp_path, capsys):
    write_jsonl(tmp_path / "new.jsonl", [{"review": r["review"]} for r in review_rows(5)])
    mine = tmp_path / "mine.csv"
    mine.write_text("precious\n")
    cli_fails(capsys, ["predict", str(label_run), "--data", str(tmp_path / "new.jsonl"), "--out", str(mine)],
              "mine.csv: the file exists")
    (tmp_path / "other.csv.partial").write_text("line,input\n1,x\n")
    cli_fails(capsys, ["predict", str(label_run), "--data", str(tmp_path / "new.jsonl"),
                       "--out", str(tmp_path / "other.csv")], "is not this command's output")
    cli_fails(capsys, ["predict", str(label_run), "--data", str(tmp_path / "new.jsonl"),
                       "--out", str(tmp_path / "p.xlsx")], "unsupported output type")
    cli_fails(capsys, ["predict", str(label_run), "--data", str(tmp_path / "none.csv"),
                       "--out", str(tmp_path / "p.csv")], "none.csv: file not found")
    write_jsonl(tmp_path / "cols.jsonl", [{"body": "x"}])
    cli_fails(capsys, ["predict", str(label_run), "--data", str(tmp_path / "cols.jsonl"),
                       "--out", str(tmp_path / "p.csv")], "no column 'review'", "columns found: body")
    assert mine.read_text() == "precious\n" and (tmp_path / "other.csv.partial").read_text() == "line,input\n1,x\n"


def test_parquet_in_and_out(label_run, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"review": r["review"]} for r in review_rows(9)]), tmp_path / "in.parquet")
    assert main(["predict", str(label_run), "--data", str(tmp_path / "in.parquet"),
                 "--out", str(tmp_path / "out.parquet"), "--batch-size", "4"]) == 0
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.column("line").to_pylist() == list(range(1, 10))
    assert table.schema.field("p_positive").type == pa.float64()
    assert np.allclose(np.array(table.column("p_positive")) + np.array(table.column("p_negative")), 1)


def test_a_generative_run_writes_its_answers(tmp_path, tiny_model_dir):
    rows = [{"prompt": f"say the {w} word", "completion": w} for w in ("great", "dull", "fun", "weak") * 10]
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, {"path": str(write_jsonl(tmp_path / "d.jsonl", rows))},
                          train={"max_steps": 2, "eval_every": 2})
    assert main(["train", str(config)]) == 0
    write_jsonl(tmp_path / "new.jsonl", [{"prompt": "say the fun word"}, {"prompt": "say the dull word"},
                                         {"prompt": "and now, please, say the great word"}])
    assert main(["predict", str(tmp_path / "run"), "--data", str(tmp_path / "new.jsonl"),
                 "--out", str(tmp_path / "p.csv")]) == 0
    out = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert list(out[0]) == ["line", "input", "prediction", "error"]
    assert [r["input"] for r in out] == ["say the fun word", "say the dull word", "and now, please, say the great word"]
    assert all(r["error"] == "" and r["prediction"] for r in out)
    from tunesmith.predict import Predictor

    one = Predictor(tmp_path / "run")  # the batch answers as generate answers each prompt alone
    assert [r["prediction"] for r in out] == [one.objective.answer(one.model, r["input"], [], 4).strip() for r in out]


def test_a_dpo_run_answers_in_batches_as_it_answers_alone(tmp_path, tiny_model_dir):
    from conftest import preference_rows

    data = {"path": str(write_jsonl(tmp_path / "pairs.jsonl", preference_rows(24))), "max_length": 96,
            "split": {"validation": 0.2, "test": 0.2}}
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, data, objective={"name": "dpo"},
                          train={"max_steps": 2, "eval_every": 2}, eval={"samples": 0})
    assert main(["train", str(config)]) == 0
    prompts = ["review the film", "review a long and winding plot", "review it"]
    write_jsonl(tmp_path / "new.jsonl", [{"prompt": p} for p in prompts])
    assert main(["predict", str(tmp_path / "run"), "--data", str(tmp_path / "new.jsonl"),
                 "--out", str(tmp_path / "p.jsonl")]) == 0
    from tunesmith.predict import Predictor

    one = Predictor(tmp_path / "run")
    assert one.objective.abilities.batched_answers  # the batch path, padded on the left
    out = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    new_tokens = one.session.config.eval.max_new_tokens
    assert [r["prediction"] for r in out] == [one.objective.answer(one.model, p, [], new_tokens).strip()
                                              for p in prompts]


PEAK = """
import resource, sys
from tunesmith.predict import predict_file
predict_file(sys.argv[1], sys.argv[2], sys.argv[3], batch_size=64)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_memory_stays_flat_from_1k_to_10k_rows(classifier_run, tmp_path):
    """Peak RSS of a whole predict process (model included) on 1,000 and on 10,000 rows."""
    peaks = {}
    for n in (1_000, 10_000):
        data = write_jsonl(tmp_path / f"in{n}.jsonl", [{"review": r["review"]} for r in review_rows(n, seed=n)])
        done = subprocess.run([sys.executable, "-c", PEAK, str(classifier_run), str(data), str(tmp_path / f"o{n}.csv")],
                              capture_output=True, text=True, check=True,
                              env={"OMP_NUM_THREADS": "1", "PATH": "", "TQDM_DISABLE": "1"})
        peaks[n] = int(done.stdout.split()[-1]) / 1024  # MiB
        assert sum(1 for _ in (tmp_path / f"o{n}.csv").open()) == n + 1
    print(f"predict peak RSS: 1,000 rows {peaks[1_000]:.0f} MiB, 10,000 rows {peaks[10_000]:.0f} MiB")
    assert peaks[10_000] < peaks[1_000] + 20, peaks


@pytest.mark.parametrize("name", ["rows.csv", "rows.tsv.gz", "rows.jsonl.bz2", "rows.jsonl.zst", "rows.parquet",
                                  "rows.json"])
def test_streamed_records_are_read_records(name, tmp_path):
    """stream_records gives what read_records gives, line numbers included, in every format."""
    import bz2
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    from tunesmith.data.io import read_records, stream_records

    rows = [{"text": f"row {i}, with \"quotes\" and a comma", "label": str(i % 3)} for i in range(50)]
    path = tmp_path / name
    if name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        if ".csv" in name or ".tsv" in name:
            text = csv_text(rows, "\t" if ".tsv" in name else ",")
        elif ".jsonl" in name:
            text = "".join(json.dumps(r) + "\n\n" for r in rows)  # blank lines between: lines still count
        else:
            text = json.dumps({"data": rows}, indent=1)
        raw = text.encode()
        compress = {".gz": gzip.compress, ".bz2": bz2.compress, ".zst": zstandard.ZstdCompressor().compress}
        path.write_bytes(compress.get(path.suffix, lambda b: b)(raw))
    assert list(stream_records(path)) == read_records(path)


def csv_text(rows: list[dict], delimiter: str) -> str:
    import io

    out = io.StringIO()
    writer = csv.DictWriter(out, list(rows[0]), delimiter=delimiter, lineterminator="\n",
                            quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL, escapechar="\\")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def test_a_run_on_a_headerless_file_predicts_the_same_layout(tmp_path, tiny_model_dir):
    """Labels first, no header (the SMS Spam Collection's layout): the input is read by position, as the
    run was; a file of texts alone would have them in column 1, so the run's layout is kept."""
    rows = sms_rows()
    (tmp_path / "sms.tsv").write_text("".join(f"{label}\t{text}\n" for label, text in rows))
    data = {"path": str(tmp_path / "sms.tsv"), "header": False, "format": "classification",
            "columns": {"label": 1, "text": 2}, "instruction": "classify sentiment: {text}", "max_length": 64}
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, data, train={"max_steps": 2, "eval_every": 2})
    assert main(["train", str(config)]) == 0
    assert main(["predict", str(tmp_path / "run"), "--data", str(tmp_path / "sms.tsv"),
                 "--out", str(tmp_path / "p.jsonl")]) == 0
    out = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["input"] for r in out] == [text for _, text in rows] and [r["line"] for r in out] == list(range(1, 41))
    assert all(r["prediction"] in ("fresh", "rotten") for r in out)


def sms_rows() -> list[tuple[str, str]]:
    return [(r["sentiment"], r["review"]) for r in review_rows(40, seed=9)]
