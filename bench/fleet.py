"""A gateway over a fleet: 100 hosts x 8 models (800 upstreams, 800 HAProxy
servers, each always on, so each is health-checked). Measures, on this machine:

- render: the spec file read and checked, planned, and the HAProxy files rendered
  (in process, as ``unitgen deploy`` does it);
- validate: ``haproxy -c`` of that configuration (what deploy runs before writing);
- reload: ``systemctl --user reload`` of the deployed gateway until its new
  HAProxy worker answers on the runtime API (a new PID in ``show info``);
- deploy: ``unitgen deploy`` of the spec with one upstream's port changed, end
  to end (render, validate, write, hitless reload).

Goal: render, validate and reload at most 1 s each. Run as root from the repo:

    .venv/bin/python -m bench.fleet [--hosts 100] [--models 8] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.cli import UNITGEN
from bench.tools import free_port, median, user_env
from unitgen.features.gateway.config import runtime_api, validate
from unitgen.features.gateway.plan import GatewayPlan, metrics_of, settings_of, upstream_members
from unitgen.features.gateway.render import GatewayPaths, render_gateway
from unitgen.features.gateway.spec import GatewaySpec
from unitgen.ops.systemd.sandbox import Sandbox
from unitgen.spec.model import load_any

GOAL = 1.0  # seconds, each of render, validate, reload
NAME = "flt-bench"


def spec_text(hosts: int, models: int, port: int, bump: int = 0) -> str:
    """A gateway spec with ``hosts`` x ``models`` upstreams; ``bump`` moves one port."""
    lines = [f'kind = "gateway"\nname = "{NAME}"\nport = {port}\n']
    for h in range(hosts):
        for m in range(models):
            # 127.1.x.y: loopback addresses nobody listens on (checks are refused at once)
            p = 20000 + m + (bump if (h, m) == (0, 0) else 0)
            lines.append(f'[[upstreams]]\nnode = "host{h:03d}"\nname = "model-{m}"\n'
                         f'address = "127.1.{h // 250}.{h % 250 + 1}:{p}"\n'
                         f'aliases = ["org/model-{m}"]\nmax_concurrent = 8\n')
    return "\n".join(lines)


def plan_and_render(path: Path) -> GatewayPlan:
    """What deploy does with the file before ``haproxy -c``."""
    g = load_any(path)
    assert isinstance(g, GatewaySpec)
    plan = GatewayPlan(settings_of(g), tuple(upstream_members(g)), metrics_of(g))
    render_gateway(plan.settings, plan.routes, GatewayPaths("/etc/x", "/run/x"))
    return plan


def _timed(fn: object, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return median(times)


def worker_pid(sock: Path) -> str | None:
    """The PID of the HAProxy worker that answers on the runtime API."""
    try:
        data = runtime_api(sock, "show info")
    except OSError:
        return None
    for line in data.splitlines():
        if line.startswith("Pid:"):
            return line.split(":", 1)[1].strip()
    return None


def reload_seconds(box: Sandbox, sock: Path) -> float:
    """``systemctl reload`` until a new worker answers."""
    before = worker_pid(sock)
    t0 = time.perf_counter()
    box.systemctl("reload", f"{NAME}.service", check=True)
    while (now := worker_pid(sock)) in (None, before):
        if time.perf_counter() - t0 > 30:
            raise RuntimeError("no new HAProxy worker after 30 s")
        time.sleep(0.005)
    assert now
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    """Print the figures as a markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=100)
    ap.add_argument("--models", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="unitgen-bench-fleet-") as tmp:
        path = Path(tmp) / f"{NAME}.toml"
        port = free_port()
        path.write_text(spec_text(args.hosts, args.models, port))
        plan = plan_and_render(path)
        render = _timed(lambda: plan_and_render(path), args.rounds)
        check = _timed(lambda: validate(str(path), plan), args.rounds)
        box = Sandbox.start(tie_to_parent=True)
        try:
            env = user_env(box.env)
            done = subprocess.run([*UNITGEN, "deploy", "--user", str(path)], env=env,
                                  capture_output=True, text=True, timeout=300, check=False)
            if done.returncode != 0:
                print(done.stderr, file=sys.stderr)
                return 1
            sock = Path(box.env["XDG_RUNTIME_DIR"]) / f"unitgen-{NAME}" / "admin.sock"
            reload = median([reload_seconds(box, sock) for _ in range(args.rounds)])
            deploys = []
            for i in range(args.rounds):
                path.write_text(spec_text(args.hosts, args.models, port, bump=i + 1))
                t0 = time.perf_counter()
                subprocess.run([*UNITGEN, "deploy", "--user", str(path)], env=env, check=True,
                               capture_output=True, timeout=300)
                deploys.append(time.perf_counter() - t0)
            deploy = median(deploys)
        finally:
            box.stop()
    n = args.hosts * args.models
    print(f"gateway over {args.hosts} hosts x {args.models} models ({n} servers), "
          f"median of {args.rounds}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}\n")
    print("| step | seconds | goal | met |\n|---|---|---|---|")
    for step, value in (("render (read, check, plan, render)", render),
                        ("validate (haproxy -c)", check), ("reload (to a new worker)", reload)):
        print(f"| {step} | {value:.3f} | <= {GOAL:.0f} s | {'yes' if value <= GOAL else '**no**'} |")
    print(f"| unitgen deploy, one upstream changed (all of it) | {deploy:.3f} | — | — |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
