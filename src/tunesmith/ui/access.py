"""Who may do what in the UI: admin keys (the server's API keys) may do everything; rater keys may
read runs, chat and rate, but not launch, stop or resume runs.

Rater keys come from ``--rater-key-file`` and ``$TUNESMITH_RATER_KEYS``, in the entry format of the
server's keys (``ID:KEY`` or ``KEY``). A server with no keys at all, bound to this machine, is open:
every caller is an admin whose key id is ``local``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request

from tunesmith.errors import TunesmithError
from tunesmith.serve.errors import ApiError
from tunesmith.serve.keys import KEYS_ENV, check_key, load_keys

RATER_KEYS_ENV = "TUNESMITH_RATER_KEYS"
ADMIN, RATER = "admin", "rater"


@dataclass
class Access:
    admin_keys: dict[str, str]  # key -> key id, as serve/keys.py holds them
    rater_keys: dict[str, str]
    open: bool

    def role(self, authorization: str | None) -> tuple[str, str] | None:
        """``(role, key id)`` of the caller whose ``Authorization`` header this is; None for no known key."""
        if self.open:
            return ADMIN, "local"
        for role, keys in ((ADMIN, self.admin_keys), (RATER, self.rater_keys)):
            key_id = check_key(keys, authorization)
            if key_id is not None:
                return role, key_id
        return None

    def server_keys(self) -> dict[str, str]:
        """The keys the OpenAI routes accept: admin and rater keys alike (raters chat to rate)."""
        return {**self.rater_keys, **self.admin_keys}


def load_access(api_key_file: str | Path | None = None, rater_key_file: str | Path | None = None,
                environ: dict[str, str] = os.environ) -> Access:
    """Admin keys as ``tunesmith serve`` reads them, rater keys from their file and variable."""
    admin = load_keys(api_key_file, environ)
    rater_env = {KEYS_ENV: environ.get(RATER_KEYS_ENV, "")}
    try:
        rater = load_keys(rater_key_file, rater_env)
    except TunesmithError as err:  # name the rater option, not serve's --api-key-file
        raise TunesmithError(*(p.replace("--api-key-file", "--rater-key-file") for p in err.problems)) from None
    if rater and not admin:
        raise TunesmithError(f"--rater-key-file / ${RATER_KEYS_ENV}: rater keys need admin keys too "
                             f"(--api-key-file FILE or ${KEYS_ENV}), or no one could launch a run")
    return Access(admin, rater, open=not admin and not rater)


def caller(request: Request) -> tuple[str, str]:
    """``(role, key id)`` of the request's caller; 401 without a known key."""
    found = request.app.state.ui.access.role(request.headers.get("authorization"))
    if found is None:
        raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                       headers={"WWW-Authenticate": "Bearer"})
    return found


def require_rater(request: Request) -> str:
    """A FastAPI dependency: any known key (rater or admin); returns its key id."""
    return caller(request)[1]


def require_admin(request: Request) -> str:
    """A FastAPI dependency: an admin key; 403 for a rater key."""
    role, key_id = caller(request)
    if role != ADMIN:
        raise ApiError(403, f"key {key_id!r} is a rater key; launching, stopping and resuming runs, and "
                       "exporting everyone's ratings, need an admin key")
    return key_id
