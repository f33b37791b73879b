"""The gateway's ``ExecReload=``: reload HAProxy, return once its new worker serves.

``kill -USR2 $MAINPID`` returns as soon as the signal is sent. HAProxy's master
then reads its configuration again and forks a new worker, some 100 ms later
(more for a large configuration); until then the previous worker answers with
the previous routes. A deploy that returned at the signal let the first request
for a model it had just added get the gateway's own 404 ("no such model here").

This program sends the same signal, then asks HAProxy's runtime API (the admin
socket; the old and the new worker share it, as they share the gateway's
socket) until a worker other than the one that answered before the signal says
it is not stopping, several times in a row. That worker runs the configuration
as written at the signal, with the gateway's socket in its loop; the master
has told the previous one to stop taking connections when it forked it, and
answers from a worker that is stopping are not counted. So when ``systemctl
reload`` (and with it ``unitgen deploy`` and ``remove``) returns, a client's
new request is routed by the new configuration. A master that refuses the new
configuration keeps the old worker: no new one answers, and this exits 1 at
``--timeout`` saying so.

The signal is sent only once the master takes it. While HAProxy's master
starts (and again while it re-executes itself for a reload) it blocks SIGUSR2
and then resets its handlers, which throws a pending one away: a reload asked
within some 40 ms of the master forking its worker was lost, and the previous
routes stayed. So the master's ``/proc/PID/status`` is read first, until it
catches SIGUSR2 and does not block it. Its workers then (its children, and the
one answering) are the old ones: the new worker is one not among them, so a
worker that served before the signal never passes for it. Each wait (the
master, a worker to tell apart, the new worker) is bounded by ``--timeout``.

Standard library only: it runs inside the gateway's unit, as its user.

    python -I -m unitgen.inunit.hareload --pid 1234 --admin /run/unitgen-llm/admin.sock
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import time

from unitgen.inunit.peer import connect_unix, foreign_peer
from unitgen.timespan import format_seconds, parse_timespan

__all__ = ["RELOAD_TIMEOUT", "before_signal", "main", "new_worker", "reload", "runtime_api",
           "serving", "takes_signal", "wait_taken", "worker"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
# answers in a row from new workers before the reload counts as done: an old
# worker not yet stopping would take its share of the connections to the socket
IN_A_ROW = 3
# How long a new worker may take to serve after a reload: it takes ~0.1 s, also
# for 800 servers (docs/gateway.md); a refused configuration never serves, and
# the reload fails at this bound (every target's).
RELOAD_TIMEOUT = 30.0


def runtime_api(sock: str | os.PathLike[str], command: str, timeout: float = 2.0) -> str:
    """One command to HAProxy's runtime API and its whole answer (OSError when
    the socket does not answer, or when it is not HAProxy's).

    The socket is in HAProxy's runtime directory, which HAProxy's user may
    change, and its callers may be root (``deploy``, ``status``, the keys'
    ``ExecReload=+``): the path is never followed through a link, and nothing
    is sent to a listener another uid than the directory's owner created."""
    path = os.fspath(sock)
    owner = os.lstat(os.path.dirname(path) or ".").st_uid
    with connect_unix(path, timeout) as s:
        why = foreign_peer(s, owner)
        if why is not None:
            raise OSError(errno.EPERM, f"{path}: {why}")
        s.sendall(command.encode() + b"\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.decode("utf-8", "replace")


def worker(sock: str, timeout: float = 2.0) -> tuple[int, bool] | None:
    """The worker that answers on the runtime API: its pid, and whether it is
    stopping (an old one finishing its requests). None: no answer."""
    try:
        info = runtime_api(sock, "show info", timeout)
    except OSError:
        return None
    fields = dict(line.split(": ", 1) for line in info.splitlines() if ": " in line)
    pid = fields.get("Pid", "")
    if not pid.isdigit():
        return None
    return int(pid), fields.get("Stopping", "0").strip() != "0"


def serving(sock: str) -> int | None:
    """The pid of a worker that answers and is not stopping (None: none did)."""
    for _ in range(5):  # a stopping worker may still answer: ask again
        found = worker(sock)
        if found is not None and not found[1]:
            return found[0]
    return None


def takes_signal(pid: int, sig: int) -> bool | None:
    """Whether process ``pid`` runs a handler for ``sig`` now (caught, not
    blocked by its main thread); None when its status cannot be read.
    ProcessLookupError when it is gone (or a zombie)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessLookupError(pid) from None
    except (OSError, ValueError):
        return None
    if fields.get("State", "").strip()[:1] in ("Z", "X"):
        raise ProcessLookupError(pid)
    try:
        caught, blocked = int(fields["SigCgt"], 16), int(fields["SigBlk"], 16)
    except (KeyError, ValueError):
        return None
    bit = 1 << (sig - 1)
    return bool(caught & bit) and not blocked & bit


def wait_taken(pid: int, sig: int, timeout: float, interval: float = 0.005) -> bool:
    """Wait until ``pid`` takes ``sig`` (True at once when that cannot be
    read: the signal is sent as before); False when it did not in ``timeout``.
    ProcessLookupError when the process is gone."""
    deadline = time.monotonic() + timeout
    while takes_signal(pid, sig) is False:
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def _children(pid: int) -> set[int]:
    """The processes ``pid`` forked that run now (HAProxy's master: its
    workers, old and new); none when that cannot be read."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
            return {int(w) for w in f.read().split()}
    except (OSError, ValueError):
        return set()


def before_signal(master: int, sock: str, timeout: float) -> tuple[set[int], str | None]:
    """What to do before SIGUSR2 goes to HAProxy's master: wait until the
    master takes the signal, then note its workers (to tell a new one from
    them: every child it has now, and the one serving); and why not to send it
    (the master did not take it within ``timeout``). ProcessLookupError when
    the master is gone."""
    if takes_signal(master, signal.SIGUSR2) is None:
        print(f"unitgen hareload: cannot read how pid {master} takes signals "
              f"(/proc/{master}/status): SIGUSR2 goes at once", file=sys.stderr, flush=True)
    if not wait_taken(master, signal.SIGUSR2, timeout):
        return set(), (f"HAProxy's master (pid {master}) did not take SIGUSR2 within "
                       f"{format_seconds(timeout)} (is it still starting?): HAProxy was not "
                       "reloaded, its routes are the previous ones (keys handed to its "
                       "running worker before this hold)")
    old = _children(master)
    deadline = time.monotonic() + timeout
    while (now := serving(sock)) is None and not old and time.monotonic() < deadline:
        time.sleep(0.02)  # nothing to tell a new worker from yet: one that serves
    return old | ({now} if now is not None else set()), None


def new_worker(sock: str, old: set[int], timeout: float,
               interval: float = 0.02) -> str | None:
    """After the signal: wait until a worker not in ``old`` serves,
    :data:`IN_A_ROW` answers in a row; None, or why not."""
    t0 = time.monotonic()
    seen = 0
    while True:
        found = worker(sock)
        if found is not None and not found[1]:
            seen = seen + 1 if found[0] not in old else 0
            if seen >= IN_A_ROW:
                print(f"unitgen hareload: new worker {found[0]} serves "
                      f"({time.monotonic() - t0:.2f} s after the signal)",
                      file=sys.stderr, flush=True)
                return None
        if time.monotonic() - t0 >= timeout:
            return (f"no new HAProxy worker answered within {format_seconds(timeout)} of the "
                    "reload: the master kept the previous one (did it refuse the new "
                    "configuration? its lines above say), so the previous routes still hold")
        time.sleep(interval)


def reload(master: int, sock: str, timeout: float, interval: float = 0.02) -> str | None:
    """Signal the master once it takes the signal, wait until new workers
    serve; None, or why not."""
    old, why = before_signal(master, sock, timeout)
    if why is not None:
        return why
    os.kill(master, signal.SIGUSR2)
    return new_worker(sock, old, timeout, interval)


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``python -m unitgen.inunit.hareload``."""
    ap = argparse.ArgumentParser(prog="unitgen hareload", description=__doc__.split("\n\n")[0])
    ap.add_argument("--pid", required=True, help="the HAProxy master's pid ($MAINPID)")
    ap.add_argument("--admin", required=True, help="the runtime API's Unix socket")
    ap.add_argument("--timeout", default="30s", help="how long the new worker may take")
    ns = ap.parse_args(argv)
    try:
        timeout = parse_timespan(ns.timeout)
    except ValueError as exc:
        print(f"unitgen hareload: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not ns.pid.isdigit() or int(ns.pid) == 0:
        print(f"unitgen hareload: --pid {ns.pid!r} is not a process id (is HAProxy running?)",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        why = reload(int(ns.pid), ns.admin, timeout)
    except ProcessLookupError:
        why = f"HAProxy's master (pid {ns.pid}) is gone"
    if why is not None:
        print(f"unitgen hareload: {why}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
