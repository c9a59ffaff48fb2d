"""API keys: who may call the server, and the key id its request log records.

Keys come from a file (``--api-key-file``) and from ``$TUNESMITH_API_KEYS`` (comma-separated).
Each entry is ``ID:KEY`` or a bare ``KEY``; a bare key's id is the start of its SHA-256, so the
log can tell callers apart without holding their keys. Lines starting with ``#`` are comments.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from pathlib import Path

from tunesmith.errors import TunesmithError

KEYS_ENV = "TUNESMITH_API_KEYS"


def parse_key(entry: str) -> tuple[str, str]:
    """``(key id, key)`` from ``ID:KEY`` or ``KEY``."""
    key_id, sep, key = entry.strip().partition(":")
    if not sep:
        key = key_id
        key_id = "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]
    return key_id.strip(), key.strip()


def load_keys(path: str | Path | None = None, environ: dict[str, str] = os.environ) -> dict[str, str]:
    """Every configured key, mapped to its id."""
    entries = [e for e in environ.get(KEYS_ENV, "").split(",") if e.strip()]
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise TunesmithError(f"--api-key-file {path}: no such file")
        entries += [line for line in path.read_text().splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]
    keys = {}
    for n, entry in enumerate(entries, 1):
        key_id, key = parse_key(entry)
        if not key:
            raise TunesmithError(f"API key entry {n} ({key_id!r}) is empty")
        keys[key] = key_id
    return keys


def check_key(keys: dict[str, str], authorization: str | None) -> str | None:
    """The id of the key a ``Authorization: Bearer KEY`` header carries, or None if it is not one of ``keys``."""
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    found = None
    for key, key_id in keys.items():  # compare with every key, in constant time each
        if hmac.compare_digest(key.encode(), given.strip().encode()):
            found = key_id
    return found


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_binding(host: str, keys: dict[str, str]) -> None:
    """Refuse to serve beyond this machine with no API keys."""
    if not keys and not is_loopback(host):
        raise TunesmithError(f"--host {host}: binding beyond localhost needs API keys "
                             f"(--api-key-file FILE or ${KEYS_ENV})")
