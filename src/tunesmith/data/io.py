"""Read a data file of any supported format and compression into a list of records (dicts).

Every record carries ``"_line"``: the 1-based line where it starts in the file, as an editor shows
it, so that later steps can point the user at the exact place of a problem. For Parquet, which has
no lines, it is the 1-based row number.
"""

import bz2
import csv
import gzip
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from tunesmith.errors import TunesmithError

FORMATS = (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".txt")
COMPRESSIONS = (".gz", ".bz2", ".zst", ".zstd")

# A file with thousands of bad rows should not flood the terminal; the first few locate the problem.
MAX_PROBLEMS = 10

# Pre-training texts can be far longer than the csv module's default field limit of 128 KiB.
_CSV_FIELD_LIMIT = 2**31 - 1

_JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")


def read_records(path: str | Path, header: bool = True, tsv_quoting: bool = False) -> list[dict]:
    """Read every record of a data file, each with its starting line under ``"_line"``.

    Supported formats, told apart by suffix: ``.csv`` and ``.tsv`` (values stay strings),
    ``.jsonl`` (one JSON object per line), ``.json`` (a list of objects, or an object with exactly
    one field holding a list of objects, such as ``{"data": [...]}``), ``.parquet`` and ``.txt``. A
    ``.txt`` file gives one record ``{"text": paragraph}`` per block of lines separated by blank
    lines, which suits continued pre-training on plain prose. Any of them may be compressed with
    ``.gz``, ``.bz2`` or ``.zst``/``.zstd`` on top, as in ``train.csv.bz2``. Text files must be
    UTF-8 (a byte-order mark is allowed). A ``"_line"`` field in the data itself is overwritten.

    Args:
        path: the data file.
        header: CSV/TSV only: the first row names the columns. When false every row is data and
            the columns are named by position, ``"1"``, ``"2"``, ...
        tsv_quoting: TSV only: double quotes quote fields, as in CSV. When false (the default) a
            quote is an ordinary character, kept in the text. CSV is always read with quoting.

    Raises:
        TunesmithError: the file is missing, empty, of an unsupported type, or malformed; every
            message names the file and, where there is one, the line.
    """
    path = Path(path)
    if not path.exists():
        raise TunesmithError(f"{path}: file not found")
    if path.is_dir():
        raise TunesmithError(f"{path}: is a directory, expected a data file")
    fmt, compression = _detect_format(path)

    raw = _decompress(path, path.read_bytes(), compression)
    if not raw:
        raise TunesmithError(f"{path}: file is empty")
    if fmt == ".parquet":
        records = _parse_parquet(path, raw)
    else:
        text = _decode(path, raw)
        if not text.strip():
            raise TunesmithError(f"{path}: file is empty")
        if fmt in _DELIMITERS:
            quoting = fmt == ".csv" or tsv_quoting
            records = _parse_delimited(path, text, _DELIMITERS[fmt], quoting, header)
        else:
            records = _TEXT_PARSERS[fmt](path, text)
    if not records:
        raise TunesmithError(f"{path}: no records found")
    return records


@dataclass(frozen=True)
class Problem:
    """A row that cannot be read, in place of its record: where it starts and what is wrong."""

    line: int
    text: str


