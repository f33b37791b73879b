"""The GPU wait of a GPU pool member's server (issue 27), its ``ExecStartPre=``.

The GPU wait (:mod:`unitgen.inunit.gpuwait`) holds a start until the memory
of the instance's earlier processes is released. A start the pool's turn makes
has just been weighed against what NVML says, under the GPUs' locks (memory
freed late counts as taken until it is free): waiting again would only add the
wait's own start-up (an interpreter, NVML) to every swap. So when the member's
proxy wrote the start's stamp (``%t/unitgen-pool/<name>.start``, the
monotonic clock) moments ago, this returns at once; any other start (a
restart after a crash, ``systemctl start`` by hand) waits as every GPU
instance's does.

    python -P -m unitgen.inunit.poolstart --checked %t/unitgen-pool/NAME.start -- \\
        --instance NAME --gpus GPU-... --timeout 120s

Standard library only, and nothing imported before the stamp is read.
"""

from __future__ import annotations

import sys
import time

__all__ = ["FRESH", "checked_just_now", "main"]

# How old the stamp may be: from the proxy's `systemctl start` to this
# ExecStartPre= is tens of milliseconds; seconds under load.
FRESH = 3.0


def checked_just_now(path: str, now: float | None = None) -> bool:
    """True when the stamp at ``path`` was written at most :data:`FRESH` ago."""
    try:
        with open(path, encoding="utf-8") as fh:
            stamp = float(fh.read().strip())
    except (OSError, ValueError):
        return False
    age = (time.monotonic() if now is None else now) - stamp
    return 0.0 <= age <= FRESH


def main(argv: list[str] | None = None) -> int:
    """Skip the wait for the pool's own start; otherwise the GPU wait's exit code."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 3 or args[0] != "--checked" or args[2] != "--":
        print("usage: python -m unitgen.inunit.poolstart --checked STAMP -- GPUWAIT-ARGS",
              file=sys.stderr)
        return 2
    if checked_just_now(args[1]):
        print("gpu wait: skipped: the pool's turn weighed its GPUs just now", file=sys.stderr)
        return 0
    from unitgen.inunit.gpuwait import main as wait  # noqa: PLC0415 - only when it waits

    return wait(args[3:])


if __name__ == "__main__":
    sys.exit(main())
