"""Small wrappers that supervisord runs (the supervisor target has no unit
directives for these jobs). Standard library only.

``exec``: prepare and exec the server, keeping its pid. supervisord runs it as
root; it becomes the server's user only after the steps that need root:
    --mkdir DIR       create the directory of its private Unix socket (mode 0700,
                      owned by --user), never following a link; DIR's parent must
                      be writable by root only
    --env-file FILE   the server's environment: NAME=VALUE lines, values escaped
                      (read_env_file); all of it, API keys included, never in a
                      conf file or argv; FILE must be root's, mode 0600 (read
                      before --user)
    --env-digest D    refuse to start unless FILE's plain variables (above its
                      secrets) have this digest: the conf file and the env file
                      are of one deploy
    --user NAME       run the server as this user (its groups), for good
    --bind-port N     the server's privileged private port: with --user it keeps
                      CAP_NET_BIND_SERVICE, and binds no other privileged port
    --fd3             the socket supervisord passed as fd 0 becomes fd 3 with
                      LISTEN_FDS=1 and LISTEN_PID (what systemd would pass)
    --fd3-from PATH   the same with the socket received from ``hold --serve PATH``

``hold``: for a server that takes its socket (``socket_activation = true``):
hold the public socket supervisord passed as fd 0 for as long as supervisord
runs this program, and hand it (SCM_RIGHTS) to whoever connects to
``--serve PATH``. The server's ``exec --fd3-from PATH`` receives it as fd 3, so
the socket outlives a crash of the server and clients wait in its backlog
while it restarts (supervisord itself closes a fcgi socket when the process
that holds it exits).

``proxy``: hold the public socket supervisord passed as fd 0; wait until the
server answers its health path on the private endpoint; then run
systemd-socket-proxyd with the socket as fd 3. When the private endpoint stops
accepting (the server died) the proxy is stopped and the wait starts again, so
clients queue in the socket's backlog instead of being reset.

    python -m unitgen.inunit.supwrap exec --mkdir /run/unitgen/unitgen-x -- vllm serve ...
    python -m unitgen.inunit.supwrap proxy --private 127.0.0.1:20001 --path /health -- \\
        /lib/systemd/systemd-socket-proxyd 127.0.0.1:20001
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import pwd
import re
import select
import signal
import socket
import stat
import sys
import time
from types import FrameType

from unitgen.inunit.confine import confine_binds, drop_to_user
from unitgen.inunit.probe import attempt

__all__ = ["main"]

EXIT_USAGE = 2


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


def _user(name: str | None) -> tuple[int, int, list[int]]:
    """uid, gid and groups of ``name``; this process's own without a name."""
    if not name:
        return os.getuid(), os.getgid(), os.getgroups()
    entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid, os.getgrouplist(name, entry.pw_gid)


def _become(name: str | None, bind_port: int | None) -> None:
    """Drop to ``name`` for good (keeping only the right to bind ``bind_port``),
    then confine binds to that one privileged port."""
    if name and os.geteuid() == 0:
        uid, gid, groups = _user(name)
        drop_to_user(uid, gid, groups, keep_bind=bind_port is not None)
    if bind_port is not None:
        why = confine_binds([bind_port])
        if why:
            print(f"unitgen supwrap: warning: {why}", file=sys.stderr, flush=True)


def _fd0_to_fd3(env: dict[str, str]) -> None:
    os.dup2(0, 3)
    os.set_inheritable(3, True)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    env["LISTEN_FDS"] = "1"
    env["LISTEN_PID"] = str(os.getpid())  # exec keeps the pid
    env.pop("LISTEN_FDNAMES", None)


