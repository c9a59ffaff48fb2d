"""The Rate page's API (``/ui/api/rate``): the prompts to rate, the choices and scores people give,
progress, agreement between raters, and the export as preference data.

Everything is in the feedback store (``store.db``), beside what ``tunesmith feedback collect``
records: each answer shown is an ``answers`` row with source ``rated`` (the page made it through the
server's chat route; its completion id is in ``meta``), and each verdict one ``ratings`` row with the
rater's key id (or the name typed on the page when the UI is open to anyone on this machine). The
export is ``feedback.export``'s own file, so the page and ``tunesmith feedback export`` write the
same rows.

An *item* is what raters can agree on: a prompt and the models compared (a pair, in either order)
or rated (one). Each rater's latest verdict on an item counts: for a pair, the model whose answer
won, or a tie; for one answer, its score.
"""

from __future__ import annotations

import sqlite3
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from itertools import combinations
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from tunesmith import feedback
from tunesmith.errors import TunesmithError
from tunesmith.serve.access import LOCAL, KeyId
from tunesmith.store import db as store

router = APIRouter(prefix="/ui/api/rate")

SOURCE = "rated"
# Sources of the answers whose ratings are verdicts of a rating session (the page's, and the
# terminal's); scores given to served answers through /v1/feedback (thumbs as 0/1) are not.
SESSION_SOURCES = (SOURCE, "collected")
MAX_STORE_PROMPTS = 500
_SOURCES = ", ".join("?" * len(SESSION_SOURCES))

Mode = Literal["pair", "score"]
Item = tuple[str, tuple[str, ...]]


class Shown(BaseModel):
    """One answer as the page showed it: the model that wrote it and the server's completion id."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    answer: str
    completion_id: str | None = None
    side: str | None = Field(None, description="where the page showed it: 'A' (left) or 'B' (right)")


class ChoiceBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1)
    first: Shown
    second: Shown
    choice: Literal["first", "second", "tie"]
    comment: str = Field("", max_length=4000)
    rater: str = Field("", max_length=64)


class ScoreBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1)
    answer: Shown
    score: int = Field(ge=1, le=5)
    comment: str = Field("", max_length=4000)
    rater: str = Field("", max_length=64)


# ---- plain functions over the store --------------------------------------------------------------

def session_prompts(db: sqlite3.Connection, prompts: list[str] | None) -> tuple[list[str], str]:
    """The prompts to rate and where they come from: the UI's ``--prompts`` file when it was given,
    else the distinct prompts already in the store (chats, served requests, earlier sessions)."""
    if prompts:
        return list(prompts), "prompts file"
    rows = db.execute("SELECT prompt FROM answers GROUP BY prompt ORDER BY MIN(created_at) LIMIT ?",
                      (MAX_STORE_PROMPTS,))
    return [row["prompt"] for row in rows if row["prompt"].strip()], "store"


def rater_name(key_id: str, typed: str) -> str:
    """Who rates: the caller's key id; with no keys (``local``) the name typed on the page, if any."""
    typed = typed.strip()
    return typed if key_id == LOCAL and typed else key_id


def _add_shown(db: sqlite3.Connection, prompt: str, shown: Shown) -> str:
    meta = {key: value for key, value in (("completion_id", shown.completion_id), ("shown_as", shown.side))
            if value}
    return store.add_answer(db, source=SOURCE, run=shown.model, prompt=prompt, answer=shown.answer, meta=meta)


def record_choice(db: sqlite3.Connection, body: ChoiceBody, rater: str) -> int:
    """Store both answers and the choice between them (``first`` is ``body.first``); returns the rating id."""
    with store.transaction(db):  # both answers and the choice, or nothing
        first = _add_shown(db, body.prompt, body.first)
        second = _add_shown(db, body.prompt, body.second)
        return store.add_rating(db, first, rater=rater, other_id=second, choice=body.choice, comment=body.comment)


def record_score(db: sqlite3.Connection, body: ScoreBody, rater: str) -> int:
    """Store the answer and its score (1-5); returns the rating id."""
    with store.transaction(db):  # the answer and its score, or nothing
        answer = _add_shown(db, body.prompt, body.answer)
        return store.add_rating(db, answer, rater=rater, score=float(body.score), comment=body.comment)


