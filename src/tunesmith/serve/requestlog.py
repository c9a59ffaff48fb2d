"""The request log: every answer served, written to the SQLite store (``store.db``), and the
ratings attached to it later through ``/v1/feedback``.

Each answer is one ``answers`` row with ``source="served"``, its completion id as the row id, the
adapter (or the base model's name) as ``run``, the prompt (a chat's last user message; the whole
conversation in ``meta["messages"]``), the answer, token counts and latency, and in ``meta`` the key
id, the route and the sampling settings. With ``redact_pii`` personal data (``data.pii``) in prompt,
answer and messages is replaced by placeholders before anything is written.
"""

from __future__ import annotations

import threading
from pathlib import Path

from tunesmith.data.pii import find_pii, redact
from tunesmith.store import db


def scrub(text: str) -> str:
    return redact(text, find_pii(text))


class RequestLog:
    def __init__(self, path: str | Path, redact_pii: bool = False):
        self.path = Path(path)
        self.redact_pii = redact_pii
        self.db = db.connect(self.path)
        self._lock = threading.Lock()  # one connection, shared by the server's worker threads

    def answer(self, *, id: str, run: str, prompt: str, answer: str, prompt_tokens: int,
               completion_tokens: int, latency_ms: float, meta: dict) -> None:
        if self.redact_pii:
            prompt, answer = scrub(prompt), scrub(answer)
            if "messages" in meta:
                meta = {**meta, "messages": [{**m, "content": scrub(m["content"])} for m in meta["messages"]]}
        with self._lock:
            db.add_answer(self.db, source="served", id=id, run=run, prompt=prompt, answer=answer,
                          prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                          latency_ms=latency_ms, meta=meta)

    def rate(self, answer_id: str, *, rater: str, score: float | None = None, label: str | None = None,
             comment: str = "") -> int:
        if self.redact_pii:
            comment = scrub(comment)
        with self._lock:
            return db.add_rating(self.db, answer_id, rater=rater, score=score, label=label, comment=comment)

    def has_answer(self, answer_id: str) -> bool:
        with self._lock:
            return self.db.execute("SELECT 1 FROM answers WHERE id = ?", (answer_id,)).fetchone() is not None

    def served_to(self, answer_id: str) -> str | None:
        """The key id the answer was served to (``meta.key_id``); None for no such answer."""
        with self._lock:
            row = self.db.execute("SELECT json_extract(meta, '$.key_id') FROM answers WHERE id = ?",
                                  (answer_id,)).fetchone()
        return None if row is None else row[0]

    def close(self) -> None:
        self.db.close()
