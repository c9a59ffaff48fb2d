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
from tunesmith.store.consensus import Consensus


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


def test_a_store_of_an_older_version_upgrades_and_keeps_its_rows(tmp_path):
    path = tmp_path / "store.sqlite"
    old = sqlite3.connect(path)  # the store as the first two migrations left it
    old.execute("CREATE TABLE _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    for name, fn in store_db.MIGRATIONS[:2]:
        fn(old)
        old.execute("INSERT INTO _migrations VALUES (?, 0)", (name,))
    old.execute("INSERT INTO answers (id, created_at, source, run, prompt, answer)"
                " VALUES ('a', 0, 'rated', 'r', 'p', 'x')")
    old.execute("INSERT INTO ratings (created_at, rater, answer_id, score) VALUES (0, 'ann', 'a', 4)")
    old.commit()
    old.close()
    db = store_db.connect(path)
    assert [row[0] for row in db.execute("SELECT name FROM _migrations ORDER BY rowid")] == [
        name for name, _ in store_db.MIGRATIONS]
    assert "m003_issued" in {name for name, _ in store_db.MIGRATIONS}
    assert [tuple(r) for r in db.execute("SELECT rater, answer_id, score FROM ratings")] == [("ann", "a", 4.0)]
    assert db.execute("SELECT COUNT(*) FROM issued").fetchone()[0] == 0


def test_pairs_need_enough_raters_and_their_agreement_when_asked(tmp_path):
    db = store_db.connect(tmp_path / "store.sqlite")

    def choose(prompt, rater, choice, runs=("base", "tuned")):
        a = store_db.add_answer(db, source="rated", run=runs[0], prompt=prompt, answer=f"{runs[0]} by {rater}")
        b = store_db.add_answer(db, source="rated", run=runs[1], prompt=prompt, answer=f"{runs[1]} by {rater}")
        store_db.add_rating(db, a, other_id=b, choice=choice, rater=rater)

    choose("p1", "ann", "second")
    choose("p1", "bob", "second")
    choose("p1", "cy", "first")  # p1: tuned 2 of 3
    choose("p2", "ann", "first")
    choose("p2", "ann", "second")  # ann changed her mind: only her latest counts
    choose("p3", "bob", "tie")
    choose("p3", "cy", "tie")

    def pairs(**consensus):
        left_out = {}
        rows = store_db.preference_pairs(db, Consensus(**consensus), left_out)
        return [(r["prompt"], r["rater"], r["chosen_run"], r["raters"], r["agreement"]) for r in rows], left_out

    assert pairs() == ([("p1", "ann", "tuned", 3, 0.6667), ("p1", "bob", "tuned", 3, 0.6667),
                        ("p1", "cy", "base", 3, 0.3333), ("p2", "ann", "tuned", 1, 1.0)], {"tie": 1})
    assert pairs(min_raters=2) == ([("p1", "ann", "tuned", 3, 0.6667), ("p1", "bob", "tuned", 3, 0.6667),
                                    ("p1", "cy", "base", 3, 0.3333)], {"too_few_raters": 1, "tie": 1})
    assert pairs(min_raters=2, agreement=0.66) == (
        [("p1", "ann", "tuned", 3, 0.6667), ("p1", "bob", "tuned", 3, 0.6667)], {"too_few_raters": 1, "tie": 1})
    assert pairs(agreement=0.7) == ([("p2", "ann", "tuned", 1, 1.0)], {"raters_disagree": 1, "tie": 1})
