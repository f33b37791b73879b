"""unitgen status on many *ready* instances: every health path is asked at once
(issue 11: "ready" means it answered just now), so the time should stay well
under a second. Run: .venv/bin/python -m bench.status_health [COUNT]"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.helpers import custom_spec, write_spec
from unitgen.ops.systemd.sandbox import Sandbox


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    box = Sandbox.start(tie_to_parent=True)
    tmpdir = tempfile.TemporaryDirectory()
    tmp = Path(tmpdir.name)
    env = {**os.environ, **box.env}
    try:
        specs = [str(write_spec(tmp, f"h{i:03d}", custom_spec(
            f"h{i:03d}", extra='[health]\nwatchdog = "off"\n'))) for i in range(count)]
        for start in range(0, count, 5):
            done = subprocess.run([sys.executable, "-m", "unitgen", "deploy", "--user",
                                   *specs[start:start + 5]], env=env, capture_output=True,
                                  text=True, check=False)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        times = []
        for _ in range(5):
            t0 = time.monotonic()
            done = subprocess.run([sys.executable, "-m", "unitgen", "status", "--user"], env=env,
                                  check=False, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr[-2000:]
            times.append(time.monotonic() - t0)
        ready = sum(1 for ln in done.stdout.splitlines()[1:] if ln.split()[1] == "ready")
        print(f"{count} instances, {ready} ready: unitgen status median "
              f"{statistics.median(times):.2f} s (min {min(times):.2f}, max {max(times):.2f}), "
              "whole command including Python start-up")
        if os.environ.get("BENCH_PROFILE"):
            subprocess.run([sys.executable, "-c", (
                "import cProfile, pstats, time\n"
                "from unitgen.ops.systemd.status import status\n"
                "t = time.monotonic(); status([], 'user'); print('in process', time.monotonic() - t)\n"
                "cProfile.run(\"status([], 'user')\", '/tmp/status.prof')\n"
                "pstats.Stats('/tmp/status.prof').sort_stats('cumulative').print_stats(25)\n")],
                env=env, check=False)
    finally:
        box.stop()
        tmpdir.cleanup()


if __name__ == "__main__":
    main()
