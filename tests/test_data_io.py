"""read_records: every format and compression, starting lines, and the message of every error."""

import bz2
import gzip
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from tunesmith.data.io import MAX_PROBLEMS, read_records
from tunesmith.errors import TunesmithError

ROWS = [
    {"text": "a fine film", "label": "pos"},
    {"text": "dull, and long", "label": "neg"},
    {"text": 'she said "wow"', "label": "pos"},
]

COMPRESS = {
    "": lambda data: data,
    ".gz": gzip.compress,
    ".bz2": bz2.compress,
    ".zst": zstandard.ZstdCompressor().compress,
    ".zstd": zstandard.ZstdCompressor().compress,
}


def write(path, data: str | bytes):
    """Write ``data`` to ``path``, compressed as its last suffix says."""
    raw = data.encode() if isinstance(data, str) else data
    path.write_bytes(COMPRESS.get(path.suffix.lower(), COMPRESS[""])(raw))
    return path


def parquet_bytes(rows: list[dict]) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


# Each format holding ROWS, and the line where each row starts. The TSV quotes its third row as
# CSV would, so it is read with tsv_quoting on (which the other formats ignore).
FORMATS = {
    ".csv": ('text,label\na fine film,pos\n"dull, and long",neg\n"she said ""wow""",pos\n', [2, 3, 4]),
    ".tsv": ('text\tlabel\na fine film\tpos\ndull, and long\tneg\n"she said ""wow"""\tpos\n', [2, 3, 4]),
    ".jsonl": ("".join(json.dumps(row) + "\n" for row in ROWS), [1, 2, 3]),
    ".json": (json.dumps(ROWS, indent=2), [2, 6, 10]),
    ".parquet": (parquet_bytes(ROWS), [1, 2, 3]),
}


@pytest.mark.parametrize("compression", list(COMPRESS))
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_and_compression(tmp_path, fmt, compression):
    content, lines = FORMATS[fmt]
    path = write(tmp_path / f"train{fmt}{compression}", content)
    expected = [{**row, "_line": line} for row, line in zip(ROWS, lines)]
    assert read_records(path, tsv_quoting=True) == expected


@pytest.mark.parametrize("compression", list(COMPRESS))
def test_txt_gives_one_record_per_paragraph(tmp_path, compression):
    text = "First paragraph,\nstill the first.\n\n\n  \nSecond one.\n\nThird\n"
    path = write(tmp_path / f"corpus.txt{compression}", text)
    assert read_records(path) == [
        {"text": "First paragraph,\nstill the first.", "_line": 1},
        {"text": "Second one.", "_line": 6},
        {"text": "Third", "_line": 8},
    ]


def test_tsv_keeps_stray_quotes_by_default(tmp_path):
    # As in the UCI SMS Spam Collection: quotes are part of the messages, never quoting.
    messages = [
        '"Wen u miss someone, the person is definitely special for u..." gdeve..',
        'Ok lar... "Joking wif u oni',
        'He said ""no"" twice',
    ]
    path = write(tmp_path / "sms.tsv", "label\ttext\n" + "".join(f"ham\t{m}\n" for m in messages))
    assert read_records(path) == [
        {"label": "ham", "text": message, "_line": line} for line, message in enumerate(messages, 2)
    ]


def test_tsv_quoting_reads_quoted_fields(tmp_path):
    path = write(tmp_path / "t.tsv", 'text\tlabel\n"a\ttab"\tpos\n"two\nlines"\tneg\nplain "x"\tpos\n')
    assert read_records(path, tsv_quoting=True) == [
        {"text": "a\ttab", "label": "pos", "_line": 2},
        {"text": "two\nlines", "label": "neg", "_line": 3},
        {"text": 'plain "x"', "label": "pos", "_line": 5},
    ]


@pytest.mark.parametrize("name, sep", [("t.csv", ","), ("t.tsv", "\t"), ("t.csv.gz", ",")])
def test_without_header_columns_are_named_by_position(tmp_path, name, sep):
    path = write(tmp_path / name, f"ham{sep}see you soon\n\nspam{sep}WIN a prize\n")
    assert read_records(path, header=False) == [
        {"1": "ham", "2": "see you soon", "_line": 1},
        {"1": "spam", "2": "WIN a prize", "_line": 3},
    ]


def test_without_header_a_first_row_that_looks_like_a_header_is_data(tmp_path):
    path = write(tmp_path / "t.csv", "text,,text\na,b,c\n")
    assert read_records(path, header=False) == [
        {"1": "text", "2": "", "3": "text", "_line": 1},
        {"1": "a", "2": "b", "3": "c", "_line": 2},
    ]


