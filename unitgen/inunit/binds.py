"""A container's bind sources, walked on the host as root just before podman runs
(``unitgen.inunit.podrun``, at every start; ``deploy`` runs the same walk to refuse
early). Standard library only.

podman and runc resolve a source path again when they mount it, after any check
of the spec: a local user who could put a link on that path after deploy would
get the container (root inside, root on the host) whatever the link points to.
Handing runc the checked object itself does not work: a ``/proc/PID/fd/N`` source
is refused by runc 1.1 ("invalid argument": the mount is made in the
container's new mount namespace, the descriptor's mount is in the host's;
measured). So a source is bound only when no user but root can change what its
path names until runc mounts it:

- no component is a symbolic link (the message names its target: bind that);
- every directory on the way (the source's own parent included) is root's and
  writable by root alone, or sticky (``/tmp``) with a root-owned entry below it,
  which only root may then rename; the source itself may be anyone's (its
  contents are the server's business, and its links resolve inside the container);
- no directory on the way is on a FUSE file system (its owner answers every lookup);
- a file that is no directory has one name only (a hard link could be any file);
- where the object really is (``/proc/self/fd``) passes the refusal lists of
  :mod:`unitgen.inunit.volumes`, the ones the plan used."""

from __future__ import annotations

import os
import posixpath
import pwd
import stat

from unitgen.inunit.volumes import judge, normalise

__all__ = ["why_not"]

_OPEN = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_FIX = "bind a path whose directories are root's alone (e.g. /srv/models/NAME; it may be "\
       "the user's own directory)"


def _fuse_mounts() -> set[str]:
    """The ids of the FUSE mounts this process sees (``/proc/self/mountinfo``)."""
    out = set()
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    for line in lines:
        fields, _, rest = line.partition(" - ")
        if rest.split(" ", 1)[0].startswith("fuse"):
            out.add(fields.split(" ", 1)[0])
    return out


def _mount_id(fd: int) -> str:
    with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as f:
        lines = f.read().splitlines()
    for line in lines:
        if line.startswith("mnt_id:"):
            return line.split(":", 1)[1].strip()
    return ""


def _owner(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _others_may_swap(parent: os.stat_result, entry: os.stat_result) -> str | None:
    """Why a user who is not root could make the entry's name in ``parent`` name
    something else (rename it away, put a link there); None if none could."""
    if parent.st_uid != 0:
        return f"is {_owner(parent.st_uid)}'s"
    if parent.st_mode & 0o022 and not (parent.st_mode & stat.S_ISVTX and entry.st_uid == 0):
        # a POSIX ACL's write grant shows in the group bits (its mask)
        return "is writable by users other than root"
    return None


def _walk(path: str, fuse: set[str]) -> tuple[int, str | None]:
    """The O_PATH descriptor of ``path`` (absolute, normalised), opened one
    component at a time without following a link, and why it may not be bound
    (None if it may). The caller closes the descriptor."""
    fd = os.open("/", _OPEN | os.O_DIRECTORY)
    here, entry = "/", os.fstat(fd)
    for name in path.split("/")[1:] if path != "/" else ():
        if _mount_id(fd) in fuse:
            return fd, f"{here} is on a FUSE file system, whose owner answers for what it holds"
        where = posixpath.join(here, name)
        try:
            child = os.open(name, _OPEN, dir_fd=fd)
        except FileNotFoundError:
            return fd, f"{where} does not exist"
        except NotADirectoryError:
            return fd, f"{here} is not a directory"
        except OSError as exc:
            return fd, f"{where}: {exc.strerror}"
        parent, entry = entry, os.fstat(child)
        if stat.S_ISLNK(entry.st_mode):
            target = os.readlink(name, dir_fd=fd)
            os.close(child)
            return fd, (f"{where} is a symbolic link (to {target}), which podman would follow "
                        "at every start wherever it then points; bind the path it points to")
        os.close(fd)
        fd = child
        swap = _others_may_swap(parent, entry)
        if swap:
            return fd, (f"{here} {swap}: they could put a link at {where} after this check, "
                        f"and the container (root inside) would get what it points to; {_FIX}")
        here = where
    if not stat.S_ISDIR(entry.st_mode) and entry.st_nlink > 1:
        return fd, (f"{path} has {entry.st_nlink} names (hard links), and may be any of them; "
                    "bind a file with one name, or its directory")
    return fd, None


def why_not(source: str, mode: str) -> str | None:
    """Why host path ``source`` may not be bound (``mode`` ``ro`` or ``rw``) on this
    host now; None if it may. Run as root: it reads every directory on the way."""
    path = normalise(source)
    if not path.startswith("/"):
        return f"{source} is not an absolute path"
    why = judge(path, mode)
    if why:
        return why
    fd, why = _walk(path, _fuse_mounts())
    try:
        # where the object is, as the kernel names it: judged by the same lists
        return why or judge(os.readlink(f"/proc/self/fd/{fd}"), mode)
    finally:
        os.close(fd)