def stream_records(path: str | Path, header: bool = True, tsv_quoting: bool = False) -> Iterator[dict | Problem]:
    """The records of a data file one at a time, as ``read_records`` reads them, with a ``Problem`` in
    place of each row that cannot be read (``tunesmith predict`` reports those and goes on).

    CSV, TSV and JSONL (compressed or not) and plain Parquet are read as they stream, so a large file
    never sits in memory; JSON, text and compressed Parquet are read whole first.

    Raises:
        TunesmithError: the file is missing, of an unsupported type, or not UTF-8.
    """
    path = Path(path)
    if not path.is_file():
        raise TunesmithError(f"{path}: file not found" if not path.exists() else f"{path}: is not a file")
    fmt, compression = _detect_format(path)
    if fmt == ".parquet" and compression is None:
        yield from _stream_parquet(path)
    elif fmt in _DELIMITERS or fmt == ".jsonl":
        try:
            with _open_text(path, compression) as stream:
                if fmt == ".jsonl":
                    yield from _jsonl(path, (line.rstrip("\n") for line in stream))
                else:
                    yield from _delimited(path, stream, _DELIMITERS[fmt], fmt == ".csv" or tsv_quoting, header)
        except UnicodeDecodeError:
            raise TunesmithError(f"{path}: not valid UTF-8; save the file as UTF-8") from None
        except (OSError, EOFError, zstandard.ZstdError) as error:
            raise TunesmithError(f"{path}: cannot read as {compression or fmt} ({error})") from None
    else:
        yield from read_records(path, header, tsv_quoting)


def _open_text(path: Path, compression: str | None):
    raw = {".gz": gzip.open, ".bz2": bz2.open}.get(compression, open)(path, "rb")
    if compression in (".zst", ".zstd"):
        raw = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
    # newline=None: Windows line ends are read as "\n", as read_records reads them.
    return io.TextIOWrapper(raw, encoding="utf-8-sig", newline=None)


PARQUET_BATCH_ROWS = 1024


def _stream_parquet(path: Path) -> Iterator[dict]:
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS)
        number = 0
        for batch in batches:
            for row in batch.to_pylist():
                number += 1
                yield {**row, "_line": number}
    except (pa.ArrowException, OSError) as error:
        raise TunesmithError(f"{path}: not a valid Parquet file ({error})") from None


def location(source: str | Path | None, record: dict) -> str:
    """Where ``record`` came from, for messages: ``file:line``, or ``line N`` when the file is unknown."""
    line = record.get("_line")
    if line is None:
        return str(source) if source else "record"
    return f"{source}:{line}" if source else f"line {line}"


def raise_problems(problems: list[str], source: str | Path | None = None) -> None:
    """Raise a TunesmithError holding ``problems`` (at most MAX_PROBLEMS of them), if there are any."""
    if len(problems) > MAX_PROBLEMS:
        more = f"... and {len(problems) - MAX_PROBLEMS} more problems"
        problems = problems[:MAX_PROBLEMS] + [f"{source}: {more}" if source else more]
    if problems:
        raise TunesmithError(*problems)


def _detect_format(path: Path) -> tuple[str, str | None]:
    suffixes = [suffix.lower() for suffix in path.suffixes]
    compression = suffixes.pop() if suffixes and suffixes[-1] in COMPRESSIONS else None
    fmt = suffixes[-1] if suffixes else ""
    if fmt not in FORMATS:
        shown = "".join(path.suffixes) or "no suffix"
        raise TunesmithError(
            f"{path}: unsupported file type ({shown}); supported: {', '.join(FORMATS)}, "
            f"optionally compressed as {', '.join(COMPRESSIONS)} (e.g. train.jsonl.gz)"
        )
    return fmt, compression


def _decompress(path: Path, raw: bytes, compression: str | None) -> bytes:
    try:
        if compression == ".gz":
            return gzip.decompress(raw)
        if compression == ".bz2":
            return bz2.decompress(raw)
        if compression in (".zst", ".zstd"):
            # A stream reader also handles frames written without a content size (streaming
            # compressors) and files made of several concatenated frames.
            reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw), read_across_frames=True)
            return reader.read()
    except (OSError, EOFError, ValueError, zstandard.ZstdError) as error:
        raise TunesmithError(f"{path}: cannot decompress as {compression} ({error})") from None
    return raw


def _decode(path: Path, raw: bytes) -> str:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise TunesmithError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{raw[error.start]:02x}); save the file as UTF-8"
        ) from None
    # Windows line endings would otherwise leave a stray "\r" at the end of every text.
    return text.replace("\r\n", "\n")