@pytest.mark.parametrize("name, content", [
    ("t.jsonl", '{"text": "a"}\n'), ("t.txt", "a\n"), ("t.parquet", parquet_bytes([{"text": "a"}])),
])
def test_header_is_ignored_outside_csv_and_tsv(tmp_path, name, content):
    assert read_records(write(tmp_path / name, content), header=False) == [{"text": "a", "_line": 1}]


def test_csv_line_numbers_count_multiline_fields_and_blank_lines(tmp_path):
    path = write(tmp_path / "t.csv", 'text,label\n"two\nlines",a\n\nnext,b\n')
    assert read_records(path) == [
        {"text": "two\nlines", "label": "a", "_line": 2},
        {"text": "next", "label": "b", "_line": 5},
    ]


def test_csv_with_bom_crlf_and_spaced_header(tmp_path):
    path = write(tmp_path / "t.csv", "\ufefftext , label\r\nhello,1\r\n")
    assert read_records(path) == [{"text": "hello", "label": "1", "_line": 2}]


def test_csv_field_longer_than_the_csv_module_default_limit(tmp_path):
    long_text = "x" * 200_000
    assert read_records(write(tmp_path / "t.csv", f"text\n{long_text}\n"))[0]["text"] == long_text


def test_json_keeps_value_types(tmp_path):
    row = {"text": "hi", "score": 3, "ok": True, "tags": ["a"], "none": None}
    assert read_records(write(tmp_path / "t.jsonl", json.dumps(row)))[0] == {**row, "_line": 1}


def test_json_object_with_one_list_of_records(tmp_path):
    text = '{"version": 1,\n "tags": ["x"],\n "data": [\n  {"text": "a"},\n\n  {"text": "b"}]}'
    expected = [{"text": "a", "_line": 4}, {"text": "b", "_line": 6}]
    assert read_records(write(tmp_path / "t.json", text)) == expected


def test_jsonl_skips_blank_lines_and_counts_them(tmp_path):
    path = write(tmp_path / "t.jsonl", '{"text": "a"}\n\n{"text": "b"}\n')
    assert [row["_line"] for row in read_records(path)] == [1, 3]


def test_uppercase_suffix(tmp_path):
    assert read_records(write(tmp_path / "T.CSV.GZ", "text\nhi\n")) == [{"text": "hi", "_line": 2}]


def problems(path, **options) -> list[str]:
    with pytest.raises(TunesmithError) as error:
        read_records(path, **options)
    return error.value.problems


def test_missing_file(tmp_path):
    assert problems(tmp_path / "nope.csv") == [f"{tmp_path / 'nope.csv'}: file not found"]


def test_directory(tmp_path):
    (tmp_path / "d.csv").mkdir()
    assert problems(tmp_path / "d.csv") == [f"{tmp_path / 'd.csv'}: is a directory, expected a data file"]


@pytest.mark.parametrize("name", ["train.xlsx", "train", "train.csv.xz"])
def test_unsupported_type_lists_the_supported_ones(tmp_path, name):
    [message] = problems(write(tmp_path / name, "text\nhi\n"))
    assert message.startswith(f"{tmp_path / name}: unsupported file type")
    assert ".csv, .tsv, .json, .jsonl, .parquet, .txt" in message and ".gz, .bz2, .zst, .zstd" in message


@pytest.mark.parametrize("name, content", [
    ("e.csv", ""), ("e.jsonl", "\n \n"), ("e.txt.gz", ""), ("e.parquet", ""), ("e.json.zst", "  "),
])
def test_empty_file(tmp_path, name, content):
    assert problems(write(tmp_path / name, content)) == [f"{tmp_path / name}: file is empty"]


@pytest.mark.parametrize("name, content, message", [
    ("h.csv", "text,label\n", "no data rows below the header"),
    ("n.json", "[]", "no records found"),
    ("w.json", '{"data": []}', "no records found"),
    ("p.parquet", parquet_bytes([]), "no records found"),
])
def test_no_records(tmp_path, name, content, message):
    assert problems(write(tmp_path / name, content)) == [f"{tmp_path / name}: {message}"]


def test_malformed_jsonl_line(tmp_path):
    path = write(tmp_path / "train.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": "c" "label": 1}\n[1]\n')
    assert problems(path) == [
        f"{path}:3: malformed JSON (Expecting ',' delimiter)",
        f"{path}:4: expected a JSON object, found an array",
    ]


def test_many_bad_lines_are_capped(tmp_path):
    path = write(tmp_path / "t.jsonl", "oops\n" * 25)
    found = problems(path)
    assert len(found) == MAX_PROBLEMS + 1
    assert found[0] == f"{path}:1: malformed JSON (Expecting value)"
    assert found[-1] == f"{path}: ... and 15 more problems"


