"""Find personal data in training text, and redact it, drop its rows or only count it (``data.pii``).

Each detector is a regular expression for the shape of one kind of identifier, followed by the
check that the format itself carries where it has one: Luhn for payment cards, mod 97 for IBANs,
the mod-23 letter of a Spanish DNI, the Verhoeff digit of an Aadhaar number, the issuing rules of
US Social Security numbers, and the standard library's parser for IPv6. Shapes without a check
(phone numbers, e-mail addresses) are written to leave out the numbers that prose is full of:
years, dates, prices, scores, ISBNs. Person names need a named-entity model: they are found only
where Presidio and a spaCy model are installed (``pip install tunesmith[pii-ner]``).

Where two detections overlap, the kind earlier in ``KINDS`` wins, then the longer span: a URL's
``user:password@host`` is not also an e-mail address, and a checked card number is not a phone.
tests/test_pii.py holds the labelled cases behind the precision and recall in docs/privacy.md.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from tunesmith.data.io import location

# In order of precedence when detections overlap.
KINDS = ("url_credentials", "email", "iban", "card", "id", "ip", "phone", "name")
PLACEHOLDERS = {
    "url_credentials": "<URL_CREDENTIALS>", "email": "<EMAIL>", "iban": "<IBAN>", "card": "<CARD>",
    "id": "<ID>", "ip": "<IP>", "phone": "<PHONE>", "name": "<NAME>",
}
NAMES_NOT_CHECKED = "not checked (install tunesmith[pii-ner])"
MAX_WHERE = 10  # locations listed in the statistics: enough to find the rows, not a second copy


@dataclass(frozen=True)
class Match:
    kind: str
    start: int
    end: int


Spans = Iterator[tuple[int, int]]

# Numbers are not read out of a longer run of digit groups (an account number, a tracking number):
# a match may neither follow nor precede a digit across one separator.
_ALONE_BEFORE = r"(?<!\d[ .-])"
_ALONE_AFTER = r"(?![ .-]\d)"

# --- e-mail ------------------------------------------------------------------------------------

_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+([A-Za-z]{2,24})"
    r"(?![\w-]|\.[A-Za-z0-9])"
)
# Retina image names (icon@2x.png) have the shape of an address; no real top-level domain is a
# file extension of this list.
_FILE_EXTENSIONS = {"png", "jpg", "jpeg", "gif", "svg", "webp", "bmp", "ico", "pdf", "txt", "html",
                    "htm", "css", "js", "json", "xml", "csv"}


def _emails(text: str) -> Spans:
    for m in _EMAIL.finditer(text):
        if m.group(1).lower() not in _FILE_EXTENSIONS:
            yield m.span()


# --- URLs with credentials ----------------------------------------------------------------------

_URL_CREDENTIALS = re.compile(r"(?<![\w+.-])[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*:[^\s/@]+@[^\s/?#@]+[^\s<>\"']*")


def _url_credentials(text: str) -> Spans:
    for m in _URL_CREDENTIALS.finditer(text):
        yield m.start(), m.start() + len(m.group().rstrip(".,;:!?)'\""))


# --- phone numbers ------------------------------------------------------------------------------

_SEP = r"[ .-]"
_PHONE = re.compile(
    rf"""(?<![\w+/.,:-]){_ALONE_BEFORE}
    (?:
        # +44 20 7946 0958, 0049 30 1234567, +1 (202) 555-0143, +44 (0)20 7946 0958: after the
        # country code one group of any length (an area code such as Paris's 1), then groups of 2+.
        (?:\+|00)[1-9]\d{{0,2}}(?:{_SEP}?\(0\))?{_SEP}?(?:\(\d{{1,4}}\)|\d{{1,5}})(?:{_SEP}?\d{{2,5}}){{1,5}}
        # (555) 123-4567, (020) 7946 0958
      | \(\d{{2,5}}\){_SEP}?\d{{2,4}}(?:{_SEP}?\d{{2,4}}){{1,2}}
        # 555-123-4567, 1-800-555-0199
      | (?:1{_SEP})?\d{{3}}{_SEP}\d{{3}}{_SEP}\d{{4}}
        # national numbers with a trunk 0: 020 7946 0958, 07700 900123, 030 1234567
      | 0\d{{1,4}}{_SEP}\d{{2,4}}(?:{_SEP}?\d{{2,4}}){{1,3}}
    )
    (?![\w-]|[.,:/]\d)""",
    re.VERBOSE,
)
_DIGIT_GROUPS = re.compile(r"\d+")


def _is_date(groups: list[str]) -> bool:
    """31.12.2024, 01-02-2023, 2024-01-15: three groups that read as day, month and year."""
    if len(groups) != 3:
        return False
    if len(groups[0]) == 4:
        groups = groups[::-1]
    a, b, year = (int(g) for g in groups)
    if len(groups[2]) != 4 or not 1900 <= year <= 2099:
        return False
    return (1 <= a <= 31 and 1 <= b <= 12) or (1 <= a <= 12 and 1 <= b <= 31)


def _phones(text: str) -> Spans:
    for m in _PHONE.finditer(text):
        number = m.group().replace("(0)", "")
        groups = _DIGIT_GROUPS.findall(number)
        digits = sum(len(g) for g in groups)
        international = number[0] == "+" or number.startswith("00")
        # ddd-dd-dddd is the shape of a US Social Security number, valid or not.
        ssn_shaped = re.fullmatch(r"\d{3}-\d{2}-\d{4}", number)
        if (8 if international else 7) <= digits <= 15 and not _is_date(groups) and not ssn_shaped:
            yield m.span()


# --- payment cards ------------------------------------------------------------------------------

# Unbroken, or grouped as printed: 4-4-4-4 (most brands), 4-6-5 (Amex), 4-6-4 (Diners).
_CARD = re.compile(
    rf"(?<![\w-]){_ALONE_BEFORE}(?:\d{{13,19}}|\d{{4}}([ -])\d{{4}}\1\d{{4}}\1\d{{4}}|\d{{4}}([ -])\d{{6}}\2\d{{4,5}})"
    rf"(?![\w-]|[.,]\d){_ALONE_AFTER}"
)


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _card_prefix(digits: str) -> bool:
    """Issuer prefixes: Visa 4; Mastercard 51-55 and 2221-2720; Maestro 50, 56-58; Amex 34, 37;
    Diners 30, 36, 38, 39; JCB 35; Discover, UnionPay and others 6. Nothing else starts a card number,
    which keeps ISBN-13s (978, 979) and timestamps out."""
    if digits[0] in "46":
        return True
    if digits[0] == "5":
        return digits[1] != "9"
    if digits[0] == "3":
        return digits[1] in "0456789"
    return digits[0] == "2" and 2221 <= int(digits[:4]) <= 2720


def _cards(text: str) -> Spans:
    for m in _CARD.finditer(text):
        digits = re.sub(r"[ -]", "", m.group())
        if _card_prefix(digits) and luhn_valid(digits):
            yield m.span()


# --- IBAN ---------------------------------------------------------------------------------------

# Length of the IBAN (without spaces) per country, from the SWIFT IBAN registry.
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27,
    "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25,
    "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18,
    "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33,
    "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28,
    "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}
_IBAN_START = re.compile(r"(?<![A-Za-z0-9])([A-Z]{2})\d{2}")


def iban_valid(iban: str) -> bool:
    """ISO 13616: the country code and check digits moved to the end, letters as 10-35, mod 97 is 1."""
    moved = iban[4:] + iban[:4]
    return int("".join(str(int(ch, 36)) for ch in moved)) % 97 == 1


def _ibans(text: str) -> Spans:
    # The country's length says where the IBAN ends, so a printed one (groups of four, one space
    # between) is read exactly, never running on into the next word.
    for m in _IBAN_START.finditer(text):
        length = IBAN_LENGTHS.get(m.group(1))
        if length is None:
            continue
        compact, i = m.group(), m.end()
        while len(compact) < length and i < len(text):
            if text[i] == " " and len(compact) % 4 == 0 and i + 1 < len(text) and text[i + 1].isalnum():
                i += 1
            if not ("A" <= text[i] <= "Z" or "0" <= text[i] <= "9"):
                break
            compact += text[i]
            i += 1
        if len(compact) == length and not (i < len(text) and text[i].isalnum()) and iban_valid(compact):
            yield m.start(), i


# --- IP addresses -------------------------------------------------------------------------------

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?:\.\d{1,3}){0,3}(?:%[A-Za-z0-9]+)?(?![\w:])")


def _ips(text: str) -> Spans:
    for m in _IPV4.finditer(text):
        yield m.span()
    for m in _IPV6.finditer(text):
        candidate = m.group()
        try:
            ipaddress.IPv6Address(candidate)
        except ValueError:
            continue
        # Addresses of one or two groups (::1, fe80::1) are loopback or link-local, and read like
        # code (a[1::2]); an embedded IPv4 address counts as two groups.
        address = candidate.split("%")[0]
        groups = [g for g in address.split(":") if g]
        if len(groups) + ("." in address) >= 3:
            yield m.span()


# --- national identity numbers ------------------------------------------------------------------

# US Social Security numbers: never area 000, 666 or 9xx, group 00 or serial 0000, nor the two
# numbers that were printed in advertisements and then retired.
_SSN = re.compile(rf"(?<![\w-]){_ALONE_BEFORE}(?!000|666|9\d\d)\d{{3}}([- ])(?!00)\d{{2}}\1(?!0000)\d{{4}}(?![\w-]){_ALONE_AFTER}")
_RETIRED_SSNS = {"078051120", "219099999"}
# UK National Insurance numbers: HMRC's allowed prefix letters, never BG, GB, KN, NK, NT, TN, ZZ.
_UK_NINO = re.compile(
    r"(?<![\w])(?!BG|GB|KN|NK|NT|TN|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D](?!\w)"
)
# Spanish DNI (8 digits) and NIE (X, Y or Z and 7 digits), each with its mod-23 control letter.
_ES_ID = re.compile(r"(?<![\w-])([XYZ]\d{7}|\d{8})-?([A-Z])(?!\w)")
_ES_LETTERS = "TRWAGMYFPDXBNJZSQVHLCKE"
# Indian Aadhaar numbers as printed (4-4-4, never starting with 0 or 1), with a Verhoeff check digit.
_AADHAAR = re.compile(rf"(?<![\w-]){_ALONE_BEFORE}[2-9]\d{{3}} \d{{4}} \d{{4}}(?![\w-]){_ALONE_AFTER}")
_VERHOEFF_D = [
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 0, 6, 7, 8, 9, 5], [2, 3, 4, 0, 1, 7, 8, 9, 5, 6],
    [3, 4, 0, 1, 2, 8, 9, 5, 6, 7], [4, 0, 1, 2, 3, 9, 5, 6, 7, 8], [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
    [6, 5, 9, 8, 7, 1, 0, 4, 3, 2], [7, 6, 5, 9, 8, 2, 1, 0, 4, 3], [8, 7, 6, 5, 9, 3, 2, 1, 0, 4],
    [9, 8, 7, 6, 5, 4, 3, 2, 1, 0],
]
_VERHOEFF_P = [
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 5, 7, 6, 2, 8, 3, 0, 9, 4], [5, 8, 0, 3, 7, 9, 6, 1, 4, 2],
    [8, 9, 1, 6, 0, 4, 3, 5, 2, 7], [9, 4, 5, 3, 1, 2, 6, 8, 7, 0], [4, 2, 8, 6, 5, 7, 3, 9, 0, 1],
    [2, 7, 9, 3, 8, 0, 6, 4, 1, 5], [7, 0, 4, 6, 9, 1, 3, 2, 5, 8],
]


def verhoeff_valid(digits: str) -> bool:
    check = 0
    for i, ch in enumerate(reversed(digits)):
        check = _VERHOEFF_D[check][_VERHOEFF_P[i % 8][int(ch)]]
    return check == 0


def _ids(text: str) -> Spans:
    for m in _SSN.finditer(text):
        if re.sub(r"\D", "", m.group()) not in _RETIRED_SSNS:
            yield m.span()
    for m in _UK_NINO.finditer(text):
        yield m.span()
    for m in _ES_ID.finditer(text):
        number = m.group(1).translate(str.maketrans("XYZ", "012"))
        if _ES_LETTERS[int(number) % 23] == m.group(2):
            yield m.span()
    for m in _AADHAAR.finditer(text):
        if verhoeff_valid(m.group().replace(" ", "")):
            yield m.span()


PATTERN_DETECTORS: dict[str, Callable[[str], Spans]] = {
    "url_credentials": _url_credentials, "email": _emails, "iban": _ibans, "card": _cards,
    "id": _ids, "ip": _ips, "phone": _phones,
}


# --- person names (optional) --------------------------------------------------------------------

_SPACY_MODELS = ("en_core_web_lg", "en_core_web_md", "en_core_web_sm", "en_core_web_trf")


def load_name_detector() -> tuple[Callable[[str], Spans] | None, str]:
    """Presidio's PERSON recogniser on an installed spaCy model, and how names are checked.

    Presidio's default engine downloads a spaCy model when none is installed; this never does:
    without an installed English model, names are not checked.
    """
    try:
        import spacy
        from presidio_analyzer import AnalyzerEngine
        from presidio_analyzer.nlp_engine import NlpEngineProvider
    except ImportError:
        return None, NAMES_NOT_CHECKED
    model = next((m for m in _SPACY_MODELS if spacy.util.is_package(m)), None)
    if model is None:
        return None, "not checked (no spaCy English model installed: python -m spacy download en_core_web_sm)"
    engine = NlpEngineProvider(nlp_configuration={
        "nlp_engine_name": "spacy", "models": [{"lang_code": "en", "model_name": model}]}).create_engine()
    analyzer = AnalyzerEngine(nlp_engine=engine, supported_languages=["en"])

    def names(text: str) -> Spans:
        for result in analyzer.analyze(text=text, entities=["PERSON"], language="en"):
            yield result.start, result.end

    return names, f"checked (Presidio, spaCy {model})"


# --- finding, redacting, scrubbing --------------------------------------------------------------


def find_pii(text: str, names: Callable[[str], Spans] | None = None) -> list[Match]:
    """Every detection in ``text``, without overlaps, in text order."""
    detectors = dict(PATTERN_DETECTORS, **({"name": names} if names else {}))
    found = [Match(kind, start, end) for kind, detect in detectors.items() for start, end in detect(text)]
    found.sort(key=lambda m: (KINDS.index(m.kind), m.start - m.end, m.start))
    kept: list[Match] = []
    for m in found:
        if all(m.end <= k.start or m.start >= k.end for k in kept):
            kept.append(m)
    return sorted(kept, key=lambda m: m.start)


def redact(text: str, matches: list[Match]) -> str:
    """``text`` with every match replaced by its kind's placeholder (``matches`` in text order)."""
    out, at = [], 0
    for m in matches:
        out += [text[at:m.start], PLACEHOLDERS[m.kind]]
        at = m.end
    return "".join(out) + text[at:]


