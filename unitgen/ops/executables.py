"""Is the server program there, where the manager will look for it?

systemd looks a bare program name up on its own PATH (not the deploying
shell's), so `vllm` found in an activated venv is not found by the unit. This
resolves argv[0] the way the manager will and, when only the invoking user's
PATH has it, offers that absolute path as the fix.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from unitgen.errors import Problem
from unitgen.plan.instance import Instance

__all__ = ["SYSTEM_MANAGER_PATH", "missing_program"]

# The PATH systemd (252) gives services of the system manager.
SYSTEM_MANAGER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _runnable(path: Path, user: str | None) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode):
        return False
    if user:  # another user runs it: group/other execute bits (an estimate, not NSS)
        return bool(st.st_mode & (stat.S_IXGRP | stat.S_IXOTH))
    return os.access(path, os.X_OK)


def missing_program(inst: Instance, manager_path: str) -> Problem | None:
    """A problem naming the spec key when the manager cannot run the server's
    program; None when it can."""
    if inst.container is not None:
        return None  # the program is the image's (features.container checks podman and the image)
    program = inst.argv[0]
    spec = inst.spec
    key = "command[0]" if spec.backend == "custom" and not spec.executable else "executable"
    if program.startswith("/"):
        if _runnable(Path(program), spec.user):
            return None
        return Problem(spec.source, key, f"{program} is not an executable file on this host"
                       + (f" that user {spec.user} may run" if spec.user else ""))
    for directory in manager_path.split(":"):
        if directory and _runnable(Path(directory) / program, spec.user):
            return None
    hint = f'install {program} where the manager finds it, or set executable = "/path/to/{program}"'
    mine = shutil.which(program)
    if mine:
        hint = (f"it is on your PATH as {mine} (an activated venv?) but not on the manager's: "
                f'set executable = "{mine}"')
    return Problem(spec.source, key, f"{program} is not on the manager's PATH "
                   f"({manager_path}): {hint}")