def test_csv_row_with_wrong_number_of_fields(tmp_path):
    path = write(tmp_path / "train.csv", 'text,label\n"multi\nline",pos\nok,neg,extra\nalone\n')
    assert problems(path) == [
        f"{path}:4: expected 2 fields as in the header, found 3",
        f"{path}:5: expected 2 fields as in the header, found 1",
    ]


def test_tsv_row_with_wrong_number_of_fields(tmp_path):
    path = write(tmp_path / "t.tsv", "text\tlabel\nfine\tpos\nno tab here\n")
    assert problems(path) == [f"{path}:3: expected 2 fields as in the header, found 1"]


@pytest.mark.parametrize("name, sep", [("t.csv", ","), ("t.tsv", "\t")])
def test_row_with_wrong_number_of_fields_without_header(tmp_path, name, sep):
    path = write(tmp_path / name, f"ham{sep}hello\nspam{sep}win\nno separator\nham{sep}ok{sep}extra\n")
    assert problems(path, header=False) == [
        f"{path}:3: expected 2 fields as in the first row, found 1",
        f"{path}:4: expected 2 fields as in the first row, found 3",
    ]


def test_csv_unclosed_quote(tmp_path):
    path = write(tmp_path / "t.csv", 'text,label\nfine,pos\n"never closed,neg\nmore,pos\n')
    assert problems(path) == [f"{path}:3: a quoted field starting in this row is never closed"]


def test_csv_text_after_closing_quote(tmp_path):
    path = write(tmp_path / "t.csv", 'text,label\n"quoted"tail,pos\n')
    assert problems(path) == [f"{path}:2: malformed CSV (',' expected after '\"')"]


def test_quoted_tsv_error_suggests_turning_quoting_off(tmp_path):
    path = write(tmp_path / "t.tsv", 'label\ttext\nham\tfine\nham\t"Wen u miss someone" gdeve..\n')
    assert problems(path, tsv_quoting=True) == [
        (f"{path}:3: malformed TSV ('\\t' expected after '\"'); "
         "if the quotes are part of the text, set data.tsv_quoting: false")
    ]


def test_quoted_tsv_unclosed_quote_suggests_turning_quoting_off(tmp_path):
    path = write(tmp_path / "t.tsv", 'label\ttext\nham\t"Joking wif u oni\nham\tok\n')
    assert problems(path, tsv_quoting=True) == [
        (f"{path}:2: a quoted field starting in this row is never closed; "
         "if the quotes are part of the text, set data.tsv_quoting: false")
    ]


def test_csv_header_problems_reported_together(tmp_path):
    path = write(tmp_path / "t.csv", "text,,label,text\na,b,c,d\n")
    assert problems(path) == [
        f"{path}:1: column 2 of the header has no name",
        f"{path}:1: duplicate column names in the header: text",
    ]


def test_malformed_json_names_the_line(tmp_path):
    path = write(tmp_path / "t.json", '[\n  {"text": "a"},\n  {"text": }\n]')
    assert problems(path) == [f"{path}:3: malformed JSON (Expecting value)"]


@pytest.mark.parametrize("content, expected", [
    ('"just text"', "expected a list of records, found a string"),
    ('{"a": [{"x": 1}], "b": [{"x": 2}]}', "fields a, b all hold one"),
    ('{"meta": {"n": 1}}', "fields found: meta"),
])
def test_json_without_one_list_of_records(tmp_path, content, expected):
    [message] = problems(write(tmp_path / "t.json", content))
    assert message.startswith(f"{tmp_path / 't.json'}: ") and message.endswith(expected)


def test_json_record_that_is_not_an_object(tmp_path):
    path = write(tmp_path / "t.json", '[\n  {"text": "a"},\n  "b"\n]')
    assert problems(path) == [f"{path}:3: expected a JSON object, found a string"]


def test_invalid_utf8_names_the_line(tmp_path):
    path = write(tmp_path / "t.csv", b"text\nfine\ncaf\xe9\n")
    assert problems(path) == [f"{path}:3: not valid UTF-8 (byte 0xe9); save the file as UTF-8"]


@pytest.mark.parametrize("name", ["t.csv.gz", "t.jsonl.bz2", "t.txt.zst"])
def test_corrupt_compressed_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"this is not compressed")
    [message] = problems(path)
    assert message.startswith(f"{path}: cannot decompress as {path.suffix} (")


def test_corrupt_parquet(tmp_path):
    [message] = problems(write(tmp_path / "t.parquet", b"PAR1 but not really"))
    assert message.startswith(f"{tmp_path / 't.parquet'}: not a valid Parquet file (")
