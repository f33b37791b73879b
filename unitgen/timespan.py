"""systemd time spans (``15min``, ``1h 30s``, ``90``) parsed to seconds.

A spec writes durations the way systemd documents them (systemd.time(7)) so a
user can copy them between unitgen specs and hand-written units.
"""

from __future__ import annotations

import re

__all__ = ["format_seconds", "parse_timespan"]

# systemd's own table (src/basic/time-util.c): case matters ("M" is months,
# "m" minutes); a month is 30.44 days and a year 365.25 days, as there.
_UNITS: dict[str, float] = {
    "ns": 1e-9, "nsec": 1e-9,
    "us": 1e-6, "usec": 1e-6, "µs": 1e-6, "μs": 1e-6,
    "ms": 1e-3, "msec": 1e-3,
    "s": 1, "sec": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
    "w": 604800, "week": 604800, "weeks": 604800,
    "M": 2629800, "month": 2629800, "months": 2629800,
    "y": 31557600, "year": 31557600, "years": 31557600,
}

_PART = re.compile(r"\s*(\d+(?:\.\d+)?|\.\d+)\s*([A-Za-zµμ]*)")


def parse_timespan(text: str) -> float:
    """Return the seconds in a systemd time span; raise ValueError with a reason."""
    rest = text.strip()
    if not rest:
        raise ValueError("empty time span")
    total = 0.0
    while rest:
        match = _PART.match(rest)
        if not match or not match.group(0).strip():
            raise ValueError(f"not a time span: {text!r} (examples: 90s, 15min, 1h 30min)")
        number, unit = match.group(1), match.group(2)
        if unit and unit not in _UNITS:
            raise ValueError(f"unknown time unit {unit!r} in {text!r} (systemd's units: us, "
                             "ms, s, min, h, d, w, M or month, y)")
        total += float(number) * _UNITS[unit or "s"]
        rest = rest[match.end() :].strip()
    return total


def format_seconds(seconds: float) -> str:
    """Render seconds the way units and messages show them (``1800s``, ``0.5s``)."""
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"
