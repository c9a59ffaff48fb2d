"""PII detection on a labelled list: positives and hard negatives per kind, with precision and recall.

``python tests/test_pii.py`` prints the table that docs/privacy.md shows; a test checks that the
two agree. Each positive is a text and the exact span that must be found; a negative must raise no
detection of any kind. ``KNOWN_MISSES`` and ``KNOWN_FALSE_ALARMS`` are counted in the table too:
they are the limits of the detectors, kept here so that a change that fixes one is noticed.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from conftest import write_config, write_jsonl
from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.data.pii import KINDS, PLACEHOLDERS, Match, PiiScan, find_pii, redact
from tunesmith.data.pipeline import load_splits

DOCS = Path(__file__).parent.parent / "docs" / "privacy.md"

# kind -> (text, the exact text that must be found as that kind)
POSITIVES = {
    "email": [
        ("write to john.doe@example.com today", "john.doe@example.com"),
        ("cc jane_doe+news@mail.example.co.uk please", "jane_doe+news@mail.example.co.uk"),
        ("a.b-c@sub.domain.org", "a.b-c@sub.domain.org"),
        ("my address is user123@gmail.com.", "user123@gmail.com"),
        ("Contact: CONTACT@EXAMPLE.COM", "CONTACT@EXAMPLE.COM"),
        ("mailto:info@example.org", "info@example.org"),
        ("From: Jo <jo@example.net>", "jo@example.net"),
        ("(email: support@help.example.com)", "support@help.example.com"),
        ("x@y.de", "x@y.de"),
        ("reach first.last@company.io, or call", "first.last@company.io"),
        ("sent by 42@numbers.example", "42@numbers.example"),
    ],
    "phone": [
        ("call +44 20 7946 0958 now", "+44 20 7946 0958"),
        ("office (555) 123-4567", "(555) 123-4567"),
        ("cell 555-123-4567.", "555-123-4567"),
        ("US: +1-202-555-0143", "+1-202-555-0143"),
        ("Berlin 0049 30 1234567", "0049 30 1234567"),
        ("+44 (0)20 7946 0958", "+44 (0)20 7946 0958"),
        ("ring +1 (202) 555-0143 after six", "+1 (202) 555-0143"),
        ("Paris +33 1 23 45 67 89", "+33 1 23 45 67 89"),
        ("mobile +91 98765 43210", "+91 98765 43210"),
        ("fax 555.123.4567", "555.123.4567"),
        ("toll free 1-800-555-0199", "1-800-555-0199"),
        ("London 020 7946 0958", "020 7946 0958"),
        ("text 07700 900123", "07700 900123"),
        ("Tokyo +81 3-1234-5678", "+81 3-1234-5678"),
        ("Sydney +61 2 9876 5432", "+61 2 9876 5432"),
    ],
    "card": [
        ("card 4111 1111 1111 1111 exp 12/27", "4111 1111 1111 1111"),
        ("4012-8888-8888-1881", "4012-8888-8888-1881"),
        ("mastercard 5555 5555 5555 4444", "5555 5555 5555 4444"),
        ("paid with 5105105105105100", "5105105105105100"),
        ("2221 0000 0000 0009", "2221 0000 0000 0009"),
        ("amex 3782 822463 10005", "3782 822463 10005"),
        ("amex 371449635398431", "371449635398431"),
        ("discover 6011 1111 1111 1117", "6011 1111 1111 1117"),
        ("diners 3056 930902 5904", "3056 930902 5904"),
        ("jcb 3530111333300000", "3530111333300000"),
        ("old visa 4222222222222", "4222222222222"),
        ("unionpay 6200000000000005", "6200000000000005"),
    ],
    "iban": [
        ("IBAN DE89 3704 0044 0532 0130 00", "DE89 3704 0044 0532 0130 00"),
        ("pay to GB82 WEST 1234 5698 7654 32.", "GB82 WEST 1234 5698 7654 32"),
        ("GB29NWBK60161331926819", "GB29NWBK60161331926819"),
        ("FR14 2004 1010 0505 0001 3M02 606", "FR14 2004 1010 0505 0001 3M02 606"),
        ("account NL91ABNA0417164300", "NL91ABNA0417164300"),
        ("ES91 2100 0418 4502 0005 1332", "ES91 2100 0418 4502 0005 1332"),
        ("IT60 X054 2811 1010 0000 0123 456", "IT60 X054 2811 1010 0000 0123 456"),
        ("CH93 0076 2011 6238 5295 7 (Zurich)", "CH93 0076 2011 6238 5295 7"),
        ("BE68 5390 0754 7034", "BE68 5390 0754 7034"),
        ("AT61 1904 3002 3457 3201", "AT61 1904 3002 3457 3201"),
        ("NO93 8601 1117 947", "NO93 8601 1117 947"),
        ("PL61 1090 1014 0000 0712 1981 2874 AND more", "PL61 1090 1014 0000 0712 1981 2874"),
    ],
    "ip": [
        ("from 192.168.1.1", "192.168.1.1"),
        ("dns 8.8.8.8.", "8.8.8.8"),
        ("host 10.0.0.255 down", "10.0.0.255"),
        ("server 203.0.113.42:8080", "203.0.113.42"),
        ("mask 255.255.255.255", "255.255.255.255"),
        ("router 172.16.254.1", "172.16.254.1"),
        ("v6 2001:db8::1 up", "2001:db8::1"),
        ("2001:0db8:85a3:0000:0000:8a2e:0370:7334", "2001:0db8:85a3:0000:0000:8a2e:0370:7334"),
        ("link fe80::1ff:fe23:4567:890a", "fe80::1ff:fe23:4567:890a"),
        ("mapped ::ffff:192.0.2.128", "::ffff:192.0.2.128"),
        ("cloudflare 2606:4700:4700::1111.", "2606:4700:4700::1111"),
    ],
    "id": [
        ("SSN 123-45-6789", "123-45-6789"),
        ("ssn: 536 22 8864", "536 22 8864"),
        ("078-05-1121", "078-05-1121"),
        ("NI number AB 12 34 56 C", "AB 12 34 56 C"),
        ("NINO JG103759A", "JG103759A"),
        ("CE123456D", "CE123456D"),
        ("DNI 12345678Z", "12345678Z"),
        ("DNI 87654321-X", "87654321-X"),
        ("NIE X1234567L", "X1234567L"),
        ("Aadhaar 4914 1777 6311", "4914 1777 6311"),
        ("aadhaar: 9066 9074 3917", "9066 9074 3917"),
    ],
    "url_credentials": [
        ("db postgres://admin:s3cret@db.internal:5432/app", "postgres://admin:s3cret@db.internal:5432/app"),
        ("https://user:pass@example.com", "https://user:pass@example.com"),
        ("ftp://anonymous:guest@ftp.example.org/pub.", "ftp://anonymous:guest@ftp.example.org/pub"),
        ("mongodb+srv://root:hunter2@cluster0.example.net/test?retryWrites=true",
         "mongodb+srv://root:hunter2@cluster0.example.net/test?retryWrites=true"),
        ("redis://:password@localhost:6379", "redis://:password@localhost:6379"),
        ("(amqp://guest:guest@rabbit:5672/)", "amqp://guest:guest@rabbit:5672/"),
        ("smtp://mailer:Pa55w0rd!@smtp.example.com:587", "smtp://mailer:Pa55w0rd!@smtp.example.com:587"),
        ("git clone https://deploy:ghp_abc123@github.com/org/repo.git",
         "https://deploy:ghp_abc123@github.com/org/repo.git"),
        ("mysql://root:toor@127.0.0.1/db", "mysql://root:toor@127.0.0.1/db"),
        ("sftp://backup:correct-horse@backup.example.com", "sftp://backup:correct-horse@backup.example.com"),
    ],
}

# Texts with nothing to find, each chosen to look like one kind: no detector may fire on them.
NEGATIVES = {
    "email": [
        "follow @username on twitter", "retina icon@2x.png", "root@localhost", "foo@bar", "price @ 5.99",
        "a @ b.com", "git rebase HEAD@{1}", "john.doe@ wrote", "@example.com", "meet @10am",
    ],
    "phone": [
        "in 1999 and 2004", "costs $1,299.99", "rated 7/10", "ISBN 978-3-16-148410-0", "ISBN 0-306-40615-2",
        "on 2023-01-15", "on 15.01.2023", "due 01-02-2023", "pages 120-135", "population 8 336 817",
        "won 3-1", "open 10:30-11:45", "coordinates 51.5074, -0.1278", "1,000,000 views", "call 911",
        "order 1234567", "the 2019-2020 season", "zip 90210-1234", "up +12.5% to 30.2", "2 + 2 = 4",
    ],
    "card": [
        "4111 1111 1111 1112", "1234 5678 9012 3456", "ISBN 9780306406157", "ts 1700000000000",
        "0000 0000 0000 0000", "7000 0000 0000 0002", "4111 1111 1111", "ref 12345678901234",
        "9400 1000 0000 0000 0000 00", "4111-1111 1111-1111-1",
    ],
    "iban": [
        "DE89 3704 0044 0532 0130 01", "GB82 WEST 1234 5698 7654 33", "XX89 3704 0044 0532 0130 00",
        "US64 SVBK US6S 3300 9673 86", "DE89 3704 0044 0532 0130", "ISO 8601", "AB12 CDEF",
        "NL91ABNA0417164300X", "ticket DE12345678", "de89 3704 0044 0532 0130 00",
    ],
    "ip": [
        "version 1.2.3", "v1.2.3.4", "256.1.1.1", "build 10.0.19041.1", "1.2.3.4.5", "at 12:30:45",
        "mac 00:1A:2B:3C:4D:5E", "a[1::2]", "std::vector<int>", "ratio 16:9", "192.168.1", "pi 3.14159",
    ],
    "id": [
        "000-12-3456", "666-12-3456", "900-12-3456", "123-00-4567", "123-45-0000", "078-05-1120",
        "QQ 12 34 56 C", "GB 12 34 56 A", "AB 12 34 56 E", "DNI 12345678A", "1234 5678 9012",
        "4914 1777 6312", "12-345-6789",
    ],
    "url_credentials": [
        "https://example.com/path", "http://example.com:8080/", "ftp://ftp.example.org/pub/file.txt",
        "https://example.com/?next=a:b", "postgres://localhost:5432/app", "redis://cache:6379/0",
        "https://example.com/user:name", "https://example.com/a@b", "jdbc:mysql://host:3306/db",
        "http://localhost:3000/login?user=admin",
    ],
}

# The limits of pattern detectors, counted in the table: (kind, text, span, why).
KNOWN_MISSES = [
    ("email", "john at example dot com", "john at example dot com", "obfuscated addresses are not parsed"),
    ("phone", "call 5551234567", "5551234567", "ten bare digits cannot be told from other numbers"),
    ("ip", "localhost is ::1", "::1", "IPv6 of one or two groups is loopback or link-local, and reads like code"),
]
# (kind, text, span, why)
KNOWN_FALSE_ALARMS = [
    ("ip", "see section 1.2.3.4", "1.2.3.4", "a four-part section number is a valid IPv4 address"),
]


def labelled_cases() -> list[tuple[str, list[tuple[str, str]]]]:
    """(text, expected (kind, span) pairs) for every labelled case."""
    cases = [(text, [(kind, span)]) for kind, items in POSITIVES.items() for text, span in items]
    cases += [(text, []) for texts in NEGATIVES.values() for text in texts]
    cases += [(text, [(kind, span)]) for kind, text, span, _ in KNOWN_MISSES]
    cases += [(text, []) for _, text, _, _ in KNOWN_FALSE_ALARMS]
    return cases


def detected(text: str) -> list[tuple[str, str]]:
    return [(m.kind, text[m.start:m.end]) for m in find_pii(text)]


def scores() -> dict[str, dict[str, int]]:
    counts = {kind: {"tp": 0, "fp": 0, "fn": 0, "positives": 0, "negatives": 0} for kind in POSITIVES}
    for text, expected in labelled_cases():
        found = detected(text)
        for kind, span in expected:
            counts[kind]["positives"] += 1
            counts[kind]["tp" if (kind, span) in found else "fn"] += 1
        for kind, span in found:
            if (kind, span) not in expected:
                counts[kind]["fp"] += 1
    for kind, texts in NEGATIVES.items():
        counts[kind]["negatives"] = len(texts)
    for kind, *_ in KNOWN_FALSE_ALARMS:
        counts[kind]["negatives"] += 1
    return counts


def table() -> str:
    lines = ["| kind | placeholder | positives | hard negatives | precision | recall |",
             "|---|---|---|---|---|---|"]
    for kind, c in scores().items():
        precision = c["tp"] / max(c["tp"] + c["fp"], 1)
        recall = c["tp"] / max(c["positives"], 1)
        lines.append(f"| {kind} | `{PLACEHOLDERS[kind]}` | {c['positives']} | {c['negatives']} | "
                     f"{precision:.2f} | {recall:.2f} |")
    return "\n".join(lines)


@pytest.mark.parametrize(("kind", "text", "span"), [(k, t, s) for k, items in POSITIVES.items() for t, s in items])
def test_positive_is_found_exactly(kind, text, span):
    assert detected(text) == [(kind, span)]


@pytest.mark.parametrize(("kind", "text"), [(k, t) for k, texts in NEGATIVES.items() for t in texts])
def test_hard_negative_raises_nothing(kind, text):
    assert detected(text) == []


def test_known_limits_are_still_what_the_docs_say():
    for kind, text, span, _ in KNOWN_MISSES:
        assert (kind, span) not in detected(text), f"{text!r} is now found: move it to POSITIVES"
    for kind, text, span, _ in KNOWN_FALSE_ALARMS:
        assert (kind, span) in detected(text), f"{text!r} no longer raises {kind}: move it to NEGATIVES"


def test_every_kind_has_ten_positives_and_ten_hard_negatives():
    assert set(POSITIVES) == set(NEGATIVES) == set(KINDS) - {"name"}
    assert all(len(POSITIVES[k]) >= 10 and len(NEGATIVES[k]) >= 10 for k in POSITIVES)


def test_docs_table_is_the_measured_one():
    assert table() in DOCS.read_text(), "docs/privacy.md is out of date: paste `python tests/test_pii.py`"


def test_overlaps_go_to_the_more_specific_kind():
    # The URL holds an e-mail-shaped user:password@host and an IP; the card is also phone-shaped.
    text = "use mysql://root:toor@10.0.0.1/db and 4111-1111-1111-1111"
    assert [m.kind for m in find_pii(text)] == ["url_credentials", "card"]


def test_redact_replaces_each_match_with_its_placeholder():
    text = "mail a@b.com or call +44 20 7946 0958 from 10.1.2.3"
    assert redact(text, find_pii(text)) == "mail <EMAIL> or call <PHONE> from <IP>"
    assert redact(text, []) == text


def _records():
    return [
        {"prompt": "my mail is a@b.com", "completion": "noted", "_line": 1},
        {"prompt": "hello", "completion": "hi there", "_line": 2},
        {"prompt": "call 555-123-4567 or 555-123-4568", "completion": "card 4111 1111 1111 1111", "_line": 3},
    ]


@pytest.mark.parametrize("mode", ["redact", "drop", "report"])
def test_scrub_modes(mode):
    scan = PiiScan(mode)
    kept, dropped = scan.scrub(_records(), ["prompt", "completion"], "d.jsonl")
    assert scan.stats()["found"] == {"card": 1, "email": 1, "phone": 2}
    assert scan.stats()["rows"] == 2 and scan.stats()["where"] == ["d.jsonl:1 email", "d.jsonl:3 card, phone"]
    if mode == "redact":
        assert dropped == 0
        assert [r["prompt"] for r in kept] == ["my mail is <EMAIL>", "hello", "call <PHONE> or <PHONE>"]
        assert kept[2]["completion"] == "card <CARD>"
    elif mode == "drop":
        assert dropped == 2 and [r["_line"] for r in kept] == [2]
    else:
        assert dropped == 0 and kept == _records()


def test_scrub_redacts_chat_message_contents():
    scan = PiiScan("redact")
    records = [{"messages": [{"role": "user", "content": "I am at 192.168.0.7"},
                             {"role": "assistant", "content": "ok"}], "_line": 1}]
    kept, _ = scan.scrub(records, ["messages"], "chat.jsonl")
    assert kept[0]["messages"] == [{"role": "user", "content": "I am at <IP>"}, {"role": "assistant", "content": "ok"}]
    assert records[0]["messages"][0]["content"] == "I am at 192.168.0.7"  # the input is not changed


def test_names_use_presidio_where_installed(monkeypatch):
    # Presidio is optional; this checks the glue with a stand-in for its analyzer.
    import types

    class Result:
        def __init__(self, start, end):
            self.start, self.end, self.entity_type = start, end, "PERSON"

    class AnalyzerEngine:
        def __init__(self, nlp_engine, supported_languages):
            pass

        def analyze(self, text, entities, language):
            assert entities == ["PERSON"] and language == "en"
            return [Result(m.start(), m.end()) for m in re.finditer("Ada Lovelace", text)]

    class NlpEngineProvider:
        def __init__(self, nlp_configuration):
            assert nlp_configuration["models"][0]["model_name"] == "en_core_web_sm"

        def create_engine(self):
            return None

    spacy = types.SimpleNamespace(util=types.SimpleNamespace(is_package=lambda name: name == "en_core_web_sm"))
    monkeypatch.setitem(sys.modules, "spacy", spacy)
    monkeypatch.setitem(sys.modules, "presidio_analyzer", types.SimpleNamespace(AnalyzerEngine=AnalyzerEngine))
    monkeypatch.setitem(sys.modules, "presidio_analyzer.nlp_engine",
                        types.SimpleNamespace(NlpEngineProvider=NlpEngineProvider))
    scan = PiiScan.start("redact")
    assert scan.names_status == "checked (Presidio, spaCy en_core_web_sm)"
    kept, _ = scan.scrub([{"text": "Ada Lovelace wrote to a@b.com", "_line": 1}], ["text"], "t.txt")
    assert kept[0]["text"] == "<NAME> wrote to <EMAIL>"
    assert scan.stats()["found"] == {"email": 1, "name": 1}


def test_without_presidio_names_are_not_checked(monkeypatch):
    monkeypatch.setitem(sys.modules, "presidio_analyzer", None)  # import fails
    scan = PiiScan.start("report")
    assert scan.names is None and scan.names_status == "not checked (install tunesmith[pii-ner])"


def test_match_is_a_plain_value():
    assert Match("email", 0, 3) == Match("email", 0, 3)


def test_data_inspect_redacts_and_counts(tmp_path, tiny_model_dir, capsys):
    rows = [{"prompt": f"question {i} from user{i}@example.com", "completion": f"answer {i}"} for i in range(12)]
    rows += [{"prompt": f"plain question {i}", "completion": f"call me on +44 20 7946 09{i:02d}"} for i in range(8)]
    rows += [{"prompt": f"nothing personal {i}", "completion": f"answer number {i}"} for i in range(20)]
    data = {"path": str(write_jsonl(tmp_path / "qa.jsonl", rows)), "pii": "redact", "max_length": 64}
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, data)
    assert main(["data", "inspect", str(config)]) == 0
    out = capsys.readouterr().out
    assert "pii (redact): email 12, phone 8 in 20 rows; names: not checked (install tunesmith[pii-ner])" in out
    assert "rows read: 40" in out

    splits, _, stats = load_splits(load_config(config).data)
    texts = json.dumps([e["messages"] for name in splits for e in splits[name]])
    assert "@example.com" not in texts and "7946" not in texts and "<EMAIL>" in texts and "<PHONE>" in texts
    assert stats["pii"]["found"] == {"email": 12, "phone": 8}

    assert main(["data", "inspect", str(config), "--set", "data.pii=drop"]) == 0
    out = capsys.readouterr().out
    assert "pii (drop): email 12, phone 8 in 20 rows" in out and "pii 20" in out


def test_pii_is_off_by_default(tmp_path, tiny_model_dir, capsys):
    rows = [{"text": f"write to user{i}@example.com about item {i}"} for i in range(20)]
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, {"path": str(write_jsonl(tmp_path / "t.jsonl", rows))})
    assert main(["data", "inspect", str(config)]) == 0
    assert "pii (" not in capsys.readouterr().out


if __name__ == "__main__":
    print(table())
