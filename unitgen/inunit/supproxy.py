"""``supwrap proxy``: hold the public socket supervisord passed as fd 0, wait
until the server answers on its private endpoint (sending nothing to a socket
of another uid), then run systemd-socket-proxyd on it as fd 3; stop the proxy
the moment the server exits, so clients wait in the socket's backlog while it
restarts.

supervisord runs it as root; once it has read the key (root's 0600 env file)
it becomes the server's user for good, before it connects anywhere: the
server's socket directory is the server's, and a link it puts in place of its
socket must lead nowhere the server itself could not go (systemd-socket-proxyd
connects by path for every client and checks no peer). Standard library only."""

from __future__ import annotations

import argparse
import json  # noqa: F401 - loaded before the drop to the server's user (see proxy())
import os
import select
import signal
import socket
import sys
import time
from types import FrameType

from unitgen.inunit.envfile import become, read_env_file, user_ids
from unitgen.inunit.probe import attempt

__all__ = ["fd0_to_fd3", "listener_pid", "proxy"]


def fd0_to_fd3(env: dict[str, str]) -> None:
    os.dup2(0, 3)
    os.set_inheritable(3, True)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    env["LISTEN_FDS"] = "1"
    env["LISTEN_PID"] = str(os.getpid())  # exec keeps the pid
    env.pop("LISTEN_FDNAMES", None)



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
            fd0_to_fd3(env)
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


def proxy(ns: argparse.Namespace) -> int:
    key = None
    try:
        if ns.key_env:
            key = read_env_file(ns.env_file).get(ns.key_env) if ns.env_file else None
            key = key or os.environ.get(ns.key_env)
        # the server's uid: a connection to the private port whose other end
        # another uid created (a squatter in a restart gap) gets no byte
        server_uid = user_ids(ns.server_user)[0] if ns.server_user else os.geteuid()
        # The public socket (fd 0) is already ours. What the probe imports late
        # (json, for an answer's summary) is loaded above: the interpreter's
        # library may be out of the server user's reach (a venv under /root).
        become(ns.server_user, None)
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
