"""What a running gateway counted per API key name, for ``unitgen status
--keys``: the runtime API's ``unitgen usage`` (a command the gateway's
generated ``unitgen.lua`` adds: its stick-table of key names and the tokens it
counted, as JSON), the same numbers ``/metrics/keys`` and the page show."""

from __future__ import annotations

import json
from pathlib import Path

from unitgen.inunit.hareload import runtime_api

__all__ = ["COLUMNS", "key_usage", "usage_lines"]

# (field of "unitgen usage", column heading)
COLUMNS = (("requests", "REQUESTS"), ("forwarded", "FORWARDED"), ("refused", "REFUSED"),
           ("in_flight", "IN FLIGHT"), ("bytes_in", "BYTES IN"), ("bytes_out", "BYTES OUT"),
           ("prompt_tokens", "PROMPT TOK"), ("completion_tokens", "COMPL TOK"))


def key_usage(admin: Path) -> list[dict[str, object]] | None:
    """Each key name and its counters since the running worker started; None
    when the gateway does not answer (not running, or not readable here)."""
    try:
        said = json.loads(runtime_api(admin, "unitgen usage"))
    except (OSError, ValueError):
        return None
    keys = said.get("keys") if isinstance(said, dict) else None
    return [k for k in keys if isinstance(k, dict)] if isinstance(keys, list) else None


def usage_lines(gateway: str, keys: list[dict[str, object]] | None) -> list[str]:
    """A table of them, for people."""
    if keys is None:
        return ["", f"gateway {gateway}: its counters per key are not shown (HAProxy's runtime "
                    "API does not answer here: is it running, and may this user use it?)"]
    rows = [("KEY", *(h for _, h in COLUMNS))]
    rows += [(str(k.get("name", "")), *(str(k.get(f, 0)) for f, _ in COLUMNS)) for k in keys]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["", f"gateway {gateway}: per key, since its last reload "
               "(tokens: whole JSON answers only)"]
    out += ["  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
            for r in rows]
    if len(rows) == 1:
        out.append("  (no key has been used)")
    return out
