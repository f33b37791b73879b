"""What every row needs: timing a whole process, running wrk and reading its
figures, starting and stopping helper processes by pid, describing the machine."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def median(values: Sequence[float]) -> float:
    """The median (the figure every row reports: noise hits the mean harder)."""
    return float(statistics.median(values))


_next_port = [12000 + (os.getpid() * 7) % 6000]


def free_port() -> int:
    """A loopback TCP port nobody uses right now, below the ephemeral range: wrk's
    thousands of client connections take ephemeral ports (and leave them in
    TIME_WAIT), so a port picked there can be gone when systemd binds it."""
    for _ in range(8000):
        port = _next_port[0]
        _next_port[0] = 12000 + (port - 12000 + 1) % 8000
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port in 12000-19999")


def user_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment as a user's shell would have it: bytecode caching on
    (an installed package has its .pyc files; PYTHONDONTWRITEBYTECODE in a CI or
    agent shell would make every run recompile unitgen and skew the CLI rows)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, **(extra or {})}


def time_process(argv: Sequence[str], *, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> float:
    """Wall-clock seconds of one whole process (start, run, exit); it must succeed."""
    env = user_env() if env is None else env
    t0 = time.perf_counter()
    subprocess.run(list(argv), env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def time_interleaved(a: Sequence[str], b: Sequence[str], rounds: int, *,
                     env: dict[str, str] | None = None, cwd: Path | None = None,
                     ) -> tuple[float, float]:
    """Median wall time of commands run alternately (a, b, a, b, ...), so a burst
    of load from other processes hits them alike. One warm-up each first (it also
    writes the .pyc files a real install has)."""
    got = time_many([a, b], rounds, env=env, cwd=cwd)
    return got[0], got[1]


def time_many(commands: Sequence[Sequence[str]], rounds: int, *,
              env: dict[str, str] | None = None, cwd: Path | None = None) -> list[float]:
    """Median wall time of each command, run in turn ``rounds`` times after a warm-up."""
    for argv in commands:
        time_process(argv, env=env, cwd=cwd)
    times: list[list[float]] = [[] for _ in commands]
    for _ in range(rounds):
        for i, argv in enumerate(commands):
            times[i].append(time_process(argv, env=env, cwd=cwd))
    return [median(t) for t in times]


@dataclass(frozen=True)
class WrkResult:
    """wrk's figures for one run."""

    requests_per_s: float
    mean_ms: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int  # socket errors of every kind, and answers other than 2xx/3xx
    read_errors: int = 0  # of those, connections the server closed (after a stream, some do)


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> WrkResult:
    """Read requests/s, the 50th/99th latency percentiles and errors from wrk --latency."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    mean = re.search(r"^\s+Latency\s+(\S+)", out, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    total = re.search(r"(\d+) requests in", out)
    if not (rps and mean and p50 and p99 and total):
        raise RuntimeError(f"wrk printed no figures:\n{out}")
    errors = read_errors = 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock:
        errors += sum(int(g) for g in sock.groups())
        read_errors = int(sock.group(2))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        errors += int(non2xx.group(1))
    return WrkResult(float(rps.group(1)), _ms(mean.group(1)), _ms(p50.group(1)), _ms(p99.group(1)),
                     int(total.group(1)), errors, read_errors)


def wrk(url: str, *, connections: int, seconds: float, threads: int = 1,
        cpus: str | None = None, script: Path | None = None) -> WrkResult:
    """Run wrk against ``url`` (keep-alive) and return its figures.

    ``cpus``: pin wrk to these CPUs (taskset list), to study CPU placement."""
    exe = shutil.which("wrk")
    if exe is None:
        raise RuntimeError("wrk is not installed (Debian package wrk)")
    argv = [exe, f"-t{min(threads, connections)}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
            "--latency", "--timeout", "10s", url]
    if script is not None:
        argv[1:1] = ["-s", str(script)]
    if cpus is not None:
        argv = ["taskset", "-c", cpus, *argv]
    out = subprocess.run(argv, capture_output=True, text=True, check=True,
                         timeout=seconds + 30).stdout
    return parse_wrk(out)


def stop_pid(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Stop a process we started: SIGTERM, then SIGKILL; by its pid only."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def running(argv: Sequence[str], *, env: dict[str, str] | None = None) -> Iterator[
        subprocess.Popen[bytes]]:
    """A helper process for the duration of a block, stopped by pid even on error."""
    proc = subprocess.Popen(list(argv), env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        stop_pid(proc)


def wait_until(predicate: object, timeout: float, interval: float = 0.01) -> bool:
    """Poll ``predicate()`` until true or the timeout passes."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def connectable(port: int) -> bool:
    """True when something accepts TCP connections on 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def rss_kb(pid: int) -> int:
    """Resident memory of a process (VmRSS, KiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def loadavg() -> str:
    """The 1/5/15-minute load averages, as /proc/loadavg says."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def machine() -> str:
    """One line about where the figures came from."""
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 1048576:.1f} GiB RAM"
    systemd = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError, IndexError):
        systemd = subprocess.run(["systemctl", "--version"], capture_output=True, text=True,
                                 check=False).stdout.split()[1]
    distro = ""
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                distro = line.split("=", 1)[1].strip('"')
    return (f"{cpu}, {os.cpu_count()} CPUs{mem}; {distro or platform.system()}, "
            f"kernel {platform.release()}, systemd {systemd}, Python {platform.python_version()}")