def _collect(path: Path, items) -> list[dict]:
    """The records of ``items``; every ``Problem`` among them raised at once."""
    records, problems = [], []
    for item in items:
        if isinstance(item, Problem):
            problems.append(item.text)
        else:
            records.append(item)
    raise_problems(problems, path)
    return records


def _parse_delimited(path: Path, text: str, delimiter: str, quoting: bool, header: bool) -> list[dict]:
    records = _collect(path, _delimited(path, io.StringIO(text, newline=""), delimiter, quoting, header))
    if not records and header:
        raise TunesmithError(f"{path}: no data rows below the header")
    return records


def _delimited(path: Path, stream, delimiter: str, quoting: bool, header: bool):
    """Each record of a CSV/TSV text stream, or a ``Problem`` where a row cannot be read; a malformed
    quote ends the stream (the rest of the file cannot be told apart)."""
    csv.field_size_limit(_CSV_FIELD_LIMIT)
    kind = "TSV" if delimiter == "\t" else "CSV"
    # strict: an unclosed quote must be an error, not a field that silently swallows the rest of the file.
    reader = csv.reader(stream, delimiter=delimiter, strict=True,
                        quoting=csv.QUOTE_MINIMAL if quoting else csv.QUOTE_NONE)
    names: list[str] | None = None
    row_start = 1
    try:
        for row in reader:
            line, row_start = row_start, reader.line_num + 1
            if not row:
                continue
            if names is None and header:
                # Stray spaces around column names would make "no column 'text'" errors baffling.
                names = [name.strip() for name in row]
                for problem in _header_problems(path, line, names):
                    yield Problem(line, problem)
                continue
            if names is None:
                names = [str(i) for i in range(1, len(row) + 1)]
            if len(row) != len(names):
                first = "the header" if header else "the first row"
                yield Problem(line, f"{path}:{line}: expected {len(names)} fields as in {first}, found {len(row)}")
                continue
            yield {**dict(zip(names, row)), "_line": line}
    except csv.Error as error:
        # TSV is quoted only on request, and then a failure most often means a text holding a stray
        # quote, which reading the file unquoted keeps as it is.
        hint = ""
        if kind == "TSV" and quoting:
            hint = "; if the quotes are part of the text, set data.tsv_quoting: false"
        if "unexpected end of data" in str(error):
            yield Problem(row_start, f"{path}:{row_start}: a quoted field starting in this row is never closed{hint}")
        else:
            # The csv module names the delimiter itself; a raw tab would read as blank space.
            reason = str(error).replace("\t", "\\t")
            yield Problem(reader.line_num, f"{path}:{reader.line_num}: malformed {kind} ({reason}){hint}")


def _header_problems(path: Path, line: int, header: list[str]) -> list[str]:
    problems = [
        f"{path}:{line}: column {i} of the header has no name" for i, name in enumerate(header, 1) if not name
    ]
    duplicates = sorted({name for name in header if name and header.count(name) > 1})
    if duplicates:
        problems.append(f"{path}:{line}: duplicate column names in the header: {', '.join(duplicates)}")
    return problems


def _parse_jsonl(path: Path, text: str) -> list[dict]:
    # Split on "\n" only: str.splitlines would also split on characters such as U+2028 that JSON
    # strings may contain raw, and line numbers would drift from what an editor shows.
    return _collect(path, _jsonl(path, text.split("\n")))