def receive_socket(path: str, timeout: float = 30.0) -> int:
    """The listening socket that ``hold`` serves at ``path`` (waits for it to start)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(5.0)
                conn.connect(path)
                _, fds, _, _ = socket.recv_fds(conn, 16, 1)
                if fds:
                    return fds[0]
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise OSError(f"no socket from {path} within {timeout:g} s")
        time.sleep(0.05)


def _exec(ns: argparse.Namespace) -> int:
    env = dict(os.environ)
    try:
        uid, gid, _ = _user(ns.user)
        if ns.mkdir:
            own_directory(ns.mkdir, uid, gid)
        if ns.env_file:
            env.update(read_env_file(ns.env_file, ns.env_digest))
        _become(ns.user, ns.bind_port)
    except (OSError, KeyError) as exc:
        why = exc.strerror or str(exc) if isinstance(exc, OSError) else f"no such user {exc}"
        print(f"unitgen supwrap: {why}; not starting the server", file=sys.stderr)
        return 1
    if ns.user:
        entry = pwd.getpwnam(ns.user)
        env.update(HOME=entry.pw_dir, USER=ns.user, LOGNAME=ns.user)
    if ns.fd3_from:
        try:
            fd = receive_socket(ns.fd3_from)
        except OSError as exc:
            print(f"unitgen supwrap: {exc}", file=sys.stderr)
            return 1
        os.dup2(fd, 0)
        os.close(fd)
        ns.fd3 = True
    if ns.fd3:
        _fd0_to_fd3(env)
    try:
        os.execvpe(ns.argv[0], ns.argv, env)  # noqa: S606 - exec is the job; argv, no shell
    except OSError as exc:
        print(f"unitgen supwrap: cannot run {ns.argv[0]}: {exc.strerror}", file=sys.stderr)
    return 127


def _accepting(target: str) -> bool:
    """False only when the endpoint definitely refuses (nothing listens)."""
    if target.startswith("/"):
        family, addr = socket.AF_UNIX, target
        sock = socket.socket(family, socket.SOCK_STREAM)
        where: object = addr
    else:
        host, _, port = target.rpartition(":")
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        where = (host, int(port))
    sock.settimeout(2.0)
    try:
        sock.connect(where)  # type: ignore[arg-type]  # a path or (host, port)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True  # busy or slow is not dead
    finally:
        sock.close()
    return True


def _hold(ns: argparse.Namespace) -> int:
    try:
        uid, gid, _ = _user(ns.user)
        own_directory(os.path.dirname(ns.serve), uid, gid)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ns.serve)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(ns.serve)
        os.chmod(ns.serve, 0o600)
        if os.geteuid() == 0:
            os.chown(ns.serve, uid, gid, follow_symlinks=False)
        server.listen(16)
        public = socket.socket(fileno=os.dup(0))
        _become(ns.user, None)  # it only hands the socket on: no root needed for that
    except (OSError, KeyError) as exc:
        why = exc.strerror or str(exc) if isinstance(exc, OSError) else f"no such user {exc}"
        print(f"unitgen hold: {why}", file=sys.stderr)
        return 1

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    print(f"unitgen hold: holding {public.getsockname()}; serving it at {ns.serve}",
          file=sys.stderr, flush=True)
    try:
        while True:
            conn, _ = server.accept()
            with conn, contextlib.suppress(OSError):
                socket.send_fds(conn, [b"\0"], [public.fileno()])
    finally:
        with contextlib.suppress(OSError):
            os.unlink(ns.serve)


def _listening_inodes(target: str) -> set[str]:
    """Inodes of the listening socket(s) at ``target``, from /proc/net."""
    found: set[str] = set()
    if target.startswith("/"):
        try:
            with open("/proc/net/unix", encoding="utf-8") as fh:
                for line in fh.read().splitlines()[1:]:
                    fields = line.split()
                    # Flags 00010000 = __SO_ACCEPTCON: a listening socket
                    if len(fields) >= 8 and fields[7] == target and fields[3] == "00010000":
                        found.add(fields[6])
        except OSError:
            pass
        return found
    port = int(target.rpartition(":")[2])
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="utf-8") as fh:
                for line in fh.read().splitlines()[1:]:
                    fields = line.split()
                    if len(fields) > 9 and fields[3] == "0A" and \
                            int(fields[1].rpartition(":")[2], 16) == port:
                        found.add(fields[9])
        except OSError:
            pass
    return found


def listener_pid(target: str) -> int | None:
    """The process that holds the listening socket at ``target`` (the server),
    found through /proc; None when it cannot be seen."""
    inodes = {f"socket:[{i}]" for i in _listening_inodes(target)}
    if not inodes:
        return None
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            for fd in os.listdir(f"/proc/{entry}/fd"):
                if os.readlink(f"/proc/{entry}/fd/{fd}") in inodes:
                    return int(entry)
        except OSError:
            continue
    return None


def _watch(pid: int | None) -> int | None:
    """A pidfd that becomes readable the moment ``pid`` exits."""
    if pid is None:
        return None
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def _spawn_proxy(argv: list[str]) -> int:
    pid = os.fork()
    if pid == 0:  # child
        try:
            env = dict(os.environ)
            _fd0_to_fd3(env)
            os.execve(argv[0], argv, env)  # noqa: S606 - exec is the job; argv, no shell
        finally:
            os._exit(127)
    return pid


def _stop(pid: int, sig: int = signal.SIGTERM) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if os.waitpid(pid, os.WNOHANG)[0]:
            return
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _say(line: str) -> None:
    print(f"unitgen proxy: {line}", file=sys.stderr, flush=True)


def _proxy(ns: argparse.Namespace) -> int:
    key = None
    try:
        if ns.key_env:
            key = read_env_file(ns.env_file).get(ns.key_env) if ns.env_file else None
            key = key or os.environ.get(ns.key_env)
        # the server's uid: a connection to the private port whose other end
        # another uid created (a squatter in a restart gap) gets no byte
        server_uid = _user(ns.server_user)[0] if ns.server_user else os.geteuid()
    except (OSError, KeyError) as exc:
        why = exc.strerror or str(exc) if isinstance(exc, OSError) else f"no such user {exc}"
        _say(f"{why}; not starting")
        return 1
    child = 0
    stopping = False

    def on_term(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    interval = ns.interval
    while not stopping:
        started = time.monotonic()
        last = ""
        while not stopping:
            result = attempt(ns.private, ns.path, key, timeout=5.0, peer_uid=server_uid)
            if result.outcome == "ready":
                break
            if result.detail != last:
                _say(f"waiting for {ns.private}{ns.path}: {result.detail}")
                last = result.detail
            time.sleep(interval)
        if stopping:
            break
        server = listener_pid(ns.private)
        watch = _watch(server)
        _say(f"{ns.private} ready after {time.monotonic() - started:.1f} s (server pid "
             f"{server or 'not visible'}); forwarding")
        child = _spawn_proxy(ns.argv)
        while not stopping:
            done, status = os.waitpid(child, os.WNOHANG)
            if done:
                _say(f"systemd-socket-proxyd exited ({status}); waiting again")
                child = 0
                break
            if watch is not None:
                # wakes at once when the server exits: the proxy is gone before
                # supervisord has respawned it, so no client is forwarded to nothing
                died = bool(select.select([watch], [], [], interval)[0])
            else:
                time.sleep(interval)
                died = not _accepting(ns.private)
            if died:
                _stop(child, signal.SIGKILL)  # its connections died with the server
                child = 0
                _say(f"{ns.private}: the server exited; connections wait in the socket "
                     "until it answers again")
                break
        if watch is not None:
            os.close(watch)
    if child:
        _stop(child)
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m unitgen.inunit.supwrap",
                                description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    e = sub.add_parser("exec", help="prepare and exec the server")
    e.add_argument("--mkdir")
    e.add_argument("--env-file")
    e.add_argument("--env-digest", help="refuse an env file whose plain variables differ")
    e.add_argument("--fd3", action="store_true")
    e.add_argument("--fd3-from")
    e.add_argument("--user")
    e.add_argument("--bind-port", type=int)
    h = sub.add_parser("hold", help="hold fd 0 and hand it to the server (socket activation)")
    h.add_argument("--serve", required=True)
    h.add_argument("--user")
    x = sub.add_parser("proxy", help="hold fd 0, wait for the server, run the proxy on it")
    x.add_argument("--private", required=True)
    x.add_argument("--path", default="/health")
    x.add_argument("--key-env")
    x.add_argument("--env-file")
    x.add_argument("--interval", type=float, default=0.1)
    x.add_argument("--server-user", help="the user the server runs as (default: this one)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``python -m unitgen.inunit.supwrap``."""
    args = sys.argv[1:] if argv is None else argv
    if "--" not in args and args[:1] != ["hold"]:
        print("unitgen supwrap: the command goes after --", file=sys.stderr)
        return EXIT_USAGE
    if args[:1] == ["hold"]:
        return _hold(_parser().parse_args(args))
    cut = args.index("--")
    # options before "--", the command after it, taken as is (argparse would
    # read a word of the server's argv such as "--" or "-x" as its own)
    ns = _parser().parse_args(args[:cut])
    ns.argv = args[cut + 1:]
    if not ns.argv:
        print("unitgen supwrap: no command after --", file=sys.stderr)
        return EXIT_USAGE
    if ns.mode == "exec":
        return _exec(ns)
    return _proxy(ns)


if __name__ == "__main__":
    sys.exit(main())
