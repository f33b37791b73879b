"""What a supervisor wrapper does as root before it becomes the server's user:
read the root-owned env file (every value byte for byte; secrets below a
separator line), make the runtime directory without following a link, hand
the user a copy of a root-owned file there and a listening socket bound as
root (systemd's ``LoadCredential=`` and a second ``ListenStream=``), drop
privileges (keeping only the right to bind a privileged private port).
Standard library only."""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import re
import socket
import stat
import sys

from unitgen.inunit.confine import confine_binds, drop_to_user

__all__ = ["ENV_FILE_FORMAT", "ENV_SECRETS_LINE", "StaleEnvFileError", "UnsafeFileError",
           "become", "copy_credential", "env_digest", "listen_on_fd", "own_directory",
           "parse_env_text", "read_env_file", "read_env_text", "split_env_text", "user_ids"]


class UnsafeFileError(OSError):
    """A file or directory root uses could be changed by someone else."""


def _refuse_foreign(st: os.stat_result, path: str) -> None:
    """Root acts on ``path`` only when nobody but root can change it."""
    if os.geteuid() != 0:
        return  # a non-root supervisord: it can only act as itself anyway
    if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeFileError(f"{path} is not root's alone (owner uid {st.st_uid}, mode "
                              f"{stat.S_IMODE(st.st_mode):04o}): refusing to use it as root")


# unitgen writes this line into every env file whose values are escaped
# (unitgen.targets.supervisor.escape.ENV_FILE_FORMAT, the writer's copy): there
# a backslash followed by a backslash, "n" or "r" stands for a backslash, a line
# feed or a carriage return, so a value of any characters but NUL fits on its
# line. Secret files written before it (raw one-line values) are read as written.
ENV_FILE_FORMAT = "# unitgen-env-format: escaped"
ENV_SECRETS_LINE = "# unitgen-secrets: below"  # the plain variables are above it
_ENV_ESCAPE = re.compile(r"\\([\\nr])")
_ENV_UNESCAPES = {"\\": "\\", "n": "\n", "r": "\r"}


class StaleEnvFileError(OSError):
    """The env file does not hold the environment the program was configured with."""


def split_env_text(text: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """An env file's plain variables and its secrets, in file order."""
    lines = text.split("\n")
    escaped = ENV_FILE_FORMAT in lines
    plain: list[tuple[str, str]] = []
    secret: list[tuple[str, str]] = []
    into = plain
    for line in lines:
        if line == ENV_SECRETS_LINE:
            into = secret
        elif line and not line.startswith("#"):
            key, _, value = line.partition("=")
            into.append((key, _ENV_ESCAPE.sub(lambda m: _ENV_UNESCAPES[m[1]], value)
                         if escaped else value))
    return plain, secret


def parse_env_text(text: str) -> dict[str, str]:
    """The variables of an env file's text: ``NAME=VALUE`` lines; comments
    and empty lines skipped; values unescaped when the file says they are."""
    plain, secret = split_env_text(text)
    return dict(plain + secret)


def env_digest(pairs: list[tuple[str, str]]) -> str:
    """What ``--env-digest`` says of the plain variables (the renderer's copy:
    unitgen.targets.supervisor.escape.env_digest)."""
    h = hashlib.sha256()
    for name, value in pairs:
        h.update(f"{name}={value}\x00".encode())
    return h.hexdigest()[:16]


def read_env_text(path: str) -> str:
    """The text of an env file unitgen wrote. Run as root, the file must be
    root's and readable by root only: whoever could write it
    (``PYTHONPATH=...``) would run code as the server."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    # newline="": a carriage return is a value's byte, never a line break
    with os.fdopen(fd, encoding="utf-8", newline="") as fh:
        st = os.fstat(fd)
        _refuse_foreign(st, path)
        if os.geteuid() == 0 and st.st_mode & 0o077:
            raise UnsafeFileError(f"{path} is readable by others (mode "
                                  f"{stat.S_IMODE(st.st_mode):04o}, want 0600)")
        return fh.read()


def read_env_file(path: str, digest: str | None = None) -> dict[str, str]:
    """The variables of an env file (:func:`read_env_text`, :func:`parse_env_text`);
    with ``digest``, StaleEnvFileError unless its plain variables have it."""
    text = read_env_text(path)
    if digest is not None:
        found = env_digest(split_env_text(text)[0])
        if found != digest:
            raise StaleEnvFileError(f"{path} does not hold the environment this program was "
                                    f"deployed with (digest {found}, want {digest}): deploy "
                                    "the instance again")
    return parse_env_text(text)


def own_directory(path: str, uid: int, gid: int) -> None:
    """Create ``path`` (mode 0700) for ``uid``/``gid``, or take it over: never
    through a symlink (a link planted there would make root hand its target,
    /etc say, to the user), and only inside a directory root alone can write."""
    parent = os.path.dirname(path.rstrip("/")) or "/"
    os.makedirs(parent, mode=0o755, exist_ok=True)
    _refuse_foreign(os.stat(parent), parent)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if os.geteuid() == 0:
            os.fchown(fd, uid, gid)
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def copy_credential(spec: str, directory: str | None, uid: int, gid: int) -> str:
    """``NAME:PATH``: copy the file at PATH (root's alone: whoever could change
    it would choose what the program trusts) to ``directory/NAME``, the
    user's, mode 0400; the copy's path. ``directory`` is the user's own
    (:func:`own_directory`): the copy replaces whatever is there without
    following a link the user may have put in its place."""
    name, sep, source = spec.partition(":")
    if not sep or not name or "/" in name or name in (".", "..") or not source:
        raise ValueError(f"--credential {spec!r}: want NAME:PATH")
    if not directory:
        raise ValueError("--credential copies into --mkdir's directory: give both")
    fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFileError(f"{source} is not a regular file")
        _refuse_foreign(st, source)
        data = fh.read()
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dfd)
        # O_EXCL: a link planted again after the unlink fails the open, never followed
        out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o400, dir_fd=dfd)
        try:
            if os.geteuid() == 0:
                os.fchown(out, uid, gid)
            os.fchmod(out, 0o400)
            os.write(out, data)
        finally:
            os.close(out)
    finally:
        os.close(dfd)
    return os.path.join(directory, name)


def listen_on_fd(address: str, fd: int, backlog: int = 4096) -> None:
    """Listen on ``HOST:PORT`` (``[V6]:PORT``) as this process is now (root: a
    privileged port works) and put the socket at ``fd``, inheritable, for the
    program exec'ed after privileges are dropped."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{address!r} is not HOST:PORT")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, int(port)), family=family, backlog=backlog)
    if sock.fileno() != fd:
        os.dup2(sock.fileno(), fd, inheritable=True)
        sock.close()
    else:
        sock.detach()
        os.set_inheritable(fd, True)


def user_ids(name: str | None) -> tuple[int, int, list[int]]:
    """uid, gid and groups of ``name``; this process's own without a name."""
    if not name:
        return os.getuid(), os.getgid(), os.getgroups()
    entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid, os.getgrouplist(name, entry.pw_gid)


def become(name: str | None, bind_port: int | None) -> None:
    """Drop to ``name`` for good (keeping only the right to bind ``bind_port``),
    then confine binds to that one privileged port."""
    if name and os.geteuid() == 0:
        uid, gid, groups = user_ids(name)
        drop_to_user(uid, gid, groups, keep_bind=bind_port is not None)
    if bind_port is not None:
        why = confine_binds([bind_port])
        if why:
            print(f"unitgen supwrap: warning: {why}", file=sys.stderr, flush=True)
