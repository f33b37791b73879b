"""Which unitgen instance, of which manager, runs a process: systemd's unit
names read back from ``/proc/PID/cgroup``.

This is systemd's naming (``NAME.service``, ``NAME-backend.service``, a user's
manager in ``user@UID.service``), kept out of ``plan/``, which knows no unit
names. It lives in ``inunit/`` because the GPU wait, running inside a unit,
needs it (``inunit/`` imports only ``inunit/``), and so do the GPU inventory
(:mod:`unitgen.inunit.nvml`, given it as its owner function), ``status`` and
``unitgen gpus``.

Supervisord's programs are not told apart here: they all live in the cgroup
of supervisord itself, so their processes are attributed to whatever unit
runs supervisord (none, when it is not a ``system.slice``/``app.slice``
service), never to a program.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["Owner", "instance_of_pid", "manager_of_scope", "unit_of_cgroup"]

Owner = tuple[str, str]  # (instance, manager): manager is "system" or "user@UID"

_UNIT_CGROUP = re.compile(
    r"^(?P<root>.*?)/(?P<slice>system\.slice|app\.slice)/"
    r"(?P<name>[a-z0-9][a-z0-9-]*?)(?:-backend)?\.service(?:/.*)?$")


_USER_MANAGER = re.compile(r"/user@(?P<uid>\d+)\.service$")


def manager_of_scope(scope: str) -> str:
    """The manager unitgen talks to for ``scope``, named as :func:`unit_of_cgroup`
    names a process's: ``system``, or ``user@UID`` for this user's own manager."""
    return "system" if scope == "system" else f"user@{os.getuid()}"


def unit_of_cgroup(text: str) -> Owner | None:
    """(instance, manager) from the text of /proc/PID/cgroup: ``system`` for
    ``/system.slice/NAME(-backend).service``, ``user@UID`` for the user manager
    of UID, ``.../user@UID.service/app.slice/NAME(-backend).service`` (two users'
    managers may each run a ``qwen2``); None otherwise. Reads the cgroup2 line,
    or systemd's named v1 hierarchy on hybrid hosts."""
    for line in text.splitlines():
        _, controllers, path = ([*line.split(":", 2), "", ""])[:3]
        if controllers not in ("", "name=systemd"):
            continue
        match = _UNIT_CGROUP.fullmatch(path)
        if not match:
            continue
        root, kind = match.group("root"), match.group("slice")
        if kind == "system.slice" and root == "":
            return match.group("name"), "system"
        user = _USER_MANAGER.search(root)
        if kind == "app.slice" and user:
            return match.group("name"), f"user@{user.group('uid')}"
    return None


def instance_of_pid(pid: int | str) -> Owner | None:
    """(instance, manager) of the unit that runs ``pid`` (``"self"``: this process)."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    return unit_of_cgroup(text)
