"""What a container's bind (``volumes = ["HOST:CONTAINER[:ro]"]``) may be: host
paths it must never be, hold or be inside, and system directories it may bind
read-only only (docs/containers.md). Pure and standard library only, because it is
judged twice: by the plan on the path as written, and at every start of the
container on the path as the host has it then (:mod:`unitgen.inunit.binds`,
which ``unitgen.inunit.podrun`` runs as root just before podman)."""

from __future__ import annotations

import posixpath
from collections.abc import Callable

__all__ = ["NEVER", "READ_ONLY", "check_volumes", "judge", "normalise", "split_volume"]

ProblemSink = Callable[[str, str], None]

# Host paths a bind may not be, hold or be inside: the kernel's and the
# manager's interfaces, root's home, container storage, unitgen's secrets and
# the password files (root in the container is root on the host: no user
# namespace). "/" holds them all.
NEVER = ("/proc", "/sys", "/dev", "/run", "/var/run", "/boot", "/root", "/var/lib/containers",
         "/etc/unitgen", "/etc/shadow", "/etc/gshadow", "/etc/sudoers", "/etc/sudoers.d",
         "/etc/ssh", "/etc/credstore")
# Bound read-write, these would let the server change the host's programs.
READ_ONLY = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/etc", "/var/lib")


def normalise(path: str) -> str:
    """``path`` with ``.``, ``..`` and repeated slashes resolved as text. A leading
    ``//`` too: POSIX lets ``normpath`` keep exactly two (``//etc``), and Linux reads
    them as one, so judged as written ``//etc`` would be none of the paths above."""
    out = posixpath.normpath(path)
    return "/" + out.lstrip("/") if out.startswith("/") else out


def split_volume(volume: str) -> tuple[str, str, str]:
    """``HOST:CONTAINER[:ro|rw]`` as (host, container, mode); mode ``rw`` when unsaid."""
    host, _, rest = volume.partition(":")
    inside, _, mode = rest.partition(":")
    return host, inside, mode or "rw"


def _within(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def judge(path: str, mode: str, never: tuple[str, ...] = ()) -> str | None:
    """Why binding host ``path`` with ``mode`` (``ro``/``rw``) would hand the
    container the host; None when it would not. ``path`` is normalised first."""
    path = normalise(path)
    bad = next((p for p in (*NEVER, *never) if _within(path, p) or _within(p, path)), None)
    if bad:
        return (f"{path} is or holds {bad}, which a container must not see (root inside is "
                "root on the host); bind the directory the server needs")
    if mode == "rw" and any(_within(path, p) or _within(p, path) for p in READ_ONLY):
        return f"{path} is a system directory: bind it read-only (HOST:CONTAINER:ro)"
    return None


def check_volumes(volumes: tuple[str, ...], problem: ProblemSink,
                  secrets_dirs: tuple[str, ...] = ()) -> None:
    """Refuse binds that hand the container the host (see the lists above), as
    written; each start judges them again on the host."""
    for i, vol in enumerate(volumes):
        host, _, mode = split_volume(vol)
        why = judge(host, mode, secrets_dirs)
        if why:
            problem(f"volumes[{i}]", f"{vol!r}: {why}")
