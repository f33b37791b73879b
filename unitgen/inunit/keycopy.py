"""Give a service's own user a copy of a root-only secret file, in its
runtime directory: what a gateway's unit runs as root before HAProxy starts
and before each reload (``ExecStartPre=+``, ``ExecReload=+``), so that
HAProxy, which runs as a dynamic user, reads the API keys it sends its
members, and reads them again at every reload (systemd's ``LoadCredential=``
copies a file only at start). Standard library only.

    python -I -m unitgen.inunit.keycopy SOURCE DEST

The copy belongs to DEST's directory's owner, mode 0400. It is written under a
fresh name and renamed over DEST: a reload reads the old file or the new one,
never half of one, and a link put in its place is replaced, not followed. A
missing SOURCE leaves an empty DEST (nothing to send). Run as root, SOURCE must
be root's alone (owned by root, no group or other bits), as unitgen writes it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import sys

__all__ = ["copy_for_owner", "main", "read_root_only", "write_for_owner"]


class _RefusedError(OSError):
    """SOURCE is not a file root alone can read and change."""


def _read(source: str) -> bytes:
    try:
        return read_root_only(source)
    except FileNotFoundError:
        return b""


def read_root_only(source: str) -> bytes:
    """The bytes of ``source``, a regular file (never through a link); run as
    root, it must be root's alone. FileNotFoundError when it is missing."""
    fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _RefusedError(f"{source} is not a regular file")
        if os.geteuid() == 0 and (st.st_uid != 0 or st.st_mode & 0o077):
            raise _RefusedError(f"{source} is not root's alone (owner uid {st.st_uid}, mode "
                           f"{stat.S_IMODE(st.st_mode):04o}): refusing to hand it on")
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def copy_for_owner(source: str, dest: str) -> None:
    """Copy ``source`` to ``dest``, owned by the owner of ``dest``'s directory."""
    write_for_owner(_read(source), dest)


def write_for_owner(data: bytes, dest: str) -> None:
    """Write ``data`` to ``dest`` (mode 0400), owned by the owner of ``dest``'s
    directory: under a fresh name, renamed over ``dest``."""
    directory, name = os.path.split(dest)
    dfd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        owner = os.fstat(dfd)
        tmp = f".{name}.{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o400, dir_fd=dfd)
        try:
            try:
                if os.geteuid() == 0:
                    os.fchown(fd, owner.st_uid, owner.st_gid)
                os.fchmod(fd, 0o400)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise
    finally:
        os.close(dfd)


def main(argv: list[str] | None = None) -> int:
    """The command line: SOURCE DEST; a message and exit 1 on failure."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -I -m unitgen.inunit.keycopy SOURCE DEST", file=sys.stderr)
        return 2
    try:
        copy_for_owner(args[0], args[1])
    except OSError as exc:
        print(f"unitgen keycopy: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