def item_key(prompt: str, models: list[str] | tuple[str, ...]) -> Item:
    """The item a verdict is about; a pair's models in either order name the same item."""
    return prompt, tuple(sorted(models))


def _pair_verdicts(db: sqlite3.Connection) -> Iterator[tuple[Item, str, object]]:
    rows = db.execute(f"""
        SELECT r.rater, r.choice, a.prompt, a.run AS first, b.run AS second
        FROM ratings r JOIN answers a ON a.id = r.answer_id JOIN answers b ON b.id = r.other_id
        WHERE r.choice IS NOT NULL AND a.source IN ({_SOURCES}) ORDER BY r.id""", SESSION_SOURCES)
    for row in rows:
        winner = "tie" if row["choice"] == "tie" else row[row["choice"]]  # the column named by the choice
        yield item_key(row["prompt"], (row["first"], row["second"])), row["rater"], winner


def _score_verdicts(db: sqlite3.Connection) -> Iterator[tuple[Item, str, object]]:
    rows = db.execute(f"""
        SELECT r.rater, r.score, a.prompt, a.run
        FROM ratings r JOIN answers a ON a.id = r.answer_id
        WHERE r.other_id IS NULL AND r.score IS NOT NULL AND a.source IN ({_SOURCES}) ORDER BY r.id""",
                      SESSION_SOURCES)
    for row in rows:
        yield item_key(row["prompt"], (row["run"],)), row["rater"], row["score"]


# A mode: how many models an item has, and where its verdicts come from.
MODES = {"pair": (2, _pair_verdicts), "score": (1, _score_verdicts)}


def verdicts(db: sqlite3.Connection, mode: Mode) -> dict[Item, dict[str, object]]:
    """{item: {rater: verdict}}, each rater's latest: the winning model or ``"tie"`` (pair), the score."""
    out: dict[Item, dict[str, object]] = defaultdict(dict)
    for item, rater, verdict in MODES[mode][1](db):
        out[item][rater] = verdict
    return dict(out)


def check_models(mode: Mode, models: list[str]) -> None:
    """A pair compares two models; a score rates one."""
    if len(models) != MODES[mode][0]:
        raise TunesmithError(f"models: mode {mode} takes {MODES[mode][0]} model(s), got {len(models)}")


def progress(prompts: list[str], models: list[str], rater: str, found: dict[Item, dict[str, object]]) -> dict:
    """How many of the prompts ``rater``, and anyone, has rated with these models."""
    rated_by = [found.get(item_key(p, models), {}) for p in prompts]
    return {"total": len(prompts), "rater": rater, "rated_by_rater": sum(rater in r for r in rated_by),
            "rated_by_anyone": sum(bool(r) for r in rated_by),
            "raters": len(set().union(*rated_by)) if rated_by else 0}


def next_prompt(prompts: list[str], models: list[str], rater: str, found: dict[Item, dict[str, object]],
                after: int = -1) -> int | None:
    """The index of the first prompt after ``after`` (then from the start) that ``rater`` has not
    rated with these models; None when every one is rated."""
    order = [*range(after + 1, len(prompts)), *range(min(after + 1, len(prompts)))]
    return next((i for i in order if rater not in found.get(item_key(prompts[i], models), {})), None)


def cohen_kappa(pairs: list[tuple[object, object]]) -> float | None:
    """Cohen's kappa of two raters' labels on the same items; None when chance agreement is 1
    (both gave one and the same label to every item: kappa is undefined)."""
    n = len(pairs)
    observed = sum(a == b for a, b in pairs) / n
    first, second = Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
    chance = sum(first[label] * second[label] for label in first) / (n * n)
    return None if chance == 1 else (observed - chance) / (1 - chance)


