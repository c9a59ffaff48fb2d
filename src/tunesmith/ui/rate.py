"""The Rate page's API (``/ui/api/rate``): the prompts to rate, the items the server issues, the
choices and scores people give, progress, agreement between raters, and the export as preference data.

The server, not the page, makes what is rated. ``POST item`` picks the rater's next prompt (from
``--prompts``, else the prompts of earlier rating sessions: never the served traffic), has the
models answer it through the server's own chat route, under the caller's key, and issues the item:
each answer is copied, by its logged completion id, into an ``answers`` row with source ``rated``,
and an ``issued`` row records the answers (side A first) and the key they were shown to. A verdict
names the item; the server refuses one on an item not issued to the caller's key, and never takes
answer text from the client.

Everything is in the feedback store (``store.db``), beside what ``tunesmith feedback collect``
records: each verdict is one ``ratings`` row with the rater's key id (or the name typed on the page
when the UI is open to anyone on this machine). The export is ``feedback.export``'s own file, so the
page and ``tunesmith feedback export`` write the same rows, and take the same ``--min-raters`` and
``--agreement`` (``min_raters``, ``agreement``).

An *item* is what raters can agree on: a prompt and the models compared (a pair, in either order)
or rated (one). Each rater's latest verdict on an item counts: for a pair, the model whose answer
won, or a tie (``store.db.choice_verdict``); for one answer, its score.
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import sqlite3
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from itertools import combinations
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from tunesmith import feedback
from tunesmith.errors import TunesmithError
from tunesmith.serve.access import LOCAL, KeyId
from tunesmith.serve.errors import ApiError
from tunesmith.serve.routes.completions import chat
from tunesmith.serve.schemas import ChatRequest
from tunesmith.store import db as store
from tunesmith.store.db import MAX_COMMENT_CHARS
from tunesmith.store.consensus import Consensus, latest

router = APIRouter(prefix="/ui/api/rate")

SOURCE = "rated"
# Sources of the answers whose ratings are verdicts of a rating session (the page's, and the
# terminal's); scores given to served answers through /v1/feedback (thumbs as 0/1) are not.
SESSION_SOURCES = (SOURCE, "collected")
MAX_STORE_PROMPTS = 500
MAX_RATER = 64
TEMPERATURE = 0.7  # the models' sampling for the page: the same for every rater and model
_SOURCES = ", ".join("?" * len(SESSION_SOURCES))

Mode = Literal["pair", "score"]
Item = tuple[str, tuple[str, ...]]


class ItemBody(BaseModel):
    """Ask for the next item: the models to compare (pair) or rate (score), after prompt ``after``."""

    model_config = ConfigDict(extra="forbid")
    models: list[str] = Field(min_length=1, max_length=2)
    mode: Mode = "pair"
    after: int = Field(-1, ge=-1)
    rater: str = Field("", max_length=MAX_RATER)
    max_tokens: int | None = Field(None, ge=1)


class ChoiceBody(BaseModel):
    """A choice on an issued pair: ``first`` is the answer shown as A, ``second`` the one shown as B."""

    model_config = ConfigDict(extra="forbid")
    item: str = Field(min_length=1, max_length=64)
    choice: Literal["first", "second", "tie"]
    comment: str = Field("", max_length=MAX_COMMENT_CHARS)
    rater: str = Field("", max_length=MAX_RATER)


class ScoreBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item: str = Field(min_length=1, max_length=64)
    score: int = Field(ge=1, le=5)
    comment: str = Field("", max_length=MAX_COMMENT_CHARS)
    rater: str = Field("", max_length=MAX_RATER)


# ---- plain functions over the store --------------------------------------------------------------

def session_prompts(db: sqlite3.Connection, prompts: list[str] | None) -> tuple[list[str], str]:
    """The prompts to rate and where they come from: the UI's ``--prompts`` file when it was given,
    else the prompts of earlier rating sessions (this page's, ``feedback collect``'s). Never the served
    traffic: a rater must not read what other clients asked."""
    if prompts:
        return list(prompts), "prompts file"
    rows = db.execute(f"SELECT prompt FROM answers WHERE source IN ({_SOURCES}) GROUP BY prompt "
                      "ORDER BY MIN(created_at) LIMIT ?", (*SESSION_SOURCES, MAX_STORE_PROMPTS))
    return [row["prompt"] for row in rows if row["prompt"].strip()], "earlier rating sessions"


def rater_name(key_id: str, typed: str) -> str:
    """Who rates: the caller's key id; with no keys (``local``) the name typed on the page, if any."""
    typed = typed.strip()
    return typed if key_id == LOCAL and typed else key_id


