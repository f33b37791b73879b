"""Wait until an instance's GPUs no longer hold memory of its previous processes
(``ExecStartPre=`` of every GPU instance), so a restart does not start while the
old process's memory is still being released (llama-swap #97).

Held memory counts when it belongs to a process of this instance's units, or to
a process that no longer exists (the driver frees such memory late). Memory of
other live processes is not this wait's business: deploy's ``gpu_memory``
check names those.

    python -m unitgen.inunit.gpuwait --instance qwen2 --gpus GPU-a,GPU-b --timeout 120s
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from unitgen.inunit.cgroupowner import instance_of_pid
from unitgen.inunit.nvml import Gpu, GpuUnavailableError, gib, read_gpus
from unitgen.timespan import format_seconds, parse_timespan

__all__ = ["held", "main"]


def held(gpus: list[Gpu], instance: str, uuids: set[str], manager: str | None = None) -> list[str]:
    """Descriptions of memory still held for ``instance`` (of ``manager``,
    ``system`` or ``user@UID``: by default the manager running this process, so
    another user's instance of the same name is not waited for) on the given GPUs."""
    if manager is None:
        own = instance_of_pid("self")
        manager = own[1] if own else "system"
    out = []
    for g in gpus:
        if g.uuid not in uuids:
            continue
        for p in g.processes:
            if p.pid == os.getpid():
                continue
            if not p.alive or p.belongs_to(instance, manager):
                state = "exited" if not p.alive else "still running"
                out.append(f"GPU {g.index} ({g.uuid}): pid {p.pid} ({state}) holds "
                           f"{gib(p.used_bytes)}")
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point: exit 0 when free (or no NVML), 1 at the deadline."""
    p = argparse.ArgumentParser(prog="python -m unitgen.inunit.gpuwait")
    p.add_argument("--instance", required=True)
    p.add_argument("--gpus", required=True, help="comma-separated GPU UUIDs")
    p.add_argument("--timeout", default="120s")
    p.add_argument("--interval", default="500ms")
    ns = p.parse_args(argv)
    timeout, interval = parse_timespan(ns.timeout), parse_timespan(ns.interval)
    uuids = set(ns.gpus.split(","))
    start = time.monotonic()
    reported = 0.0
    while True:
        try:
            still = held(read_gpus(), ns.instance, uuids)
        except GpuUnavailableError as exc:
            print(f"gpu wait: skipped: {exc.message}", file=sys.stderr, flush=True)
            return 0
        elapsed = time.monotonic() - start
        if not still:
            if elapsed > interval:
                print(f"gpu wait: GPU memory released after {elapsed:.1f} s", file=sys.stderr)
            return 0
        if elapsed >= timeout:
            print(f"gpu wait: not released after {format_seconds(timeout)}: " + "; ".join(still),
                  file=sys.stderr, flush=True)
            return 1
        if elapsed - reported >= 5:
            reported = elapsed
            print(f"gpu wait: waiting {elapsed:.0f} s: " + "; ".join(still), file=sys.stderr,
                  flush=True)
        time.sleep(interval)


if __name__ == "__main__":
    sys.exit(main())
