"""A file shaped like the UCI SMS Spam Collection: ``label<TAB>message``, no header, stray quotes.

Issue 8: read as it is, the first message became the header, and with quoting on the messages
that hold quotes could not be read at all.
"""

from __future__ import annotations

import random

import pytest

from conftest import write_config
from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.data.pipeline import load_splits

WORDS = {
    "ham": "ok lar see u later home tonight dinner mum class sorry call wat time going da bus late "
           "tomorrow lunch movie sleep gym office meet coffee early weekend k haha pick".split(),
    "spam": "WINNER FREE prize claim cash txt STOP now urgent call 08001234 award mobile reply "
            "guaranteed ringtone voucher offer entry draw week apply selected bonus code".split(),
}
# The quotes in the real file: opening a message and closed mid-way, never closed, doubled.
QUOTED = ['"Wen u miss someone, {}" gdeve..', 'Ok "{} wif u oni', 'he said ""{}"" lol']


def sms_lines(n: int = 60) -> list[str]:
    rng = random.Random(0)
    lines = []
    for i in range(n):
        label = "spam" if i % 4 == 3 else "ham"
        message = " ".join(rng.sample(WORDS[label], 6))
        if i % 5 == 0:
            message = QUOTED[i // 5 % len(QUOTED)].format(message)
        lines.append(f"{label}\t{message}")
    return lines


def sms_config(tmp_path, tiny_model_dir, **data):
    (tmp_path / "spam.tsv").write_text("".join(line + "\n" for line in sms_lines()))
    section = {"path": "spam.tsv", "header": False, "format": "classification",
               "columns": {"label": 1, "text": 2}, **data}
    return write_config(tmp_path / "c.yaml", tiny_model_dir, section)


def test_data_inspect_reads_every_row_of_an_sms_file(tmp_path, tiny_model_dir, capsys):
    assert main(["data", "inspect", str(sms_config(tmp_path, tiny_model_dir))]) == 0
    out = capsys.readouterr().out
    assert "columns: text=2, label=1" in out and "rows read: 60" in out and "rows dropped: none" in out
    [kept] = [line for line in out.splitlines() if line.startswith("rows kept: ")]
    counts = dict(part.split() for part in kept.removeprefix("rows kept: ").split(", "))
    assert set(counts) == {"train", "validation", "test"} and sum(map(int, counts.values())) == 60
    [labels] = [line for line in out.splitlines() if line.startswith("labels train: ")]
    assert "ham " in labels and "spam " in labels


def test_quotes_in_messages_are_kept(tmp_path, tiny_model_dir):
    config = load_config(sms_config(tmp_path, tiny_model_dir))
    splits, _, _ = load_splits(config.data)
    inputs = {e["_input"] for split in splits.values() for e in split}
    assert any(text.startswith('"Wen u miss someone, ') and text.endswith('" gdeve..') for text in inputs)
    assert any('""' in text for text in inputs)


def test_quoting_on_names_the_line_and_the_way_out(tmp_path, tiny_model_dir, capsys):
    config = sms_config(tmp_path, tiny_model_dir, tsv_quoting=True)
    assert main(["data", "inspect", str(config)]) == 2
    err = capsys.readouterr().err
    # The first message, on line 1, opens with a quote closed mid-way.
    assert "spam.tsv:1: malformed TSV ('\\t' expected after '\"')" in err
    assert "data.tsv_quoting: false" in err and "Traceback" not in err


def test_positional_columns_without_header_false_say_how():
    from tunesmith.data.format import detect_schema
    from tunesmith.errors import TunesmithError

    records = [{"ham": "spam", "Go until jurong point": "Free entry", "_line": 2}]
    with pytest.raises(TunesmithError, match="named by position .* with data.header: false"):
        detect_schema(records, "spam.tsv", "classification", {"label": "1", "text": "2"})
