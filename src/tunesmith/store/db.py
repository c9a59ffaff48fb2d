"""The SQLite store of answers and the ratings people give them.

One file holds what the feedback loop collects (``tunesmith feedback collect``: two answers to a
prompt and which one a person preferred) and what the server logs (every answer it served, and
the ratings attached to them later), so that both become training and preference data the same way.
An answer's ``source`` says who made it: ``served`` (the server), ``collected`` (``feedback
collect``) or ``rated`` (the web UI's rate page, ``ui/rate.py``).

The schema changes only through named, append-only migrations (as simonw/llm does): each is a
function registered with ``@migration``, run once, in order, inside a transaction, and recorded in
the ``_migrations`` table. Never edit or reorder a migration that has shipped; add a new one.

Writes are transactions: a process killed mid-write leaves the store as it was before that write.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.store.consensus import Consensus, latest

# Where the store lives unless a command is given --store: $TUNESMITH_STORE, else runs/store.sqlite
# under the current directory (beside the runs that `tunesmith train` writes by default).
STORE_ENV = "TUNESMITH_STORE"


def default_path() -> Path:
    return Path(os.environ.get(STORE_ENV) or Path("runs") / "store.sqlite")


MIGRATIONS: list[tuple[str, Callable[[sqlite3.Connection], None]]] = []


def migration(fn: Callable[[sqlite3.Connection], None]):
    """Register ``fn`` as the next migration, under its function name."""
    MIGRATIONS.append((fn.__name__, fn))
    return fn


@migration
def m001_answers(db: sqlite3.Connection) -> None:
    # source: 'served' (the server answered a request) or 'collected' (feedback collect made it).
    # run: the run (adapter) that answered, or the base model's name; meta: JSON of the rest
    # (sampling settings, the request's key id for served answers, ...).
    db.execute("""
        CREATE TABLE answers (
            id TEXT PRIMARY KEY,
            created_at REAL NOT NULL,
            source TEXT NOT NULL,
            run TEXT NOT NULL,
            prompt TEXT NOT NULL,
            answer TEXT NOT NULL,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            latency_ms REAL,
            meta TEXT NOT NULL DEFAULT '{}'
        )""")
    db.execute("CREATE INDEX answers_run_time ON answers (run, created_at)")


@migration
def m002_ratings(db: sqlite3.Connection) -> None:
    # A rating is one of: a choice between two answers to the same prompt (other_id set, choice
    # 'first' | 'second' | 'tie', 'first' meaning answer_id), a score of one answer, or a label
    # a person gave one answer (the right class, for classifiers).
    db.execute("""
        CREATE TABLE ratings (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            created_at REAL NOT NULL,
            rater TEXT NOT NULL,
            answer_id TEXT NOT NULL REFERENCES answers (id),
            other_id TEXT REFERENCES answers (id),
            choice TEXT CHECK (choice IN ('first', 'second', 'tie')),
            score REAL,
            label TEXT,
            comment TEXT NOT NULL DEFAULT '',
            CHECK ((other_id IS NULL) = (choice IS NULL)),
            CHECK (choice IS NOT NULL OR score IS NOT NULL OR label IS NOT NULL)
        )""")
    db.execute("CREATE INDEX ratings_answer ON ratings (answer_id)")


@migration
def m003_issued(db: sqlite3.Connection) -> None:
    # What the rate page showed, and to whom: one answer (to score) or two (to choose between, side
    # A first), each a `rated` answer whose text the server looked up by its completion id. A
    # verdict names an issued item, and only the key it was issued to may give one.
    db.execute("""
        CREATE TABLE issued (
            id TEXT PRIMARY KEY,
            created_at REAL NOT NULL,
            key_id TEXT NOT NULL,
            first_id TEXT NOT NULL REFERENCES answers (id),
            second_id TEXT REFERENCES answers (id)
        )""")


def connect(path: str | Path) -> sqlite3.Connection:
    """Open (or create) the store at ``path`` and bring its schema up to date."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")  # readers do not block the one writer
        db.execute("PRAGMA foreign_keys=ON")
        migrate(db)
    except sqlite3.DatabaseError as e:
        raise TunesmithError(f"{path}: not a tunesmith store ({e})") from e
    return db


