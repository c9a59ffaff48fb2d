"""Who may call what: keys by role, and one table of every route of the served app (``tunesmith serve``
and the UI that ``tunesmith ui`` adds to it) with the roles that may call it.

Roles:
- **admin** (``--api-key-file``, ``$TUNESMITH_API_KEYS``): everything, including what changes the
  server for everyone (loading and unloading adapters, moving aliases), launching, stopping and
  resuming runs, and exporting every rater's ratings.
- **user** (``--user-key-file``, ``$TUNESMITH_USER_KEYS``): inference, and feedback on its own answers.
- **rater** (``--rater-key-file``, ``$TUNESMITH_RATER_KEYS``): the rate page, chat, and reading runs.

A server with no keys at all (only allowed on this machine, ``keys.check_binding``) is open: every
caller is an admin whose key id is ``local``.

``ROUTES`` is the one place a route's roles are written. ``authorize``, a dependency of the whole app,
looks up the route that matched, so a router only declares routes and a route cannot forget its
check; a route missing from the table is refused to everyone. docs/security.md's table and the test
that calls every route with every role are both generated from ``ROUTES``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, NamedTuple

from fastapi import Depends, Request

from tunesmith.errors import TunesmithError
from tunesmith.serve.errors import ApiError
from tunesmith.serve.keys import KEYS_ENV, check_key, load_keys

ADMIN, USER, RATER = "admin", "user", "rater"
ANYONE = "anyone"  # no key needed: health, and the UI's pages and static files (their data needs a key)
ROLES = (ADMIN, USER, RATER)
USER_KEYS_ENV, RATER_KEYS_ENV = "TUNESMITH_USER_KEYS", "TUNESMITH_RATER_KEYS"
LOCAL = "local"  # the key id of every caller of an open server


class Rule(NamedTuple):
    roles: frozenset[str]
    what: str  # said in the 403 and in docs/security.md's table


def _rule(what: str, *roles: str) -> Rule:
    return Rule(frozenset(roles), what)


ROUTES: dict[tuple[str, str], Rule] = {
    # serve
    ("GET", "/health"): _rule("liveness, the base model's name and the adapters' count", ANYONE),
    ("GET", "/v1/models"): _rule("listing the models", *ROLES),
    ("POST", "/v1/chat/completions"): _rule("chat", *ROLES),
    ("POST", "/v1/completions"): _rule("text completion", ADMIN, USER),
    ("POST", "/v1/feedback"): _rule("rating a logged answer (a user: only its own answers)", ADMIN, USER),
    ("POST", "/v1/score"): _rule("scoring texts by a served reward model or classifier", ADMIN, USER),
    ("POST", "/v1/load_lora_adapter"): _rule("loading an adapter", ADMIN),
    ("POST", "/v1/unload_lora_adapter"): _rule("unloading an adapter", ADMIN),
    ("POST", "/v1/aliases"): _rule("moving an alias", ADMIN),
    ("GET", "/v1/stats"): _rule("the engine's counters (prefix-cache hits say whose prompts began alike)", ADMIN),
    # ui: the pages hold no data, so a browser can load them and then ask for a key
    ("GET", "/"): _rule("redirect to /ui/", ANYONE),
    ("GET", "/ui"): _rule("redirect to /ui/", ANYONE),
    ("GET", "/ui/"): _rule("the runs page", ANYONE),
    ("GET", "/ui/{page}"): _rule("a page of the UI", ANYONE),
    ("GET", "/ui/static"): _rule("the UI's scripts and styles", ANYONE),
    ("GET", "/ui/api/whoami"): _rule("the caller's role and key id", *ROLES),
    ("GET", "/ui/api/runs"): _rule("reading runs", ADMIN, RATER),
    ("GET", "/ui/api/run"): _rule("reading runs", ADMIN, RATER),
    ("GET", "/ui/api/run/metrics"): _rule("reading runs", ADMIN, RATER),
    ("GET", "/ui/api/compare"): _rule("comparing runs", ADMIN, RATER),
    ("GET", "/ui/api/launch/sources"): _rule("listing launch sources", ADMIN),
    ("GET", "/ui/api/launch/source"): _rule("reading a launch source", ADMIN),
    ("POST", "/ui/api/launch"): _rule("launching a run", ADMIN),
    ("POST", "/ui/api/launch/stop"): _rule("stopping a run", ADMIN),
    ("POST", "/ui/api/launch/resume"): _rule("resuming a run", ADMIN),
    ("GET", "/ui/api/rate/session"): _rule("the rate page's prompts and who rates", ADMIN, RATER),
    ("POST", "/ui/api/rate/item"): _rule("the next item to rate, answered by the models and issued to the caller",
                                         ADMIN, RATER),
    ("POST", "/ui/api/rate/choice"): _rule("recording a choice between two answers", ADMIN, RATER),
    ("POST", "/ui/api/rate/score"): _rule("recording a score of one answer", ADMIN, RATER),
    ("GET", "/ui/api/rate/progress"): _rule("rating progress and agreement", ADMIN, RATER),
    ("GET", "/ui/api/rate/export"): _rule("exporting everyone's ratings", ADMIN),
}


class Identity(NamedTuple):
    role: str
    key_id: str


@dataclass
class Access:
    """The keys of each role (key -> key id, as ``keys.load_keys`` reads them).

    The dicts are held, not copied, by the app: a key added or removed applies to the next request.
    """
    admin_keys: dict[str, str] = field(default_factory=dict)
    user_keys: dict[str, str] = field(default_factory=dict)
    rater_keys: dict[str, str] = field(default_factory=dict)

    @property
    def open(self) -> bool:
        return not (self.admin_keys or self.user_keys or self.rater_keys)

    def keys(self) -> dict[str, str]:
        """Every key, whatever its role (what ``keys.check_binding`` asks for)."""
        return {**self.rater_keys, **self.user_keys, **self.admin_keys}

    def identify(self, authorization: str | None) -> Identity | None:
        """The caller whose ``Authorization`` header this is; None for no known key."""
        if self.open:
            return Identity(ADMIN, LOCAL)
        for role, keys in ((ADMIN, self.admin_keys), (USER, self.user_keys), (RATER, self.rater_keys)):
            key_id = check_key(keys, authorization)
            if key_id is not None:
                return Identity(role, key_id)
        return None


def load_access(api_key_file: str | Path | None = None, rater_key_file: str | Path | None = None,
                user_key_file: str | Path | None = None, environ: dict[str, str] = os.environ) -> Access:
    """Admin keys as ``tunesmith serve`` has always read them; user and rater keys from their files and
    variables. User or rater keys without an admin key are refused: no one could manage the server."""
    admin = load_keys(api_key_file, environ)
    others = {}
    for role, path, variable, option in ((USER, user_key_file, USER_KEYS_ENV, "--user-key-file"),
                                         (RATER, rater_key_file, RATER_KEYS_ENV, "--rater-key-file")):
        try:
            others[role] = load_keys(path, {KEYS_ENV: environ.get(variable, "")})
        except TunesmithError as err:  # name this role's option, not serve's --api-key-file
            raise TunesmithError(*(p.replace("--api-key-file", option) for p in err.problems)) from None
        if others[role] and not admin:
            raise TunesmithError(f"{option} / ${variable}: {role} keys need admin keys too (--api-key-file "
                                 f"FILE or ${KEYS_ENV}), or no one could load adapters or launch runs")
    roles_of: dict[str, list[str]] = {}
    for role, keys in ((ADMIN, admin), (USER, others[USER]), (RATER, others[RATER])):
        for key, key_id in keys.items():
            roles_of.setdefault(key, []).append(f"{role} {key_id!r}")
    shared = [" and ".join(found) for found in roles_of.values() if len(found) > 1]
    if shared:
        raise TunesmithError(f"one key has two roles ({'; '.join(shared)}): give each role its own keys")
    return Access(admin, others[USER], others[RATER])


def route_key(request: Request) -> tuple[str, str]:
    """``(method, path template)`` of the route that matched: the key of its row in ``ROUTES``."""
    route = request.scope.get("route")
    path = getattr(route, "path", request.url.path)
    method = "GET" if request.method == "HEAD" else request.method
    return method, path


def authorize(request: Request) -> Identity:
    """A dependency of every route: the caller, if ``ROUTES`` lets its role call this route.

    401 for a missing or unknown key, 403 naming the roles that may (the 401 comes first, so an
    unknown key learns nothing about the routes).
    """
    method, path = route_key(request)
    rule = ROUTES.get((method, path))
    if rule is None:  # fail closed: a route added without a row in the table is no one's
        raise ApiError(403, f"{method} {path} has no row in the access table (serve/access.py ROUTES); "
                       "no one may call it")
    if ANYONE in rule.roles:
        return Identity(ANYONE, "")
    caller = request.app.state.serve.access.identify(request.headers.get("authorization"))
    if caller is None:
        raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                       headers={"WWW-Authenticate": "Bearer"})
    if caller.role not in rule.roles:
        needed = " or ".join(r for r in ROLES if r in rule.roles)
        article = "an" if needed.startswith(ADMIN) else "a"
        raise ApiError(403, f"key {caller.key_id!r} is a {caller.role} key; {rule.what} ({method} {path}) "
                       f"needs {article} {needed} key")
    return caller


Caller = Annotated[Identity, Depends(authorize)]


def key_id(caller: Caller) -> str:
    return caller.key_id


KeyId = Annotated[str, Depends(key_id)]
