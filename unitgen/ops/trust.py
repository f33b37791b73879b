"""System units run the deploying interpreter and unitgen's own modules as root
(the probe, the GPU wait). Whoever can change those files gets root. So a
system-scope deploy refuses an interpreter or package that a non-root user can
write; docs/production.md says how to install unitgen for production."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import unitgen
from unitgen.errors import UnitgenError

__all__ = ["UnsafeInstallError", "check_trusted", "untrusted_paths"]


class UnsafeInstallError(UnitgenError):
    """The code that system units would run as root is writable by others."""


def _problem(path: Path) -> str | None:
    try:
        st = path.stat()
    except OSError:
        return None
    if st.st_uid != 0:
        return f"{path} is owned by uid {st.st_uid}, not root"
    sticky = bool(st.st_mode & stat.S_ISVTX) and stat.S_ISDIR(st.st_mode)
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky:
        return f"{path} is writable by its group or by everyone"
    return None


def untrusted_paths(python: str, package: Path | None = None) -> list[str]:
    """Why the interpreter or unitgen's package (and the directories above them)
    could be changed by a non-root user; empty when only root can."""
    package = package or Path(unitgen.__file__).resolve().parent
    paths: list[Path] = [Path(os.path.realpath(python))]
    paths += [package, *sorted(package.rglob("*.py"))]
    seen: set[Path] = set()
    found: list[str] = []
    for path in paths:
        for p in (path, *path.parents):
            if p in seen:
                continue
            seen.add(p)
            why = _problem(p)
            if why:
                found.append(why)
    return found


def check_trusted(python: str) -> None:
    """Refuse a system deploy whose units would run code a non-root user can write."""
    found = untrusted_paths(python)
    if found:
        listed = "; ".join(found[:5]) + ("; ..." if len(found) > 5 else "")
        raise UnsafeInstallError(
            f"system units would run {python} and unitgen's modules as root, but a non-root "
            f"user can change them ({listed}). Install unitgen root-owned for production "
            "(docs/production.md: `python3 -m venv /opt/unitgen && /opt/unitgen/bin/pip install "
            "unitgen-units`), or deploy with --user")
