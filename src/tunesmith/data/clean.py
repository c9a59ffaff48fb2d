"""Normalise text fields and drop records that are empty, too short, too long or duplicated."""

import json
import re
import unicodedata
from collections import Counter

from tunesmith.data.io import location, raise_problems

# Unicode spaces (no-break, en/em, ideographic...) look like a space but tokenize differently.
_HORIZONTAL_SPACE = re.compile(r"[ \t\f\v\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]+")
# Invisible characters that carry no meaning in text. ZWJ and ZWNJ (U+200C/D) are kept: emoji
# sequences and scripts such as Persian and Hindi need them.
_INVISIBLE = re.compile("[\u200b\u2060\ufeff]")
_LINE_BREAK = re.compile("\r\n|[\r\u2028\u2029]")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    """Return ``text`` in a canonical form that keeps its meaning and its paragraph breaks.

    Applies Unicode NFC (NFKC would also rewrite ligatures, full-width letters and superscripts,
    which changes content), turns Unicode spaces into plain spaces and removes zero-width spaces,
    collapses runs of spaces and tabs to one space, strips both ends of every line, keeps at most
    one blank line in a row and strips the whole text. Leading indentation is lost too, so code
    and verse come out flush left.
    """
    text = unicodedata.normalize("NFC", text)
    text = _LINE_BREAK.sub("\n", text)
    text = _INVISIBLE.sub("", text)
    text = _HORIZONTAL_SPACE.sub(" ", text)
    text = "\n".join(line.strip(" ") for line in text.split("\n"))
    text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


def clean_records(
    records: list[dict],
    text_fields: list[str],
    min_chars: int | None = None,
    max_chars: int | None = None,
    *,
    source: str | None = None,
) -> tuple[list[dict], Counter]:
    """Normalise the text fields of ``records`` and drop the records unfit for training.

    A text field holds a string (numbers and booleans are turned into strings) or a list of chat
    messages ``{"role": ..., "content": ...}``, whose contents are normalised. A record is dropped,
    checking in this order, when a text field is missing or empty after normalisation (a chat
    counts as empty if it has no messages or any message has empty content): ``"empty"``; when the
    characters of all its text fields together number fewer than ``min_chars``: ``"too_short"``, or
    more than ``max_chars``: ``"too_long"``; when its text fields (and ``"label"``, if it has one)
    equal those of an earlier kept record: ``"duplicate"``.

    Records are copied, never changed in place; kept ones keep their order and their other fields,
    ``"_line"`` included. ``source`` (the file name) prefixes error messages.

    Returns:
        The kept records and a Counter of drop reasons.

    Raises:
        TunesmithError: a text field holds something that is neither text nor chat messages.
    """
    kept, dropped, seen = [], Counter(), set()
    problems = []
    for record in records:
        record = dict(record)
        try:
            for field in text_fields:
                if field in record:
                    record[field] = _normalize_field(record[field])
        except ValueError as error:
            problems.append(f"{location(source, record)}: field '{field}' {error}")
            continue
        reason = _drop_reason(record, text_fields, min_chars, max_chars, seen)
        if reason:
            dropped[reason] += 1
        else:
            kept.append(record)
    raise_problems(problems, source)
    return kept, dropped


def _normalize_field(value: object) -> object:
    if value is None or isinstance(value, str):
        return normalize_text(value) if value else value
    if isinstance(value, (bool, int, float)):
        return normalize_text(str(value))
    if isinstance(value, list) and all(isinstance(message, dict) for message in value):
        messages = []
        for message in value:
            content = message.get("content")
            if content is not None and not isinstance(content, str):
                raise ValueError(f"has a message whose content is {type(content).__name__}, expected text")
            messages.append({**message, "content": normalize_text(content or "")})
        return messages
    raise ValueError(f"holds {type(value).__name__}, expected text or a list of chat messages")


def _drop_reason(
    record: dict, text_fields: list[str], min_chars: int | None, max_chars: int | None, seen: set[str]
) -> str | None:
    texts = []
    for field in text_fields:
        value = record.get(field)
        if isinstance(value, list):
            contents = [message["content"] for message in value]
            if not contents or not all(contents):
                return "empty"
            texts += contents
        elif not value:
            return "empty"
        else:
            texts.append(value)

    chars = sum(len(text) for text in texts)
    if min_chars is not None and chars < min_chars:
        return "too_short"
    if max_chars is not None and chars > max_chars:
        return "too_long"

    compared = [record[field] for field in text_fields] + ([record["label"]] if "label" in record else [])
    # JSON gives a hashable, exact fingerprint even for chat message lists and list-valued labels.
    fingerprint = json.dumps(compared, ensure_ascii=False, sort_keys=True, default=str)
    if fingerprint in seen:
        return "duplicate"
    seen.add(fingerprint)
    return None

