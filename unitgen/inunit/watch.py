"""Liveness after ready: the checker that feeds systemd's watchdog.

Run as the server unit's second ``ExecStartPost=``, so it starts only after the
readiness probe (the first one) saw the server answer. It detaches (the start
job ends at once), stays in the unit's cgroup, and from then on checks the
health path every third of ``--bound``, each check with its own deadline:

* an answer (2xx, or 401/403: the server is alive, only the key is missing)
  sends ``WATCHDOG=1``;
* no answer (a hang, refused, 5xx) sends nothing and logs why.

Its first message sets the unit's watchdog to ``--bound`` (``WATCHDOG_USEC=``),
so systemd itself kills the unit (``WatchdogSignal=``) and its restart policy
decides once the server has not answered for that long: three failed checks
by default. The bound is armed only here, after ready: loading is governed by
the start deadline, never by the watchdog. The health path is probed on a
connection of its own, so a slow model request (minutes for a long generation)
does not count as a hang.

Standard library only, and small: it runs next to every model server.

    python -I -m unitgen.inunit.watch --target /run/unitgen-x/http.sock --path /health --bound 30s
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time

from unitgen.inunit.probe import attempt
from unitgen.timespan import format_seconds, parse_timespan

__all__ = ["check_loop", "main"]

EXIT_USAGE = 2
CHECKS_PER_BOUND = 3


def notify(*fields: str) -> bool:
    """Send ``fields`` to the service manager (``$NOTIFY_SOCKET``); False when there is none."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto("\n".join(fields).encode(), addr)
    except OSError:
        return False
    return True


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def check_loop(target: str, path: str, bound: float, *, key: str | None = None,
               label: str = "", rounds: int | None = None, peer_uid: int | None = None) -> None:
    """Check every ``bound / 3`` seconds; feed the watchdog while the server answers.

    ``rounds`` bounds the loop (tests); units run it until systemd stops them.
    With ``peer_uid``, a check whose connection reached a socket of another uid
    (a squatter on a free private port, a link to another socket) sends nothing
    and counts as no answer, so a squatter cannot feed the watchdog of a dead
    server either."""
    where = f"{label} {target}{path}".strip()
    interval = bound / CHECKS_PER_BOUND
    failures = 0
    done = 0
    while rounds is None or done < rounds:
        started = time.monotonic()
        result = attempt(target, path, key, timeout=interval, peer_uid=peer_uid)
        done += 1
        if result.outcome in ("ready", "fatal"):
            # 401/403 is an answer: the server is alive, the key is the probe's business.
            if failures:
                notify("WATCHDOG=1", f"STATUS=answering again after {failures} failed check(s)")
                _say(f"liveness: {where} answers again ({result.detail}) after "
                     f"{failures} failed check(s)")
            else:
                notify("WATCHDOG=1")
            failures = 0
        else:
            failures += 1
            silent = failures * interval
            _say(f"liveness: {where} did not answer (check {failures}, {silent:.0f} s of "
                 f"{format_seconds(bound)}): {result.detail}")
            notify(f"STATUS=unhealthy: {where}: {result.detail}")
            if failures == CHECKS_PER_BOUND:
                _say(f"liveness: {where} did not answer for {format_seconds(bound)} "
                     f"({result.detail}): systemd's watchdog stops the server and its "
                     "restart policy decides")
        time.sleep(max(0.0, interval - (time.monotonic() - started)))


def _detach() -> bool:
    """Fork; the parent returns True (and should exit) once the child is running."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            ok = pipe.read(1) == b"1"
        if not ok:
            raise OSError("the liveness checker did not start")
        return True
    os.close(read_end)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.write(write_end, b"1")
    os.close(write_end)
    return False


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m unitgen.inunit.watch",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, help="host:port, [v6]:port, or a Unix socket path")
    p.add_argument("--path", default="/health", help="HTTP health path")
    p.add_argument("--bound", default="30s", help="restart after this long without an answer")
    p.add_argument("--key-env", default=None, help="variable holding the bearer key to send")
    p.add_argument("--label", default="", help="word printed before the target")
    p.add_argument("--foreground", action="store_true", help="do not detach")
    p.add_argument("--own-listener", action="store_true", help="send nothing unless the "
                   "other end of the connection was created by this checker's own uid")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point: arm the watchdog, detach, and check until stopped."""
    ns = _parser().parse_args(argv)
    try:
        bound = parse_timespan(ns.bound)
    except ValueError as exc:
        print(f"unitgen watch: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if bound < CHECKS_PER_BOUND:
        print("unitgen watch: --bound must be at least 3s", file=sys.stderr)
        return EXIT_USAGE
    key = os.environ.get(ns.key_env) if ns.key_env else None
    # The probe saw the server answer just now: arm the bound and feed it once.
    if not notify(f"WATCHDOG_USEC={round(bound * 1e6)}", "WATCHDOG=1"):
        _say("liveness: no NOTIFY_SOCKET (NotifyAccess=all missing?): nothing to feed; not watching")
        return 0
    _say(f"liveness: checking {ns.label} {ns.target}{ns.path} every "
         f"{format_seconds(bound / CHECKS_PER_BOUND)}; restart after {format_seconds(bound)} "
         "without an answer")
    if not ns.foreground and _detach():
        return 0
    check_loop(ns.target, ns.path, bound, key=key, label=ns.label,
               peer_uid=os.geteuid() if ns.own_listener else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
