"""When a gateway's new routes answer, asked through its own port.

A reload (SIGUSR2 to HAProxy's master) returns at once; the master then reads
its configuration again and forks new workers, some 100 ms later, while the
old ones go on answering with the old routes. A deploy that returned at the
signal let the first request for a model it had just added get the gateway's
own 404. So after a reload the gateway is asked ``GET /v1/models``, which
HAProxy answers itself from ``models.json`` (no member is woken, an on-demand
one included), until the answer is that file as written now, several times in
a row on new connections (an old worker may take one more before it stops
listening). The same for every target: only the gateway's port is used.

What it cannot see: a change that leaves the route names as they were (an
upstream's address alone) answers the same list before and after.
"""

from __future__ import annotations

import http.client
import json
import time
from pathlib import Path

from unitgen.errors import UnitgenError
from unitgen.features.gateway.files import read_settings
from unitgen.features.gateway.render import FILES
from unitgen.inunit.gwkeys import listing, parse_keys
from unitgen.inunit.hareload import IN_A_ROW

__all__ = ["IN_A_ROW", "first_key", "wait_served"]

MODELS_PATH = "/v1/models"


def first_key(keys_file: str | None) -> tuple[str, tuple[str, ...] | None] | None:
    """A key of an API keys file to ask with, and the routes it may see (None:
    all): one that sees every route when there is one. None: no file, or this
    process may not read it."""
    if not keys_file:
        return None
    try:
        text = Path(keys_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    keys = parse_keys(text)[0]
    found = next((k for k in keys if k.models is None), keys[0] if keys else None)
    return (found.key, found.models) if found is not None else None


def _ask(target: str, key: str | None, timeout: float) -> tuple[int, str]:
    """``GET /v1/models`` at ``host:port``: (status, body); (0, why) when nothing answered."""
    host, _, port = target.rpartition(":")
    conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout)
    headers = {"Connection": "close", **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        conn.request("GET", MODELS_PATH, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read().decode("utf-8", "replace")
    except (OSError, http.client.HTTPException) as exc:
        return 0, str(exc) or type(exc).__name__
    finally:
        conn.close()


def wait_served(gateway: str, directory: Path, target: str, timeout: float = 30.0,
                interval: float = 0.02) -> str | None:
    """Wait until ``gateway`` at ``target`` (host:port) answers with the routes
    installed in ``directory``: None when it does; a note when it cannot be
    asked from here (its keys file is not readable); UnitgenError when it
    does not within ``timeout``."""
    try:
        expected = (directory / FILES["models"]).read_text(encoding="utf-8")
    except OSError as exc:
        return f"{gateway}: its routes were not checked: cannot read {exc.filename}"
    found = read_settings(directory)
    keys_file = found.settings.api_keys_file if found is not None else None
    asking = first_key(keys_file)
    key = asking[0] if asking is not None else None
    if asking is not None and asking[1] is not None:  # its own list (models-key.lf)
        expected = listing(json.loads(expected), asking[1]) + "\n"
    deadline = time.monotonic() + timeout
    seen, last = 0, ""
    while True:
        status, body = _ask(target, key, min(5.0, timeout))
        if status == 401:
            return (f"{gateway}: its new routes were not checked: its keys file {keys_file} "
                    "cannot be read here to ask it")
        seen = seen + 1 if status == 200 and body == expected else 0
        if seen >= IN_A_ROW:
            return None
        last = f"{status} {body[:80]!r}" if status else body
        if time.monotonic() >= deadline:
            raise UnitgenError(f"{gateway}: {MODELS_PATH} at {target} did not list its new "
                               f"routes within {timeout:g} s of the reload (last answer: "
                               f"{last}): it may still route by its previous configuration; "
                               "its log says why")
        time.sleep(interval)
