"""What a swap costs on top of the work it cannot avoid (issue 12).

Two members of a swap group, stand-in servers with load time L. With member a
loaded and idle, a request to b is timed from connect to answer (the swap).
Side by side: the server's own load time run bare (interpreter start + L, to
its first 200), and its exit time on SIGTERM. No GPU here: the GPU memory
release is 0. Overhead = swap - exit - own load (the drain is 0: a is idle)."""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.rows import Profile, Row
from tests.helpers import STANDIN, custom_spec, free_port, get, write_spec
from unitgen.ops.systemd.sandbox import Sandbox

LOADS = (0.0, 1.0, 3.0)
ROUNDS = 5



def bare(load: float) -> float:
    """The stand-in's own start-up plus load, run directly (no unit)."""
    port = free_port()
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(STANDIN), "--port", str(port)],
                            env={"STANDIN_LOAD_SECONDS": str(load), "STANDIN_LOADING": "refuse",
                                 "PATH": "/usr/bin:/bin"}, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                if get(port, timeout=1)[0] == 200:
                    return time.monotonic() - t0
            except OSError:
                time.sleep(0.01)
    finally:
        proc.terminate()
        proc.wait()


def exit_time() -> float:
    """A loaded stand-in's time from SIGTERM to gone."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(STANDIN), "--port", str(port)],
                            stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                if get(port, timeout=1)[0] == 200:
                    break
            except OSError:
                time.sleep(0.01)
        t0 = time.monotonic()
        proc.terminate()
        proc.wait()
        return time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def cli(box: Sandbox, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "unitgen", *args], env={**os.environ, **box.env},
                   check=True, capture_output=True, text=True)


def swaps_of(box: Sandbox, tmp: Path, load: float, rounds: int) -> list[float]:
    """Deploy two members of a swap group (stand-ins loading ``load`` s), time
    ``2 * rounds`` requests alternating between them (each one a swap), remove them."""
    ports = {n: free_port() for n in ("sa", "sb")}
    specs = [write_spec(tmp, n, custom_spec(
        n, port=ports[n], env={"STANDIN_LOAD_SECONDS": str(load), "STANDIN_LOADING": "refuse"},
        extra='activation = "on-demand"\nswap_group = "bench"\n')) for n in ports]
    cli(box, "deploy", "--user", *map(str, specs))
    try:
        swaps = []
        for i in range(rounds * 2 + 1):
            port = ports["sa" if i % 2 == 0 else "sb"]
            t0 = time.monotonic()
            if get(port, "/x", timeout=60)[0] != 200:
                raise RuntimeError(f"a request to {port} was not answered 200")
            if i:  # the first request loads without a swap
                swaps.append(time.monotonic() - t0)
        return swaps
    finally:
        cli(box, "remove", "--user", "sa", "sb")


def swap_rows(box: Sandbox, profile: Profile) -> list[Row]:
    """What a swap adds to the work it cannot avoid (the old server's exit, the
    new one's own load), for a 1 s load: median over the swaps."""
    rounds = 2 if profile.quick else ROUNDS
    with tempfile.TemporaryDirectory() as tmpname:
        ex = min(exit_time() for _ in range(3))
        own = min(bare(1.0) for _ in range(1 if profile.quick else 3))
        swaps = swaps_of(box, Path(tmpname), 1.0, rounds)
    med = statistics.median(swaps)
    overhead = med - ex - own
    return [Row(row="swap overhead (swap group, 1 s load), median",
                ours=f"{med:.2f} s a swap (+{overhead:.2f} s)",
                baseline=f"{own:.2f} s own load + {ex * 1000:.0f} ms exit, run bare",
                goal="+ ≤ 0.3 s", met=overhead <= 0.3,
                figures={"ours": med, "baseline": own + ex, "overhead": overhead})]


def main() -> None:
    box = Sandbox.start(tie_to_parent=True)
    tmpdir = tempfile.TemporaryDirectory()
    tmp = Path(tmpdir.name)
    ex = min(exit_time() for _ in range(3))
    try:
        print(f"stand-in exit on SIGTERM: {ex * 1000:.0f} ms; GPU memory release: 0 (no GPU)")
        print(f"{'load s':>7} {'own load s':>11} {'swap s':>7} {'overhead s':>11} "
              f"{'median swap s':>14} {'median overhead s':>18}   "
              "journal (best): others stopped / own server started")
        for load in LOADS:
            own = min(bare(load) for _ in range(3))
            swaps = swaps_of(box, tmp, load, ROUNDS)
            journal = box.journal(lines=400)
            turns = re.findall(r"others stopped ([\d.]+) s \((?:sa|sb)\), own server started "
                               r"([\d.]+) s", journal)[-len(swaps):]
            stop = min(float(a) for a, _ in turns) if turns else float("nan")
            start = min(float(b) for _, b in turns) if turns else float("nan")
            best, med = min(swaps), statistics.median(swaps)
            print(f"{load:7.1f} {own:11.2f} {best:7.2f} {best - ex - own:11.2f} {med:14.2f} "
                  f"{med - ex - own:18.2f}   {stop:.2f} / {start:.2f} ({len(swaps)} swaps)")
    finally:
        box.stop()
        tmpdir.cleanup()


if __name__ == "__main__":
    main()
