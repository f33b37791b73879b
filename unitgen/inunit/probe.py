"""The readiness probe that units run as ``ExecStartPost=``.

Standard library only (it runs inside every unit, before anything else is
known to work). It polls an HTTP health path over TCP or a Unix socket about
every 100 ms and exits 0 as soon as it answers 2xx. Refused connections, a
missing socket, 503 and 404 mean "still loading"; 401/403 mean the probe cannot
authenticate and fail at once; at the deadline it exits 1 with one line that
says why. Progress goes to stderr (the journal) every few seconds and to the
unit's status line (``sd_notify STATUS=``, with ``NotifyAccess=all``).

Two guards make "ready" mean *this* server answered:

* ``--main-pid $MAINPID``: systemd does not end ``ExecStartPost=`` when the
  main process exits, so a server that dies while loading (a bad flag, a
  missing model, CUDA out of memory) would leave the start waiting for the
  whole deadline. The probe watches that pid and fails within one poll.
* ``--own-listener`` (private endpoints): after connecting and before sending
  a byte (the API key included), the probe checks that the other end of *this*
  connection was created by its own uid, the server's
  (:mod:`unitgen.inunit.peer`), so a squatter that bound the private port
  while the server was down gets nothing, however briefly it listens, and
  neither does a socket a link in the server's runtime directory points to.

The deadline covers each attempt as a whole, not each read: a server that
trickles one byte a second cannot keep the probe past it.

    python -m unitgen.inunit.probe --target 127.0.0.1:40001 --path /health --timeout 30min
    python -m unitgen.inunit.probe --target /run/unitgen-x/http.sock --path /health
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
import time

from unitgen.inunit.peer import connect_unix, foreign_peer
from unitgen.timespan import format_seconds, parse_timespan

__all__ = ["Attempt", "attempt", "main", "run"]

EXIT_READY = 0
EXIT_NOT_READY = 1
EXIT_USAGE = 2


class Attempt:
    """One poll's outcome: ``ready``, ``wait`` (still loading) or ``fatal``.

    A plain class, not a dataclass: importing dataclasses (and inspect) would
    cost every probe start-up about 8 ms, and the probe starts with every unit."""

    __slots__ = ("detail", "outcome")

    def __init__(self, outcome: str, detail: str) -> None:
        self.outcome = outcome
        self.detail = detail

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Attempt) and (self.outcome, self.detail)
                == (other.outcome, other.detail))

    def __hash__(self) -> int:
        return hash((self.outcome, self.detail))

    def __repr__(self) -> str:
        return f"Attempt(outcome={self.outcome!r}, detail={self.detail!r})"


def _connect(target: str, timeout: float) -> socket.socket:
    """A connected socket to ``host:port``, ``[v6]:port`` or a Unix socket path."""
    if target.startswith("/"):
        # never through a link: the server's directory is the server's to change
        return connect_unix(target, max(0.001, timeout))
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(max(0.001, timeout))
    try:
        sock.connect((host, int(port)))
    except BaseException:
        sock.close()
        raise
    return sock


def _exchange(sock: socket.socket, request: bytes, deadline: float) -> bytes:
    """Send the request, read the answer: until its Content-Length or its last
    chunk is in (a server may ignore ``Connection: close`` and keep the
    connection open), EOF, 4 KiB of body, or the deadline."""
    sock.sendall(request)
    data = b""
    while len(data) < 65536:
        if _complete(data):
            break
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        chunk = sock.recv(65536 - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _complete(data: bytes) -> bool:
    head_end = data.find(b"\r\n\r\n")
    if head_end < 0:
        return False
    body = len(data) - head_end - 4
    if body >= 4096:
        return True  # enough for the summary: a body that never ends cannot hold us
    headers = data[:head_end].lower()
    for line in headers.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip() == b"content-length" and value.strip().isdigit():
            return body >= int(value.strip())
        if name.strip() == b"transfer-encoding" and b"chunked" in value:
            return data.endswith(b"0\r\n\r\n")
    status = data.split(b" ", 2)[1:2]
    # no length: 1xx/204/304 have no body; otherwise the body ends at EOF
    return bool(status) and (status[0].startswith(b"1") or status[0] in (b"204", b"304"))


def _is_local(sock: socket.socket) -> bool:
    """The connection stays on this machine: a loopback destination, or one the
    kernel reaches from that same address (how it routes to its own addresses).
    Anything else left the machine (a FreeBind host not configured here), and
    gets no API key."""
    peer = ipaddress.ip_address(sock.getpeername()[0].partition("%")[0])
    mapped = getattr(peer, "ipv4_mapped", None)
    return bool(peer.is_loopback or (mapped is not None and mapped.is_loopback)
                or sock.getsockname()[0] == sock.getpeername()[0])


def _parse(raw: bytes) -> tuple[int, str, bytes]:
    if not raw:
        raise ValueError("the server closed the connection without an answer")
    head, sep, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2) if lines else []
    if not sep or len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ValueError("not an HTTP answer")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = _dechunk(body)
    return int(parts[1]), parts[2] if len(parts) > 2 else "", body[:4096]


def _dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            break
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2:]
    return out


def _summary(status: int, reason: str, body: bytes) -> str:
    import json  # noqa: PLC0415 - only an answer with a body to summarise pays for it

    text = body[:2000].decode("utf-8", "replace").strip()
    message = ""
    try:
        data = json.loads(text)
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict):
            message = str(err.get("message", ""))
        elif isinstance(err, str):
            message = err
        elif isinstance(data, dict) and "detail" in data:
            message = str(data["detail"])
    except ValueError:
        message = text
    message = " ".join(message.split())[:80]
    return f"{status} {message or reason}".strip()



def attempt(target: str, path: str, key: str | None, timeout: float = 5.0,
            *, peer_uid: int | None = None) -> Attempt:
    """Poll once within ``timeout`` seconds in all; never raises for network trouble.

    With ``peer_uid``, a connection whose other end another uid created gets
    nothing (see :func:`unitgen.inunit.peer.foreign_peer`)."""
    deadline = time.monotonic() + timeout
    lines = [f"GET {path} HTTP/1.1", "Host: localhost", "Connection: close",
             "User-Agent: unitgen-probe"]
    if key:
        lines.append(f"Authorization: Bearer {key}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
    try:
        with _connect(target, timeout) as sock:
            if sock.family != socket.AF_UNIX and not _is_local(sock):
                return Attempt("wait", f"{target} is not an address of this machine: nothing "
                                       "was sent to it")
            if peer_uid is not None:
                foreign = foreign_peer(sock, peer_uid)
                if foreign:
                    return Attempt("wait", foreign)
            raw = _exchange(sock, request, deadline)
        status, reason, body = _parse(raw)
    except FileNotFoundError:
        return Attempt("wait", "socket not created yet")
    except ConnectionRefusedError:
        return Attempt("wait", "connection refused")
    except TimeoutError:
        return Attempt("wait", f"no answer within {timeout:g} s")
    except ValueError as exc:
        return Attempt("wait", str(exc))
    except OSError as exc:
        return Attempt("wait", f"{type(exc).__name__}: {exc}".rstrip(": "))
    summary = _summary(status, reason, body)
    if 200 <= status < 300:
        return Attempt("ready", summary)
    if status in (401, 403):
        hint = ("the key the probe sent was refused" if key else
                "the server wants an API key the probe was not given: declare it in the spec "
                "(--api-key in args, or the server's key variable in env)")
        return Attempt("fatal", f"{summary}: {hint}")
    return Attempt("wait", summary)


def _start_ticks(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/PID/stat), or None when it is
    gone or a zombie: tells a live main process from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            fields = fh.read().rpartition(")")[2].split()
    except OSError:
        return None
    if len(fields) < 20 or fields[0] in ("Z", "X", "x"):
        return None
    return fields[19]


def _notify(message: str) -> None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(f"STATUS={message}".encode(), addr)
    except OSError:
        pass  # a status line is a courtesy; readiness does not depend on it


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
    _notify(line)


def run(
    target: str,
    path: str,
    timeout: float,
    *,
    key: str | None = None,
    label: str = "",
    interval: float = 0.05,
    progress_every: float = 5.0,
    main_pid: int | None = None,
    peer_uid: int | None = None,
) -> int:
    """Poll until ready (0) or the deadline, a fatal answer or the death of
    ``main_pid`` (1)."""
    where = f"{label} {target}{path}".strip()
    start = time.monotonic()
    deadline = start + timeout
    next_progress = start + progress_every
    ticks = _start_ticks(main_pid) if main_pid else None
    result = Attempt("wait", "no answer yet")
    while True:
        if main_pid and (ticks is None or _start_ticks(main_pid) != ticks):
            _say(f"{where}: not ready: the server process (pid {main_pid}) exited while "
                 f"loading, after {time.monotonic() - start:.1f} s; last answer: "
                 f"{result.detail} (its own messages are in the journal of this unit)")
            return EXIT_NOT_READY
        left = deadline - time.monotonic()
        result = attempt(target, path, key, timeout=min(5.0, max(0.05, left)),
                         peer_uid=peer_uid)
        now = time.monotonic()
        elapsed = now - start
        if result.outcome == "ready":
            _say(f"{where}: ready after {elapsed:.1f} s ({result.detail})")
            return EXIT_READY
        if result.outcome == "fatal":
            _say(f"{where}: not ready: {result.detail}")
            return EXIT_NOT_READY
        if now >= deadline:
            _say(f"{where}: not ready after {format_seconds(timeout)} "
                 f"(the [health] timeout); last answer: {result.detail}")
            return EXIT_NOT_READY
        if now >= next_progress:
            _say(f"{where}: still loading after {elapsed:.0f} s: {result.detail}")
            next_progress = now + progress_every
        time.sleep(min(interval, max(0.0, deadline - now)))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unitgen probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, help="host:port, [v6]:port, or a Unix socket path")
    p.add_argument("--path", default="/health", help="HTTP path that answers 2xx when ready")
    p.add_argument("--timeout", default="30min", help="deadline, a systemd time span")
    p.add_argument("--key-env", default=None, help="variable holding the bearer key to send")
    p.add_argument("--label", default="", help="word printed before the target (public/private)")
    # 50 ms: readiness is noticed within that of the server's first 200 (a poll
    # costs a connect and one small request; the server is local)
    p.add_argument("--interval", default="50ms", help="time between polls")
    p.add_argument("--progress-every", default="5s", help="time between progress lines")
    p.add_argument("--main-pid", default="", help="fail at once when this process exits "
                   "(units pass $MAINPID)")
    p.add_argument("--own-listener", action="store_true", help="send nothing unless the "
                   "other end of the connection was created by the probe's own uid (the "
                   "server's: the probe runs in its unit)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``python -m unitgen.inunit.probe`` and ``unitgen probe``."""
    parser = _parser()
    ns = parser.parse_args(argv)
    try:
        timeout = parse_timespan(ns.timeout)
        interval = parse_timespan(ns.interval)
        progress = parse_timespan(ns.progress_every)
    except ValueError as exc:
        print(f"unitgen probe: {exc}", file=sys.stderr)
        return EXIT_USAGE
    target: str = ns.target
    if not target.startswith("/") and not target.rpartition(":")[2].isdigit():
        print(f"unitgen probe: --target {target!r} is neither host:port nor a socket path",
              file=sys.stderr)
        return EXIT_USAGE
    main_pid: int | None = None
    if ns.main_pid:
        if not ns.main_pid.isdigit():
            print(f"unitgen probe: --main-pid {ns.main_pid!r} is not a process id", file=sys.stderr)
            return EXIT_USAGE
        main_pid = int(ns.main_pid) or None
    key = None
    if ns.key_env:
        key = os.environ.get(ns.key_env)
        if not key:
            print(f"unitgen probe: {ns.key_env} is not set; the probe cannot authenticate",
                  file=sys.stderr)
            return EXIT_NOT_READY
    return run(target, ns.path, timeout, key=key, label=ns.label, interval=interval,
               progress_every=progress, main_pid=main_pid,
               peer_uid=os.geteuid() if ns.own_listener else None)


if __name__ == "__main__":
    sys.exit(main())
