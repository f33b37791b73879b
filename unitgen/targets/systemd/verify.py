"""systemd's own reading of rendered units (``systemd-analyze verify``), turned
into problems that name the spec key, so ``check`` catches what only systemd
knows (a directive name typo in ``[systemd.service]``, a value out of range)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from unitgen.errors import Problem
from unitgen.targets.base import RenderedFile

__all__ = ["verify_units"]

# Directive -> the spec key a user changes to fix it.
_KEY_OF = {
    "ExecStart": "args", "TimeoutStartSec": "health.timeout", "WorkingDirectory":
    "working_directory", "User": "user", "Group": "group", "Restart": "restart",
    "Environment": "env", "ListenStream": "port", "Description": "description",
}
_LINE = re.compile(r"^(?P<path>/\S+?):(?P<line>\d+): (?P<message>.*)$")
_NOT_EXECUTABLE = re.compile(r"^(?P<unit>\S+): Command (?P<program>.+) is not executable")


def verify_units(batch: list[tuple[str, tuple[RenderedFile, ...], dict[str, str]]]
                 ) -> tuple[list[Problem], list[str]]:
    """Problems (naming each spec's ``source`` and key) and notices from one
    ``systemd-analyze verify`` over the units of every ``(source, files,
    extras)`` in ``batch``; ``extras`` maps a directive set through
    ``[systemd.*]`` to its spec key. Nothing when systemd-analyze is missing."""
    analyze = shutil.which("systemd-analyze")
    owner: dict[str, tuple[str, RenderedFile, dict[str, str]]] = {}
    for source, files, extras in batch:
        for f in files:
            if not f.secret and not f.config:
                owner[f.name] = (source, f, extras)
    if analyze is None or not owner:
        return [], []
    with tempfile.TemporaryDirectory(prefix="unitgen-verify-") as tmp:
        for name, (_, f, _) in owner.items():
            (Path(tmp) / name).write_text(f.text, encoding="utf-8")
        try:
            done = subprocess.run([analyze, "verify", "--man=no",
                                   *(str(Path(tmp) / n) for n in owner)],
                                  capture_output=True, text=True, timeout=120, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return [], ["systemd-analyze verify could not run; units were not checked by systemd"]
        problems: list[Problem] = []
        for raw in (done.stdout + done.stderr).splitlines():
            if _NOT_EXECUTABLE.match(raw.replace(tmp + "/", "")):
                continue  # unitgen.ops.executables says it better (with the fix)
            at = _LINE.match(raw)
            if at is None:
                continue
            unit = Path(at.group("path")).name
            if unit not in owner:
                continue
            source, f, extras = owner[unit]
            text_lines = f.text.split("\n")
            number = int(at.group("line"))
            directive = ""
            if 0 < number <= len(text_lines):
                directive = text_lines[number - 1].split("=", 1)[0].strip()
            key = extras.get(directive) or _KEY_OF.get(directive, "")
            problems.append(Problem(source, key, f"systemd rejects it: {at.group('message')}"))
    return problems, []