def issue(db: sqlite3.Connection, key_id: str, prompt: str, shown: list[tuple[str, str]]) -> dict:
    """Issue an item to ``key_id``: ``shown`` is ``(model, completion id)`` per side, A first, each a
    completion the server logged as served to ``key_id``. Each answer's text is looked up by its id
    and copied into a ``rated`` answer; returns ``{item, prompt, answers}`` (the texts, A first)."""
    with store.transaction(db):  # the answers and the item, or nothing
        ids, texts = [], []
        for side, (model, completion_id) in zip("AB", shown):
            row = db.execute("SELECT answer, run, meta FROM answers WHERE id = ? AND source = 'served'",
                             (completion_id,)).fetchone()
            if row is None or json.loads(row["meta"]).get("key_id") != key_id:
                raise ApiError(404, f"no completion {completion_id!r} served to key {key_id!r} in the request log")
            meta = {"completion_id": completion_id, "shown_as": side, "served_run": row["run"]}
            ids.append(store.add_answer(db, source=SOURCE, run=model, prompt=prompt, answer=row["answer"],
                                        meta=meta))
            texts.append(row["answer"])
        item = secrets.token_urlsafe(16)
        db.execute("INSERT INTO issued (id, created_at, key_id, first_id, second_id) VALUES (?, ?, ?, ?, ?)",
                   (item, time.time(), key_id, ids[0], ids[1] if len(ids) > 1 else None))
    return {"item": item, "prompt": prompt, "answers": texts}


def issued(db: sqlite3.Connection, item: str, key_id: str, mode: Mode) -> sqlite3.Row:
    """The item ``item`` as issued to ``key_id``, with its models by side; 404 for an item issued to
    no one or to another key (the same answer: which items exist is not the caller's business)."""
    row = db.execute("""
        SELECT i.first_id, i.second_id, a.run AS first_run, b.run AS second_run
        FROM issued i JOIN answers a ON a.id = i.first_id LEFT JOIN answers b ON b.id = i.second_id
        WHERE i.id = ? AND i.key_id = ?""", (item, key_id)).fetchone()
    if row is None:
        raise ApiError(404, f"no item {item!r} was issued to key {key_id!r}; ask for one (POST /ui/api/rate/item)",
                       "item")
    if (row["second_id"] is not None) != (mode == "pair"):
        what = "a choice needs an item of two answers" if mode == "pair" else "a score needs an item of one answer"
        raise ApiError(400, f"item {item!r}: {what}", "item")
    return row


def revealed(row: sqlite3.Row) -> dict[str, str]:
    """The models of an item by side, shown once the verdict is in."""
    return {side: row[f"{which}_run"] for side, which in (("A", "first"), ("B", "second")) if row[f"{which}_run"]}


def record_choice(db: sqlite3.Connection, body: ChoiceBody, key_id: str, rater: str) -> tuple[int, dict]:
    """The choice on an item issued to ``key_id``; returns the rating id and the models by side."""
    row = issued(db, body.item, key_id, "pair")
    rating = store.add_rating(db, row["first_id"], rater=rater, other_id=row["second_id"], choice=body.choice,
                              comment=body.comment)
    return rating, revealed(row)


def record_score(db: sqlite3.Connection, body: ScoreBody, key_id: str, rater: str) -> tuple[int, dict]:
    """The score (1-5) of an item issued to ``key_id``; returns the rating id and its model."""
    row = issued(db, body.item, key_id, "score")
    rating = store.add_rating(db, row["first_id"], rater=rater, score=float(body.score), comment=body.comment)
    return rating, revealed(row)


def item_key(prompt: str, models: list[str] | tuple[str, ...]) -> Item:
    """The item a verdict is about; a pair's models in either order name the same item."""
    return prompt, tuple(sorted(models))


def _pair_verdicts(db: sqlite3.Connection) -> Iterator[tuple[Item, str, object]]:
    for row in store.choices(db, SESSION_SOURCES):
        yield store.choice_item(row), row["rater"], store.choice_verdict(row)


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
    return latest(MODES[mode][1](db))


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


