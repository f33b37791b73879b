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
    --listen-fd4 HOST:PORT  listen there as root and pass the socket as fd 4 (a
                      gateway's exporter; supervisord holds one socket a program)
    --credential NAME:PATH  copy the root-owned file PATH to --mkdir's NAME, the
                      user's, 0400 (systemd's LoadCredential=)
    --gw-keys PATH, --gw-metrics-keys PATH, --gw-models PATH
                      a gateway's keys files (root's) as HAProxy maps in --mkdir,
                      the user's, 0400 (unitgen.inunit.gwkeys)
    --gw-member-keys PATH  the API keys a gateway sends its members (root's
                      alone, 0600) copied to --mkdir's member-keys.map, the
                      user's, 0400; missing: an empty map (unitgen.inunit.keycopy)

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
import os
import pwd
import signal
import socket
import sys
import time
from types import FrameType

from unitgen.inunit.envfile import (
    become,
    copy_credential,
    listen_on_fd,
    own_directory,
    read_env_file,
    user_ids,
)
from unitgen.inunit.gwkeys import MEMBER_KEYS, write_maps
from unitgen.inunit.keycopy import copy_for_owner
from unitgen.inunit.supproxy import fd0_to_fd3, proxy

__all__ = ["main"]

EXIT_USAGE = 2


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


def _why(exc: Exception) -> str:
    if isinstance(exc, KeyError):
        return f"no such user {exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return str(exc)


def _exec(ns: argparse.Namespace) -> int:
    env = dict(os.environ)
    try:
        uid, gid, _ = user_ids(ns.user)
        if ns.mkdir:
            own_directory(ns.mkdir, uid, gid)
        if ns.credential:
            copy_credential(ns.credential, ns.mkdir, uid, gid)
        if ns.gw_models and ns.mkdir:
            write_maps(ns.gw_keys, ns.gw_models, ns.mkdir, ns.gw_metrics_keys)
        if ns.gw_member_keys and ns.mkdir:
            copy_for_owner(ns.gw_member_keys, os.path.join(ns.mkdir, MEMBER_KEYS))
        if ns.listen_fd4:
            listen_on_fd(ns.listen_fd4, 4)
        if ns.env_file:
            env.update(read_env_file(ns.env_file, ns.env_digest))
        become(ns.user, ns.bind_port)
    except (OSError, KeyError, ValueError) as exc:
        print(f"unitgen supwrap: {_why(exc)}; not starting the server", file=sys.stderr)
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
        fd0_to_fd3(env)
    try:
        os.execvpe(ns.argv[0], ns.argv, env)  # noqa: S606 - exec is the job; argv, no shell
    except OSError as exc:
        print(f"unitgen supwrap: cannot run {ns.argv[0]}: {exc.strerror}", file=sys.stderr)
    return 127


def _hold(ns: argparse.Namespace) -> int:
    try:
        uid, gid, _ = user_ids(ns.user)
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
        become(ns.user, None)  # it only hands the socket on: no root needed for that
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
    e.add_argument("--listen-fd4")
    e.add_argument("--credential")
    e.add_argument("--gw-keys")
    e.add_argument("--gw-metrics-keys")
    e.add_argument("--gw-models")
    e.add_argument("--gw-member-keys")
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
    return proxy(ns)


if __name__ == "__main__":
    sys.exit(main())