def agreement(found: dict[Item, dict[str, object]]) -> dict:
    """Agreement on the items two or more raters rated: per rater pair, the percent agreement and
    Cohen's kappa; overall, the agreement pooled over pairs and the mean of the pairwise kappas
    (Light's kappa). A pair of the same model twice (two samples) has no model to agree on: left out."""
    shared: dict[tuple[str, str], list[tuple[object, object]]] = defaultdict(list)
    items = 0
    for (_, models), by_rater in found.items():
        if len(set(models)) != len(models) or len(by_rater) < 2:
            continue
        items += 1
        for a, b in combinations(sorted(by_rater), 2):
            shared[(a, b)].append((by_rater[a], by_rater[b]))
    pairs = [{"raters": list(raters), "items": len(labels),
              "agreement": sum(a == b for a, b in labels) / len(labels), "kappa": cohen_kappa(labels)}
             for raters, labels in sorted(shared.items())]
    compared = sum(p["items"] for p in pairs)
    kappas = [p["kappa"] for p in pairs if p["kappa"] is not None]
    return {"items": items, "pairs": pairs,
            "agreement": sum(p["agreement"] * p["items"] for p in pairs) / compared if compared else None,
            "kappa": sum(kappas) / len(kappas) if kappas else None}


def export_jsonl(db: sqlite3.Connection) -> tuple[str, int]:
    """``tunesmith feedback export``'s file (every non-tie choice as a preference pair), as text."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pairs.jsonl"
        n = feedback.export(db, out)
        return out.read_text(), n


# ---- routes --------------------------------------------------------------------------------------

def _db(request: Request) -> Iterator[sqlite3.Connection]:
    db = store.connect(request.app.state.ui.store_path)
    try:
        yield db
    finally:
        db.close()


Rater = KeyId  # who may rate, and export, is serve/access.py's ROUTES
Db = Annotated[sqlite3.Connection, Depends(_db)]
Models = Annotated[list[str], Query(min_length=1, max_length=2)]


def _prompts(request: Request, db: sqlite3.Connection) -> tuple[list[str], str]:
    return session_prompts(db, request.app.state.ui.prompts)


@router.get("/session")
def get_session(request: Request, key_id: Rater, db: Db, rater: str = ""):
    """The prompts' count and source, and who rates (``ask_name``: the page may take a typed name)."""
    prompts, source = _prompts(request, db)
    return {"prompts": len(prompts), "source": source, "rater": rater_name(key_id, rater),
            "ask_name": key_id == LOCAL}


@router.get("/next")
def get_next(request: Request, key_id: Rater, db: Db, models: Models, mode: Mode = "pair", after: int = -1,
             rater: str = ""):
    """The next prompt this rater has not rated with these models (``index`` None: all done)."""
    check_models(mode, models)
    prompts, _ = _prompts(request, db)
    who, found = rater_name(key_id, rater), verdicts(db, mode)
    index = next_prompt(prompts, models, who, found, after)
    return {"index": index, "prompt": None if index is None else prompts[index],
            "progress": progress(prompts, models, who, found)}


@router.post("/choice")
def post_choice(body: ChoiceBody, key_id: Rater, db: Db):
    """Record a choice between two answers."""
    rater = rater_name(key_id, body.rater)
    return {"id": record_choice(db, body, rater), "rater": rater}


@router.post("/score")
def post_score(body: ScoreBody, key_id: Rater, db: Db):
    """Record a score (1-5) of one answer."""
    rater = rater_name(key_id, body.rater)
    return {"id": record_score(db, body, rater), "rater": rater}


@router.get("/progress")
def get_progress(request: Request, key_id: Rater, db: Db, models: Models, mode: Mode = "pair", rater: str = ""):
    """Progress with these models, and agreement between raters over every item of this mode."""
    check_models(mode, models)
    prompts, _ = _prompts(request, db)
    found = verdicts(db, mode)
    return {"progress": progress(prompts, models, rater_name(key_id, rater), found),
            "agreement": agreement(found)}


@router.get("/export")
def get_export(db: Db):
    """Every non-tie choice as preference pairs (JSONL), as ``tunesmith feedback export`` writes them.
    Admin keys only: the file holds every rater's choices, and raters see only their own progress."""
    text, n = export_jsonl(db)
    return Response(text, media_type="application/x-ndjson",
                    headers={"Content-Disposition": 'attachment; filename="preference_pairs.jsonl"',
                             "X-Rows": str(n)})
