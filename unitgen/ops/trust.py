"""System units, and supervisord's programs, run the deploying interpreter and
unitgen's own modules as root (the probe, the GPU wait, the wrappers). Whoever
can change any file that interpreter reads at start-up gets root. So a deploy
that root will run refuses an interpreter or package a non-root user can
write; docs/production.md says how to install unitgen for production.

What is checked, each file and every directory above it (a writable parent
lets its owner swap the file):

* the interpreter as the units name it (a venv's ``bin/python`` symlink) and
  where it really lives;
* all of ``sys.prefix`` that Python reads: ``pyvenv.cfg`` and the whole of the
  site-packages directories, where ``site`` runs every ``*.pth`` file even
  under ``-I`` (an editable install is one);
* the standard library in ``sys.base_prefix``;
* unitgen's package and its templates (wherever an editable install keeps them).
"""

from __future__ import annotations

import os
import stat
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

import unitgen
from unitgen.errors import UnitgenError
from unitgen.targets.base import templates_dir

__all__ = ["UnsafeInstallError", "check_trusted", "secret_file_problem", "trusted_roots",
           "untrusted_paths"]


class UnsafeInstallError(UnitgenError):
    """The code that system units would run as root is writable by others."""


def _problem(path: Path, st: os.stat_result) -> str | None:
    if st.st_uid != 0:
        return f"{path} is owned by uid {st.st_uid}, not root"
    sticky = bool(st.st_mode & stat.S_ISVTX) and stat.S_ISDIR(st.st_mode)
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky and not stat.S_ISLNK(st.st_mode):
        return f"{path} is writable by its group or by everyone"
    return None


def secret_file_problem(path: Path, *, root: bool = True) -> str | None:
    """Why a file of keys that root hands to a service (a gateway's
    ``api_keys_file``) is not root's alone: by the rule above, it and every
    directory above it (where it really is, too) must be root's and writable by
    root alone, and the file readable by its owner alone (``root=False``, a
    user manager's: that last rule only). None when it is, or when it does not
    exist (HAProxy's own check at deploy says so)."""
    real = Path(os.path.realpath(path))
    try:
        st = real.stat()
    except OSError:
        return None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        return (f"{path} is readable or writable by its group or by others (mode "
                f"{stat.S_IMODE(st.st_mode):04o})")
    if not root:
        return None
    for p in dict.fromkeys((path, *path.parents, real, *real.parents)):
        try:
            why = _problem(p, p.lstat())
        except OSError:
            continue
        if why:
            return why
    return None


def _walk(top: Path, skip: frozenset[Path] = frozenset()) -> Iterator[Path]:
    """``top`` and everything under it but ``skip`` (links are not followed, but checked)."""
    yield top
    for root, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if Path(root) / d not in skip]
        for name in (*dirs, *files):
            yield Path(root) / name


def trusted_roots(python: str, package: Path | None = None) -> tuple[list[Path], list[Path]]:
    """(single paths, trees) whose every file the check reads: see the module doc."""
    package = package or Path(unitgen.__file__).resolve().parent
    singles = [Path(python), Path(os.path.realpath(python))]
    prefix = Path(sys.prefix)
    singles.append(prefix / "pyvenv.cfg")
    trees = [package, templates_dir()]
    purelib = {sysconfig.get_path(k, vars={"base": sys.prefix, "platbase": sys.prefix})
               for k in ("purelib", "platlib")}
    trees += [Path(p) for p in sorted(purelib)]
    trees.append(Path(sysconfig.get_path("stdlib", vars={"installed_base": sys.base_prefix})))
    return singles, [t for t in trees if t.exists()]


def _not_loaded(trees: list[Path]) -> frozenset[Path]:
    """The base interpreter's own site-packages inside its stdlib tree: a venv
    (without system site packages) never reads it; otherwise it is the prefix's
    site-packages and is walked as a tree of its own."""
    cfg = Path(sys.prefix) / "pyvenv.cfg"
    try:
        shared = "include-system-site-packages = true" in cfg.read_text(encoding="utf-8").lower()
    except OSError:
        shared = False
    if shared:
        return frozenset()
    return frozenset(t / "site-packages" for t in trees) - frozenset(trees)


def untrusted_paths(python: str, package: Path | None = None) -> list[str]:
    """Why the interpreter, its environment or unitgen's package (and the
    directories above them) could be changed by a non-root user; empty when
    only root can."""
    singles, trees = trusted_roots(python, package)
    skip = _not_loaded(trees)
    paths: Iterable[Path] = [*singles, *(p for tree in trees for p in _walk(tree, skip))]
    seen: set[Path] = set()
    found: list[str] = []
    for path in paths:
        for p in (path, *path.parents):
            if p in seen:
                break  # its parents were checked with it
            seen.add(p)
            try:
                st = p.lstat()
            except OSError:
                continue
            why = _problem(p, st)
            if why:
                found.append(why)
    return found


def check_trusted(python: str) -> None:
    """Refuse a deploy whose units root would run with code a non-root user can write."""
    found = untrusted_paths(python)
    if found:
        listed = "; ".join(found[:5]) + (f"; and {len(found) - 5} more" if len(found) > 5 else "")
        raise UnsafeInstallError(
            f"root would run {python} and unitgen's modules, but a non-root user can change "
            f"what they load ({listed}). Install unitgen root-owned for production "
            "(docs/production.md: `python3 -m venv /opt/unitgen && /opt/unitgen/bin/pip install "
            "unitgen-units`), or deploy with --user")