def migrate(db: sqlite3.Connection) -> list[str]:
    """Run the migrations ``db`` has not had yet; returns their names."""
    db.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    done = {row[0] for row in db.execute("SELECT name FROM _migrations")}
    unknown = done - {name for name, _ in MIGRATIONS}
    if unknown:
        raise TunesmithError(f"the store was written by a newer tunesmith (migrations {sorted(unknown)})")
    applied = []
    for name, fn in MIGRATIONS:
        if name in done:
            continue
        with transaction(db):
            fn(db)
            db.execute("INSERT INTO _migrations VALUES (?, ?)", (name, time.time()))
        applied.append(name)
    return applied


class transaction:
    """``with transaction(db):`` runs the block as one write; an exception rolls it back.

    Nested blocks join the outer one, so several ``add_answer``/``add_rating`` calls wrapped in one
    block (a choice: two answers and the rating between them) land together or not at all."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db
        self.outer = False

    def __enter__(self):
        self.outer = not self.db.in_transaction
        if self.outer:
            self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind, value, tb):
        if self.outer:
            self.db.execute("ROLLBACK" if kind else "COMMIT")
        return False


def add_answer(db: sqlite3.Connection, *, source: str, run: str, prompt: str, answer: str,
               id: str | None = None, prompt_tokens: int | None = None,
               completion_tokens: int | None = None, latency_ms: float | None = None,
               meta: dict | None = None) -> str:
    """Record one answer; returns its id (a new one unless given, e.g. the completion's id)."""
    id = id or uuid.uuid4().hex
    with transaction(db):
        db.execute(
            "INSERT INTO answers (id, created_at, source, run, prompt, answer, prompt_tokens,"
            " completion_tokens, latency_ms, meta) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (id, time.time(), source, run, prompt, answer, prompt_tokens, completion_tokens,
             latency_ms, json.dumps(meta or {})))
    return id


# How long a rating's free text may be, wherever it comes from (/v1/feedback, the rate page): the
# routes refuse longer with a 400 naming the field.
MAX_COMMENT_CHARS = 4000
MAX_LABEL_CHARS = 256


