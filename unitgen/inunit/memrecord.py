"""What an instance's processes held on its GPUs at its last load, kept across
restarts: the third source of a pool member's memory need ("measured"),
after the spec's ``gpu_memory`` and the backend's own arguments.

One small JSON file per instance, ``<state>/unitgen/gpu-memory/<name>.json``,
under the state directory of the manager that runs it (``/var/lib`` for the
system's, ``$XDG_STATE_HOME`` or ``~/.local/state`` for a user's). It is
written by this module's program once the server is ready (atomically: a
reader sees the old record or the new one) and read by whoever resolves the
need. A record carries a fingerprint of what the memory depends on (backend,
model, arguments, GPU count): when the spec changes, the old figure is not used.

    python -m unitgen.inunit.memrecord --instance qwen2 --gpus GPU-a,GPU-b \\
        --state-dir /var/lib --fingerprint 3f2a...

Standard library only (NVML through :mod:`unitgen.inunit.nvml`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from unitgen.inunit.cgroupowner import instance_of_pid
from unitgen.inunit.nvml import Gpu, GpuUnavailableError, gib, read_gpus

__all__ = ["MEASURED_FORMAT", "Measured", "main", "measure", "read_measured", "record_path",
           "write_measured"]

MEASURED_FORMAT = 1  # the record's "format": a reader ignores any other
_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,47}")  # an instance name (spec.keys)


@dataclass(frozen=True)
class Measured:
    """GPU memory an instance's processes held, per GPU, when it was measured."""

    instance: str
    per_gpu: tuple[tuple[str, int], ...]  # (GPU UUID, bytes)
    at: float  # Unix time of the measurement
    fingerprint: str  # what the figure depends on; another spec is measured anew

    @property
    def peak(self) -> int:
        """The most it held on any one of its GPUs (a need is per GPU)."""
        return max((b for _, b in self.per_gpu), default=0)


def record_path(state_dir: Path, instance: str) -> Path:
    """Where ``instance``'s record lives under a manager's state directory."""
    if not _NAME.fullmatch(instance):
        raise ValueError(f"not an instance name: {instance!r}")
    return state_dir / "unitgen" / "gpu-memory" / f"{instance}.json"


def write_measured(state_dir: Path, m: Measured) -> Path:
    """Write the record atomically (a temporary file renamed over the old one)."""
    path = record_path(state_dir, m.instance)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"format": MEASURED_FORMAT, "instance": m.instance, "at": m.at,
            "fingerprint": m.fingerprint, "gpus": dict(m.per_gpu)}
    fd, tmp = tempfile.mkstemp(prefix=f".{m.instance}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, sort_keys=True)
            fh.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def read_measured(state_dir: Path, instance: str, fingerprint: str) -> Measured | None:
    """The record of ``instance`` if there is a valid one for this fingerprint;
    None when there is none, it cannot be read, or it is of another spec."""
    try:
        data = json.loads(record_path(state_dir, instance).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    try:
        if (data["format"] != MEASURED_FORMAT or data["instance"] != instance
                or data["fingerprint"] != fingerprint):
            return None
        per_gpu = tuple(sorted((str(u), int(b)) for u, b in data["gpus"].items()))
        if any(b < 0 for _, b in per_gpu) or not per_gpu:
            return None
        return Measured(instance, per_gpu, float(data["at"]), fingerprint)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def measure(gpus: list[Gpu], instance: str, manager: str, uuids: set[str],
            fingerprint: str, at: float) -> Measured | None:
    """What ``instance``'s processes (of ``manager``) hold on each of its GPUs;
    None when they hold nothing there (not loaded, or NVML sees no process)."""
    per_gpu = tuple((g.uuid, sum(p.used_bytes for p in g.processes
                                 if p.belongs_to(instance, manager)))
                    for g in gpus if g.uuid in uuids)
    if not any(b for _, b in per_gpu):
        return None
    return Measured(instance, tuple(sorted(per_gpu)), at, fingerprint)


def main(argv: list[str] | None = None) -> int:
    """Measure and write the record; exit 0 whatever happens (a figure that
    could not be taken must not fail the server's start), saying why on stderr."""
    p = argparse.ArgumentParser(prog="python -m unitgen.inunit.memrecord")
    p.add_argument("--instance", required=True)
    p.add_argument("--gpus", required=True, help="comma-separated GPU UUIDs")
    p.add_argument("--state-dir", required=True, type=Path)
    p.add_argument("--fingerprint", required=True)
    ns = p.parse_args(argv)
    own = instance_of_pid("self")
    manager = own[1] if own else "system"
    try:
        m = measure(read_gpus(), ns.instance, manager, set(ns.gpus.split(",")),
                    ns.fingerprint, time.time())
    except GpuUnavailableError as exc:
        print(f"gpu memory: not measured: {exc.message}", file=sys.stderr)
        return 0
    if m is None:
        print("gpu memory: not measured: NVML shows no process of this instance on its GPUs",
              file=sys.stderr)
        return 0
    try:
        path = write_measured(ns.state_dir, m)
    except (OSError, ValueError) as exc:
        print(f"gpu memory: not recorded: {exc}", file=sys.stderr)
        return 0
    print(f"gpu memory: {gib(m.peak)} per GPU at its peak, recorded in {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
