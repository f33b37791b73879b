"""Resident memory of what unitgen leaves running next to a server: the
readiness probe while it waits (and, once built, the liveness checker)."""

from __future__ import annotations

import subprocess
import time

from bench.rows import Profile, Row
from bench.tools import PYTHON, free_port, rss_kb, stop_pid

LIMIT_KB = 15 * 1024


def probe_rss_kb(seconds: float) -> int:
    """VmRSS of the probe, run exactly as units run it, polling a port that refuses."""
    argv = [PYTHON, "-I", "-m", "unitgen.inunit.probe", "--target",
            f"127.0.0.1:{free_port()}", "--path", "/health", "--timeout", "60s",
            "--label", "private"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(seconds)
        if proc.poll() is not None:
            raise RuntimeError(f"the probe exited early ({proc.returncode})")
        return rss_kb(proc.pid)
    finally:
        stop_pid(proc)


def memory_rows(profile: Profile) -> list[Row]:
    """The probe's RSS while waiting; the liveness checker is not built yet."""
    kb = probe_rss_kb(0.5 if profile.quick else 2.0)
    return [
        Row(row="resident memory of a probe while waiting", ours=f"{kb / 1024:.1f} MB",
            goal="≤ 15 MB", met=kb <= LIMIT_KB, figures={"ours": float(kb)}),
        Row.not_built("resident memory of the liveness checker", "≤ 15 MB",
                      "the liveness work (reliability issue) adds no checker process yet"),
    ]