@dataclass
class PiiScan:
    """What ``data.pii`` found over every file of a data section."""

    mode: str
    names: Callable[[str], Spans] | None = None
    names_status: str = NAMES_NOT_CHECKED
    found: Counter = field(default_factory=Counter)  # kind -> detections
    rows: int = 0  # rows with at least one detection
    where: list[str] = field(default_factory=list)  # the first few rows, as "file:line kinds"

    @classmethod
    def start(cls, mode: str) -> PiiScan:
        names, status = load_name_detector()
        return cls(mode, names, status)

    def scrub(self, records: list[dict], text_fields: list[str], source: str) -> tuple[list[dict], int]:
        """Records redacted (``redact``), without the rows that hold personal data (``drop``), or
        unchanged (``report``); and how many rows were dropped. Text fields hold strings or chat
        messages, as after cleaning."""
        kept, dropped = [], 0
        for record in records:
            kinds: Counter = Counter()
            record = dict(record)
            for name in text_fields:
                value = record.get(name)
                if isinstance(value, list):
                    record[name] = [{**m, "content": self._text(m["content"], kinds)} for m in value]
                elif isinstance(value, str):
                    record[name] = self._text(value, kinds)
            if kinds:
                self.found.update(kinds)
                self.rows += 1
                if len(self.where) < MAX_WHERE:
                    self.where.append(f"{location(source, record)} {', '.join(sorted(kinds))}")
                if self.mode == "drop":
                    dropped += 1
                    continue
            kept.append(record)
        return kept, dropped

    def _text(self, text: str, kinds: Counter) -> str:
        matches = find_pii(text, self.names)
        kinds.update(m.kind for m in matches)
        return redact(text, matches) if self.mode == "redact" and matches else text

    def stats(self) -> dict:
        return {"mode": self.mode, "found": {k: self.found[k] for k in KINDS if self.found[k]},
                "rows": self.rows, "names": self.names_status, "where": self.where}


def format_pii(stats: dict) -> str:
    """The statistics line: ``pii (redact): email 3, phone 1 in 4 rows; names: not checked (...)``."""
    found = ", ".join(f"{k} {v}" for k, v in stats["found"].items()) or "none found"
    rows = f" in {stats['rows']} rows" if stats["rows"] else ""
    return f"pii ({stats['mode']}): {found}{rows}; names: {stats['names']}"
