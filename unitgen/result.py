"""Results are values: commands return one of these and the CLI renders it as
text or JSON (``--json``), in one place."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from unitgen.errors import EXIT_OK

__all__ = ["Result", "to_json", "to_text"]


@dataclass(frozen=True)
class Result:
    """What a command did: data for machines, lines for people, an exit code."""

    data: dict[str, Any]
    lines: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()  # printed to stderr in text mode
    exit_code: int = EXIT_OK
    extra: dict[str, Any] = field(default_factory=dict)


def to_json(result: Result) -> str:
    """Machine form: the data, plus the warnings under ``"notices"``."""
    import json  # noqa: PLC0415 - only --json pays for it

    data = dict(result.data)
    if result.warnings:
        data.setdefault("notices", list(result.warnings))
    return json.dumps(data, indent=2, sort_keys=True)


def to_text(result: Result) -> str:
    """Human form: the lines."""
    return "\n".join(result.lines)
