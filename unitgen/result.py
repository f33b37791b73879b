"""Results are values: commands return one of these and the CLI renders it as
text or JSON (``--json``), in one place."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from unitgen.errors import EXIT_OK, Problem

__all__ = ["Result", "table", "to_json", "to_text"]


@dataclass(frozen=True)
class Result:
    """What a command did: data for machines, lines for people, an exit code."""

    data: dict[str, Any]
    lines: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()  # printed to stderr in text mode
    exit_code: int = EXIT_OK
    # what went wrong while the rest went through (check: the files that are fine
    # are reported with the ones that are not); printed as errors
    problems: tuple[Problem, ...] = ()


def to_json(result: Result) -> str:
    """Machine form: the data, ``"ok"``, and the warnings under ``"notices"``."""
    data = dict(result.data)
    data.setdefault("ok", result.exit_code == EXIT_OK)
    if result.problems:
        data["problems"] = [{"file": p.file, "key": p.key, "message": p.message, "code": p.code}
                            for p in result.problems]
    if result.warnings:
        data.setdefault("notices", list(result.warnings))
    return json.dumps(data, indent=2, sort_keys=True)


def to_text(result: Result) -> str:
    """Human form: the lines."""
    return "\n".join(result.lines)


def table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> tuple[str, ...]:
    """Rows as aligned text columns under a header line."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    return tuple("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                 for r in [headers, *rows])
