"""The shipped fleet playbook (ansible/examples/gateway.yml) over N simulated
model hosts and one gateway host: each host its own private systemd user
manager, local connections, the model hosts on distinct loopback addresses
(127.0.1.1, 127.0.1.2, ...), two stand-in instances each (one model on every
host, one of its own). Measures the wall time of:

- the first run (everything deployed, the gateway built over N x 2 upstreams);
- a second run (nothing changes: changed=0 everywhere, nothing drained);
- a rolling update of every host (``serial: 1``: drain, restart, answer, enable),
  while one client streams through the gateway and counts failures.

    .venv/bin/python -m bench.fleet_play [--hosts 20] [--forks 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import openai

from tests.ansible.test_ansible_live import ANSIBLE, BIN, run_playbook, standin
from tests.helpers import free_port, stream_until
from unitgen.ops.systemd.sandbox import Sandbox

PLAYBOOK = ANSIBLE / "examples" / "gateway.yml"


def _instances(i: int, revision: str) -> list[dict[str, Any]]:
    env = {"STANDIN_LOAD_SECONDS": "0.3", "STANDIN_STREAM_SECONDS": "0.5",
           "STANDIN_NAME": f"h{i}", "MODEL_REVISION": revision}
    return [standin(name, host=f"127.0.1.{i + 1}", env=env)
            for name in ("fp-shared", f"fp-own{i}")]


def _inventory(boxes: list[Sandbox], gw: Sandbox, port: int, revision: str) -> dict[str, Any]:
    hosts = {f"h{i}": {"ansible_host": f"127.0.1.{i + 1}", "unitgen_environment": dict(b.env),
                       "unitgen_instances": _instances(i, revision)}
             for i, b in enumerate(boxes)}
    return {"all": {
        "vars": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
                 "unitgen_scope": "user", "unitgen_executable": str(BIN / "unitgen")},
        "children": {"model_servers": {"hosts": hosts},
                     "unitgen_gateways": {"hosts": {"gw": {
                         "unitgen_environment": dict(gw.env),
                         "unitgen_gateway": {"name": "fp-gw", "port": port}}}}},
    }}


def main(argv: list[str] | None = None) -> int:
    """Print the three wall times and what changed."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=20)
    ap.add_argument("--forks", type=int, default=5)
    args = ap.parse_args(argv)
    boxes: list[Sandbox] = []
    rows: list[tuple[str, float, int, str]] = []
    with tempfile.TemporaryDirectory(prefix="unitgen-bench-play-") as tmp:
        work = Path(tmp)
        try:
            for _ in range(args.hosts + 1):
                boxes.append(Sandbox.start(tie_to_parent=True))
            gw, models = boxes[-1], boxes[:-1]
            port = free_port()
            for step, revision, stream in (("first run", "1", False), ("second run", "1", False),
                                           ("rolling update", "2", True)):
                inv = work / f"inventory-{revision}-{len(rows)}.yml"
                inv.write_text(json.dumps(_inventory(models, gw, port, revision)))
                outcomes: list[str] = []
                stop = threading.Event()
                client = threading.Thread(target=_stream, args=(port, stop, outcomes))
                if stream:
                    client.start()
                t0 = time.monotonic()
                run = run_playbook(PLAYBOOK, inv, work, "--forks", str(args.forks), timeout=3600)
                took = time.monotonic() - t0
                stop.set()
                if stream:
                    client.join(60)
                if run.rc != 0:
                    print(run.stderr[-3000:], json.dumps(run.doc.get("tasks", [])[-2:])[:3000])
                    return 1
                changed = sum(s["changed"] for s in run.doc["stats"].values())
                failed = [o for o in outcomes if o != "ok"]
                rows.append((step, took, changed, f"{len(outcomes)} streams, {len(failed)} failed"
                             if stream else ""))
        finally:
            for box in boxes:
                box.stop()
    print(f"gateway.yml over {args.hosts} model hosts + 1 gateway (forks {args.forks})\n")
    print("| run | wall time | tasks changed | clients |\n|---|---|---|---|")
    for step, took, changed, note in rows:
        print(f"| {step} | {took:.0f} s | {changed} | {note} |")
    return 0


def _stream(port: int, stop: threading.Event, outcomes: list[str]) -> None:
    sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                        timeout=60)
    stream_until(sdk, "fp-shared", stop, outcomes)


if __name__ == "__main__":
    raise SystemExit(main())
