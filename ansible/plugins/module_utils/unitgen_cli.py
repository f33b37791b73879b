# Copyright: unitgen contributors
# Apache-2.0 (see the project's pyproject.toml)
"""How the unitgen modules talk to unitgen: its command line with ``--json``.

The command line is unitgen's stable interface. Calling it (rather than
importing unitgen into the Python that runs the module) keeps the modules
standard-library only, works with any unitgen installed on the host (a venv,
pipx, a distribution package), and leaves unitgen's own dependencies out of
Ansible's interpreter. Standard library only; Python 3.8 compatible: this file
travels to the managed host.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["DEFAULT_TARGET", "TARGETS", "address_parts", "argv_for", "error_message", "parse_json"]

# unitgen's targets (``unitgen.ops.registry.names()``) and the one it uses when
# none is named (``registry.DEFAULT``). The modules travel to hosts without
# unitgen and their argument specs must be literals (Ansible reads them without
# running the module), so each spells the list; a test
# (tests/offline/test_structure.py) keeps every list of targets in ansible/
# equal to the registry's.
TARGETS = ("systemd", "supervisor")
DEFAULT_TARGET = "systemd"


def argv_for(executable: str, command: str, *, scope: str, target: str) -> list[str]:
    """``unitgen COMMAND [--user] [--target T] --json``. ``--target`` is passed
    only for targets other than the default, so a unitgen without the option
    still works for the default."""
    argv = [executable, command]
    if scope == "user":
        argv.append("--user")
    if target and target != DEFAULT_TARGET:
        argv.extend(["--target", target])
    argv.append("--json")
    return argv


def parse_json(stdout: str) -> dict[str, Any] | None:
    """unitgen's JSON document, or None when stdout holds none."""
    text = stdout.strip()
    if not text:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def error_message(stderr: str, stdout: str = "") -> str:
    """unitgen's own words for a failure, from its stderr.

    unitgen prints each problem as ``error: file: key: message`` (exit 2 for bad
    input, 1 for a failed operation) and click prints ``Error: ...`` for a bad
    option; those lines are the message, without the prefix. Anything else
    (an interpreter that could not start unitgen at all) is reduced to its last
    lines, and a traceback to its final line, never the whole dump."""
    lines = [line.rstrip() for line in stderr.splitlines() if line.strip()]
    found = []
    for line in lines:
        for prefix in ("error: ", "Error: "):
            if line.startswith(prefix):
                found.append(line[len(prefix):])
                break
    if found:
        return "\n".join(found)
    if any(line.startswith("Traceback ") for line in lines):
        return lines[-1]
    if lines:
        return "\n".join(lines[-5:])
    tail = stdout.strip()[-500:]
    return tail or "unitgen failed and printed nothing"


def address_parts(address: str) -> tuple[str, int | None]:
    """``"0.0.0.0:8000"`` or ``"[::]:8000"`` -> (host, port)."""
    host, _, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return host, int(port)
    except ValueError:
        return address, None