def add_rating(db: sqlite3.Connection, answer_id: str, *, rater: str, other_id: str | None = None,
               choice: str | None = None, score: float | None = None, label: str | None = None,
               comment: str = "") -> int:
    """Record one rating of a logged answer (see ``m002_ratings``); returns its id."""
    try:
        with transaction(db):
            cursor = db.execute(
                "INSERT INTO ratings (created_at, rater, answer_id, other_id, choice, score, label,"
                " comment) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (time.time(), rater, answer_id, other_id, choice, score, label, comment))
    except sqlite3.IntegrityError as e:
        raise TunesmithError(f"rating of answer {answer_id!r} refused: {e}") from e
    return cursor.lastrowid


def choice_item(row) -> tuple[str, tuple[str, ...]]:
    """The item a choice is about: its prompt and the two models, in either order."""
    return row["prompt"], tuple(sorted((row["first_run"], row["second_run"])))


def choice_verdict(row) -> str:
    """What a choice says about its item: ``tie``, or the model whose answer won; for two answers of
    one model (two samples) the winning answer's id, since no two raters saw the same two samples."""
    if row["choice"] == "tie":
        return "tie"
    winner = "first" if row["choice"] == "first" else "second"
    return row[f"{winner}_run"] if row["first_run"] != row["second_run"] else row[f"{winner}_id"]


def choices(db: sqlite3.Connection, sources: tuple[str, ...] | None = None) -> list[sqlite3.Row]:
    """Every choice between two answers (ties included), oldest first, with both answers."""
    where = f"AND a.source IN ({', '.join('?' * len(sources))})" if sources else ""
    return db.execute(f"""
        SELECT r.id, r.rater, r.choice, r.created_at, a.prompt, a.id AS first_id, b.id AS second_id,
               a.answer AS first, b.answer AS second, a.run AS first_run, b.run AS second_run
        FROM ratings r JOIN answers a ON a.id = r.answer_id JOIN answers b ON b.id = r.other_id
        WHERE r.choice IS NOT NULL {where} ORDER BY r.id""", sources or ()).fetchall()


def preference_pairs(db: sqlite3.Connection, consensus: Consensus = Consensus(),
                     left_out: dict[str, int] | None = None) -> list[dict]:
    """The choices as ``{prompt, chosen, rejected, ...}`` rows: each rater's latest choice on an item,
    when ``consensus`` supports its verdict and it is not a tie (``store.consensus``), in the order
    the choices were made. ``left_out`` counts the items that give no pair, by reason (``tie``:
    only ties are supported)."""
    rows = choices(db)
    found = latest((choice_item(row), row["rater"], n) for n, row in enumerate(rows))
    kept = []
    for by_rater in found.values():
        verdicts = {rater: choice_verdict(rows[n]) for rater, n in by_rater.items()}
        support = consensus.support(verdicts)
        mine = [(by_rater[rater], support.shares[verdict], support.raters) for rater, verdict in verdicts.items()
                if verdict in support.shares and verdict != "tie"]
        reason = support.left_out or (None if mine else "tie")
        if reason is not None and left_out is not None:
            left_out[reason] = left_out.get(reason, 0) + 1
        kept += mine
    out = []
    for n, share, raters in sorted(kept):
        row = rows[n]
        chosen, rejected = ("first", "second") if row["choice"] == "first" else ("second", "first")
        out.append({"prompt": row["prompt"], "chosen": row[chosen], "rejected": row[rejected],
                    "chosen_run": row[f"{chosen}_run"], "rejected_run": row[f"{rejected}_run"],
                    "rater": row["rater"], "rated_at": row["created_at"], "raters": raters,
                    "agreement": round(share, 4)})
    return out


def served_ratings(db: sqlite3.Connection, adapter: str | None = None, since: float | None = None) -> list[sqlite3.Row]:
    """Every rating of one served answer (not pairwise choices), oldest first, with its rater: of the
    answers of ``adapter`` (every adapter's when None) logged at or after ``since``."""
    return db.execute("""
        SELECT a.id, a.prompt, a.answer, a.run, r.rater, r.score, r.label, r.created_at
        FROM answers a JOIN ratings r ON r.answer_id = a.id
        WHERE a.source = 'served' AND (? IS NULL OR a.run = ?) AND a.created_at >= ? AND r.other_id IS NULL
        ORDER BY r.id""", (adapter, adapter, since if since is not None else float("-inf"))).fetchall()


def rated_answers(ratings: list[sqlite3.Row], consensus: Consensus = Consensus(), min_score: float = 1.0,
                  left_out: dict[str, int] | None = None) -> list[dict]:
    """Served answers marked good or bad, as ``{prompt, completion, label, ...}`` rows (the unpaired
    preference data that KTO trains on), from ``served_ratings``: a score of at least ``min_score``
    (thumbs up is 1.0) marks an answer good, a lower one (thumbs down is 0.0) bad; a rating with a
    label and no score marks nothing (``no_score``). An item is a prompt and an answer to it, whichever
    of its logged copies was rated: each rater's latest mark counts once, and the item gives the mark
    ``consensus`` supports (``store.consensus``), in the order the items were first rated.
    ``left_out`` counts the items that give no row, by reason."""
    marks = [((row["prompt"], row["answer"]), row["rater"], None if row["score"] is None else row["score"] >= min_score)
             for row in ratings]
    runs = {}
    for row in ratings:
        runs.setdefault((row["prompt"], row["answer"]), row["run"])
    out = []
    for (prompt, answer), by_rater in latest(marks).items():
        support = consensus.support(by_rater)
        reason = support.left_out or ("no_score" if support.verdict is None else None)
        if reason is not None:
            if left_out is not None:
                left_out[reason] = left_out.get(reason, 0) + 1
            continue
        out.append({"prompt": prompt, "completion": answer, "label": support.verdict,
                    "run": runs[(prompt, answer)], "raters": support.raters,
                    "agreement": round(support.shares[support.verdict], 4)})
    return out
