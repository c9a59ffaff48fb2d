"""The SQLite store: migrations once and in order, transactions that survive a kill, pairs out."""

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from tunesmith.errors import TunesmithError
from tunesmith.store import db as store_db


def test_migrations_run_once_in_order(tmp_path):
    path = tmp_path / "store.sqlite"
    db = store_db.connect(path)
    names = [row[0] for row in db.execute("SELECT name FROM _migrations ORDER BY rowid")]
    assert names == [name for name, _ in store_db.MIGRATIONS]
    assert store_db.migrate(db) == []
    db.close()
    assert store_db.migrate(store_db.connect(path)) == []


def test_a_store_from_a_newer_version_is_refused(tmp_path):
    path = tmp_path / "store.sqlite"
    store_db.connect(path).execute("INSERT INTO _migrations VALUES ('m999_future', 0)")
    with pytest.raises(TunesmithError, match="newer tunesmith"):
        store_db.connect(path)


def test_not_a_store(tmp_path):
    path = tmp_path / "notes.sqlite"
    path.write_text("these are my notes, not a database\n" * 100)
    with pytest.raises(TunesmithError, match="not a tunesmith store"):
        store_db.connect(path)
    assert path.read_text().startswith("these are my notes")


def test_pairs_out_of_choices(tmp_path):
    db = store_db.connect(tmp_path / "store.sqlite")
    a = store_db.add_answer(db, source="collected", run="base", prompt="p", answer="meh")
    b = store_db.add_answer(db, source="collected", run="tuned", prompt="p", answer="great film")
    store_db.add_rating(db, a, other_id=b, choice="second", rater="ann")
    store_db.add_rating(db, a, other_id=b, choice="tie", rater="bob")
    store_db.add_rating(db, b, score=5, rater="cy")
    pairs = list(store_db.preference_pairs(db))
    assert [(p["prompt"], p["chosen"], p["rejected"], p["chosen_run"]) for p in pairs] == [
        ("p", "great film", "meh", "tuned")]
    with pytest.raises(TunesmithError, match="refused"):
        store_db.add_rating(db, a, other_id=b, rater="dan")  # a pair with no choice


def test_a_write_killed_midway_leaves_nothing(tmp_path):
    path = tmp_path / "store.sqlite"
    store_db.connect(path).close()
    # The child opens a write transaction, inserts, signals that it is midway, and waits to be killed.
    script = textwrap.dedent(f"""
        import sys, time
        from tunesmith.store import db as store_db
        db = store_db.connect({str(path)!r})
        store_db.add_answer(db, source="served", run="base", prompt="kept", answer="a")
        with store_db.transaction(db):
            db.execute("INSERT INTO answers (id, created_at, source, run, prompt, answer)"
                       " VALUES ('lost', 0, 'served', 'base', 'lost', 'b')")
            print("midway", flush=True)
            time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert child.stdout.readline().strip() == "midway"
    child.send_signal(signal.SIGKILL)
    child.wait()
    db = store_db.connect(path)
    assert [row["prompt"] for row in db.execute("SELECT prompt FROM answers")] == ["kept"]
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    store_db.add_answer(db, source="served", run="base", prompt="after", answer="c")
    assert sqlite3.connect(path).execute("SELECT count(*) FROM answers").fetchone()[0] == 2


def test_writes_inside_one_transaction_land_together_or_not_at_all(tmp_path):
    db = store_db.connect(tmp_path / "store.sqlite")
    with pytest.raises(TunesmithError):
        with store_db.transaction(db):
            store_db.add_answer(db, source="rated", run="a", prompt="p", answer="x")
            store_db.add_rating(db, "no-such-answer", rater="ann", score=1.0)  # refused: rolls back the answer too
    assert db.execute("SELECT COUNT(*) FROM answers").fetchone()[0] == 0
    with store_db.transaction(db):
        first = store_db.add_answer(db, source="rated", run="a", prompt="p", answer="x")
        store_db.add_rating(db, first, rater="ann", score=1.0)
    assert db.execute("SELECT COUNT(*) FROM answers").fetchone()[0] == 1
    assert db.execute("SELECT COUNT(*) FROM ratings").fetchone()[0] == 1
