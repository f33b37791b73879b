"""Reading a unit's journal. journalctl is the reader here (the issue allows it):
the journal's file format is not a D-Bus API."""

from __future__ import annotations

import os
import subprocess

__all__ = ["journal_argv", "last_lines"]

# A sandbox manager logs to its own journald, in a directory of its own.
JOURNAL_DIR_ENV = "UNITGEN_JOURNAL_DIR"


def journal_argv(unit: str | list[str] | None, scope: str, *, lines: int | None = None,
                 follow: bool = False, directory: str | None = None) -> list[str]:
    """The journalctl command that shows ``unit`` (one or several, merged in time
    order, with the manager's own messages about them; or everything) of the
    given manager; ``directory`` (default: $UNITGEN_JOURNAL_DIR) selects a
    sandbox's own journal, whose units journald records as user units."""
    units = [unit] if isinstance(unit, str) else list(unit or [])
    argv = ["journalctl", "--no-pager"]
    directory = directory or os.environ.get(JOURNAL_DIR_ENV)
    if directory:
        argv += ["-D", directory] + [w for u in units for w in ("--user-unit", u)]
    else:
        argv += (["--user"] if scope == "user" else []) + [w for u in units for w in ("-u", u)]
    if lines is not None:
        argv += ["-n", str(lines)]
    if follow:
        argv.append("-f")
    return argv


def last_lines(unit: str, scope: str, lines: int = 10, *, since: float | None = None) -> list[str]:
    """The unit's last journal lines (message text only), of the time after
    ``since`` (a Unix time: this attempt, not older runs); empty when unreadable."""
    extra = ["--since", f"@{since:.6f}"] if since is not None else []
    try:
        done = subprocess.run([*journal_argv(unit, scope, lines=lines), *extra, "-o", "cat"],
                              capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [ln for ln in done.stdout.splitlines() if ln.strip()]
