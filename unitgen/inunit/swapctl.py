"""What both halves of a swap-group member's proxy say to the world: systemctl
for the manager the unit runs under, a line for the journal, a status line for
systemd. :mod:`unitgen.inunit.swapproxy` (the turn) and
:mod:`unitgen.inunit.swapforward` (the forwarding) import this; it imports
neither.

Standard library only, and no asyncio: the proxy imports it before it takes
the turn, when every millisecond of start-up delays the waiting request.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys

__all__ = ["Systemctl", "log", "notify", "parse_show", "uid_of"]


def log(message: str) -> None:
    """One line for the journal."""
    print(f"swap: {message}", file=sys.stderr, flush=True)


def notify(text: str) -> None:
    """Tell systemd a status line (shown by systemctl status and unitgen status)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        s.sendall(f"STATUS={text}".encode())


class Systemctl:
    """systemctl for the manager this unit runs under."""

    def __init__(self, scope: str) -> None:
        self.base = ["systemctl", "--no-ask-password"] + (["--user"] if scope == "user" else [])

    def popen(self, *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen([*self.base, *args], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)

    def conflicts(self, unit: str) -> subprocess.Popen[str]:
        """``systemctl show -p Conflicts`` of ``unit``, started (read its stdout)."""
        return subprocess.Popen([*self.base, "show", unit, "-pConflicts", "--value"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def popen_show(self, units: list[str], *props: str) -> subprocess.Popen[str]:
        """``systemctl show`` of several units, started (read with :func:`parse_show`)."""
        return subprocess.Popen([*self.base, "show", *units, "-pId", *(f"-p{p}" for p in props)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.base, *args], capture_output=True, text=True, check=False)

    def show(self, units: list[str], *props: str) -> dict[str, dict[str, str]]:
        """Properties of several units in one call: unit -> property -> value."""
        done = self.run("show", *units, "-pId", *(f"-p{p}" for p in props))
        return parse_show(done.stdout, units, props)


def parse_show(text: str, units: list[str], props: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """``systemctl show`` of several units: one block per unit, blocks apart by
    an empty line, each in the manager's order of properties (a service's
    ``MainPID`` and ``Result`` come before the unit's ``Id``)."""
    out = {u: dict.fromkeys(props, "") for u in units}
    for block in text.split("\n\n"):
        values = dict(line.partition("=")[::2] for line in block.splitlines() if line)
        if values.get("Id"):
            shown = out.setdefault(values["Id"], dict.fromkeys(props, ""))
            shown.update((k, v) for k, v in values.items() if k in props)
    return out


def uid_of(state: dict[str, str]) -> int:
    """The uid a unit's server runs as: systemd's ``UID`` of its unit (a dynamic
    user's too), or, where the unit sets none, the manager's own (root, or the user)."""
    uid = state.get("UID", "")
    return int(uid) if uid.isdigit() else os.getuid()
