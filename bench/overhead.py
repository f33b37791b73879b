"""What socket activation and the probes cost on top of the model's own load time.

For load times L, side by side: the server's own time to answer 200 when run
bare, `systemctl start` of the eager instance, and the first request to an
on-demand instance (which waits in the socket). Prints each and its overhead."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.helpers import STANDIN, custom_spec, free_port, get, install, uninstall, write_spec
from unitgen.ops.sandbox import Sandbox

LOADS = (0.0, 1.0, 3.0)
ROUNDS = 3


def bare(load: float) -> float:
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


def spec_text(name: str, port: int, load: float, activation: str) -> str:
    return custom_spec(name, port=port, extra=f'activation = "{activation}"\n',
                       env={"STANDIN_LOAD_SECONDS": str(load), "STANDIN_LOADING": "refuse"})


def main() -> None:
    box = Sandbox.start(tie_to_parent=True)
    tmpdir = tempfile.TemporaryDirectory()
    tmp = Path(tmpdir.name)
    try:
        print(f"{'load s':>7} {'bare s':>8} {'eager start s':>14} {'+s':>6} "
              f"{'on-demand 1st req s':>20} {'+s':>6}")
        for load in LOADS:
            b = min(bare(load) for _ in range(ROUNDS))
            eager, lazy = [], []
            for _ in range(ROUNDS):
                port = free_port()
                install(box, write_spec(tmp, "b-eager", spec_text("b-eager", port, load, "eager")))
                t0 = time.monotonic()
                box.systemctl("start", "b-eager.service", check=True)
                eager.append(time.monotonic() - t0)
                uninstall(box, "b-eager")
                port = free_port()
                install(box, write_spec(tmp, "b-lazy", spec_text("b-lazy", port, load, "on-demand")))
                box.systemctl("start", "b-lazy.socket", check=True)
                t0 = time.monotonic()
                assert get(port, timeout=60)[0] == 200
                lazy.append(time.monotonic() - t0)
                uninstall(box, "b-lazy")
            e, lz = min(eager), min(lazy)
            print(f"{load:7.1f} {b:8.2f} {e:14.2f} {e - b:6.2f} {lz:20.2f} {lz - b:6.2f}")
    finally:
        box.stop()
        tmpdir.cleanup()


if __name__ == "__main__":
    main()
