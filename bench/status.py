"""unitgen status (every unit's properties requested at once over D-Bus) against
what a script would do without it: one `systemctl --user show` per unit."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.helpers import custom_spec, write_spec
from unitgen.ops.sandbox import Sandbox

COUNTS = (5, 20, 50)


def main() -> None:
    box = Sandbox.start(tie_to_parent=True)
    tmpdir = tempfile.TemporaryDirectory()
    tmp = Path(tmpdir.name)
    env = {**os.environ, **box.env}
    try:
        specs = []
        for i in range(max(COUNTS)):
            name = f"s{i:02d}"
            specs.append(str(write_spec(tmp, name, custom_spec(
                name, extra='activation = "on-demand"\n'))))
        subprocess.run([sys.executable, "-m", "unitgen", "deploy", "--user", *specs], env=env,
                       check=True, capture_output=True)
        print(f"{'instances':>9} {'unitgen status s':>17} {'systemctl show x3N s':>21} {'ratio':>6}")
        for n in COUNTS:
            names = [f"s{i:02d}" for i in range(n)]
            t0 = time.monotonic()
            subprocess.run([sys.executable, "-m", "unitgen", "status", "--user", *names], env=env,
                           check=True, capture_output=True)
            ours = time.monotonic() - t0
            t0 = time.monotonic()
            for name in names:
                for unit in (f"{name}.socket", f"{name}.service", f"{name}-backend.service"):
                    subprocess.run(["systemctl", "--user", "show", unit], env=env, check=True,
                                   capture_output=True)
            theirs = time.monotonic() - t0
            print(f"{n:9d} {ours:17.2f} {theirs:21.2f} {theirs / ours:6.1f}")
    finally:
        box.stop()
        tmpdir.cleanup()


if __name__ == "__main__":
    main()