def export_jsonl(db: sqlite3.Connection, consensus: Consensus = Consensus(),
                 left_out: dict[str, int] | None = None) -> tuple[str, int]:
    """``tunesmith feedback export``'s file (the choices ``consensus`` keeps, as preference pairs), as text."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pairs.jsonl"
        n = feedback.export(db, out, consensus, left_out)
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
def get_session(request: Request, key_id: Rater, db: Db, rater: Annotated[str, Query(max_length=MAX_RATER)] = ""):
    """The prompts' count and source, and who rates (``ask_name``: the page may take a typed name)."""
    prompts, source = _prompts(request, db)
    return {"prompts": len(prompts), "source": source, "rater": rater_name(key_id, rater),
            "ask_name": key_id == LOCAL}


async def ask(request: Request, key_id: str, model: str, prompt: str, max_tokens: int | None) -> str:
    """``model``'s answer to ``prompt`` through the server's chat route, as ``key_id`` (the route checks
    the request and logs the answer as any client's); returns the completion id."""
    body = ChatRequest(model=model, messages=[{"role": "user", "content": prompt}], temperature=TEMPERATURE,
                       max_tokens=max_tokens)
    reply = await chat(body, request, request.app.state.serve, key_id)
    return reply["id"]


@router.post("/item")
async def post_item(body: ItemBody, request: Request, key_id: Rater, db: Db):
    """The next prompt this rater has not rated with these models, answered by them and issued to the
    caller's key: ``{item, index, prompt, answers}`` (answers A first, in a random order; the models
    are named with the verdict), and the progress. ``index`` None: every prompt is rated."""
    check_models(body.mode, body.models)
    if request.app.state.serve.request_log is None:
        raise ApiError(400, "this server keeps no request log, so it cannot look answers up to rate")
    prompts, _ = await run_in_threadpool(_prompts, request, db)
    who = rater_name(key_id, body.rater)
    found = await run_in_threadpool(verdicts, db, body.mode)
    index = next_prompt(prompts, body.models, who, found, body.after)
    answered = {"index": index, "progress": progress(prompts, body.models, who, found)}
    if index is None:
        return answered
    models = list(body.models)
    random.shuffle(models)  # which side is which is random, and the page does not see it until the verdict
    prompt = prompts[index]
    completions = await asyncio.gather(*(ask(request, key_id, m, prompt, body.max_tokens) for m in models))
    shown = await run_in_threadpool(issue, db, key_id, prompt, list(zip(models, completions)))
    return answered | shown


@router.post("/choice")
def post_choice(body: ChoiceBody, key_id: Rater, db: Db):
    """Record a choice between the two answers of an item issued to the caller's key; names the models."""
    rater = rater_name(key_id, body.rater)
    rating, models = record_choice(db, body, key_id, rater)
    return {"id": rating, "rater": rater, "models": models}


@router.post("/score")
def post_score(body: ScoreBody, key_id: Rater, db: Db):
    """Record a score (1-5) of the answer of an item issued to the caller's key; names the model."""
    rater = rater_name(key_id, body.rater)
    rating, models = record_score(db, body, key_id, rater)
    return {"id": rating, "rater": rater, "models": models}


@router.get("/progress")
def get_progress(request: Request, key_id: Rater, db: Db, models: Models, mode: Mode = "pair",
                 rater: Annotated[str, Query(max_length=MAX_RATER)] = ""):
    """Progress with these models, and agreement between raters over every item of this mode."""
    check_models(mode, models)
    prompts, _ = _prompts(request, db)
    found = verdicts(db, mode)
    return {"progress": progress(prompts, models, rater_name(key_id, rater), found),
            "agreement": agreement(found)}


@router.get("/export")
def get_export(db: Db, min_raters: Annotated[int, Query(ge=1)] = 1,
               agreement: Annotated[float, Query(ge=0, le=1)] = 0.0):
    """The choices as preference pairs (JSONL), as ``tunesmith feedback export --min-raters N
    --agreement A`` writes them; ``X-Left-Out`` counts the items left out, by reason.
    Admin keys only: the file holds every rater's choices, and raters see only their own progress."""
    left_out: dict[str, int] = {}
    text, n = export_jsonl(db, Consensus(min_raters, agreement), left_out)
    return Response(text, media_type="application/x-ndjson",
                    headers={"Content-Disposition": 'attachment; filename="preference_pairs.jsonl"',
                             "X-Rows": str(n), "X-Left-Out": json.dumps(left_out)})
