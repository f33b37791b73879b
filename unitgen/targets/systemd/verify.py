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


def verify_units(source: str, files: tuple[RenderedFile, ...],
                 extras: dict[str, str]) -> tuple[list[Problem], list[str]]:
    """Problems (naming ``source`` and the spec key) and notices from systemd's
    verify of ``files``. ``extras`` maps a directive set through ``[systemd.*]``
    to its spec key. Nothing when systemd-analyze is not installed."""
    analyze = shutil.which("systemd-analyze")
    units = [f for f in files if not f.secret]
    if analyze is None or not units:
        return [], []
    with tempfile.TemporaryDirectory(prefix="unitgen-verify-") as tmp:
        paths = []
        for f in units:
            path = Path(tmp) / f.name
            path.write_text(f.text, encoding="utf-8")
            paths.append(str(path))
        try:
            done = subprocess.run([analyze, "verify", "--man=no", *paths], capture_output=True,
                                  text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return [], ["systemd-analyze verify could not run; units were not checked by systemd"]
        texts = {str(Path(tmp) / f.name): f.text.split("\n") for f in units}
        problems: list[Problem] = []
        notices: list[str] = []
        for raw in (done.stdout + done.stderr).splitlines():
            line = raw.replace(tmp + "/", "")
            missing = _NOT_EXECUTABLE.match(line)
            if missing:
                continue  # unitgen.ops.executables says it better (with the fix)
            at = _LINE.match(raw)
            if at is None:
                continue
            text_lines = texts.get(at.group("path"), [])
            number = int(at.group("line"))
            directive = ""
            if 0 < number <= len(text_lines):
                directive = text_lines[number - 1].split("=", 1)[0].strip()
            key = extras.get(directive) or _KEY_OF.get(directive, "")
            problems.append(Problem(source, key, f"systemd rejects it: {at.group('message')}"))
    return problems, notices