def _jsonl(path: Path, lines):
    """Each record of JSONL ``lines`` (without their line ends), or a ``Problem`` where a line is not an object."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            yield Problem(number, f"{path}:{number}: malformed JSON ({error.msg})")
            continue
        if not isinstance(value, dict):
            yield Problem(number, f"{path}:{number}: expected a JSON object, found {_json_type(value)}")
            continue
        value["_line"] = number
        yield value


def _parse_json(path: Path, text: str) -> list[dict]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise TunesmithError(f"{path}:{error.lineno}: malformed JSON ({error.msg})") from None

    if isinstance(data, list):
        field, items = None, data
    elif isinstance(data, dict):
        field = _records_field(path, data)
        items = data[field]
    else:
        raise TunesmithError(f"{path}: expected a list of records, found {_json_type(data)}")

    lines = _json_record_lines(text, field)
    problems = [
        f"{path}:{line}: expected a JSON object, found {_json_type(item)}"
        for item, line in zip(items, lines)
        if not isinstance(item, dict)
    ]
    raise_problems(problems, path)
    return [{**item, "_line": line} for item, line in zip(items, lines)]


def _records_field(path: Path, data: dict) -> str:
    """The one field of a top-level JSON object that holds the records."""
    lists = [key for key, value in data.items() if isinstance(value, list)]
    record_lists = [key for key in lists if data[key] and all(isinstance(item, dict) for item in data[key])]
    if len(record_lists) == 1:
        return record_lists[0]
    if not record_lists and len(lists) == 1:
        # A lone list that is empty or holds non-objects is taken as the records, so that the user
        # hears "no records found" or which element is wrong rather than a vaguer error.
        return lists[0]
    if record_lists:
        found = f"fields {', '.join(record_lists)} all hold one"
    else:
        found = f"fields found: {', '.join(data) or 'none'}"
    raise TunesmithError(
        f"{path}: expected a list of records, or an object with exactly one field holding "
        f'a list of records (like {{"data": [...]}}); {found}'
    )


def _json_record_lines(text: str, field: str | None) -> list[int]:
    """Line where each element of the records array starts, found by walking the (valid) JSON text.

    json.loads keeps no positions, so the array (top level, or the value of ``field``) is walked
    element by element with raw_decode, which reports where each element ends.
    """
    decoder = json.JSONDecoder()

    def skip(pos: int) -> int:
        return _JSON_WHITESPACE.match(text, pos).end()

    pos = skip(0)
    if field is not None:
        pos, array_pos = skip(pos + 1), None
        while text[pos] != "}":
            key, pos = decoder.raw_decode(text, pos)
            pos = skip(skip(pos) + 1)  # past the ":"
            if key == field:
                array_pos = pos  # keep the last one: json.loads also lets a repeated key win
            _, pos = decoder.raw_decode(text, pos)
            pos = skip(pos)
            if text[pos] == ",":
                pos = skip(pos + 1)
        pos = array_pos

    starts = []
    pos = skip(pos + 1)
    while text[pos] != "]":
        starts.append(pos)
        _, pos = decoder.raw_decode(text, pos)
        pos = skip(pos)
        if text[pos] == ",":
            pos = skip(pos + 1)

    lines, line, previous = [], 1, 0
    for start in starts:
        line += text.count("\n", previous, start)
        lines.append(line)
        previous = start
    return lines


def _json_type(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    names = {dict: "an object", list: "an array", str: "a string", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _parse_parquet(path: Path, raw: bytes) -> list[dict]:
    try:
        table = pq.read_table(pa.BufferReader(raw))
    except (pa.ArrowException, OSError) as error:
        raise TunesmithError(f"{path}: not a valid Parquet file ({error})") from None
    return [{**row, "_line": number} for number, row in enumerate(table.to_pylist(), 1)]


def _parse_txt(path: Path, text: str) -> list[dict]:
    records, paragraph, start = [], [], 0
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            if not paragraph:
                start = number
            paragraph.append(line)
        elif paragraph:
            records.append({"text": "\n".join(paragraph), "_line": start})
            paragraph = []
    if paragraph:
        records.append({"text": "\n".join(paragraph), "_line": start})
    return records


_DELIMITERS = {".csv": ",", ".tsv": "\t"}

_TEXT_PARSERS = {
    ".json": _parse_json,
    ".jsonl": _parse_jsonl,
    ".txt": _parse_txt,
}
