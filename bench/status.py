"""``unitgen status`` with many deployed instances (on-demand: their sockets
listen, their servers are not started) against what a script does without it:
``systemctl --user show`` of the same units."""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path

from bench.cli import UNITGEN
from bench.rows import Profile, Row
from bench.tools import free_port, median, user_env
from tests.helpers import custom_spec, user_ctx, write_spec
from unitgen.ops.files import write_files
from unitgen.ops.systemd.sandbox import Sandbox
from unitgen.ops.systemd.specs import render_spec


def install_many(box: Sandbox, tmp: Path, count: int) -> list[str]:
    """Render and install ``count`` on-demand instances, one daemon-reload, start
    their sockets; return their names."""
    ctx = user_ctx()
    names = []
    for i in range(count):
        name = f"st{i:03d}"
        path = write_spec(tmp, name, custom_spec(name, port=free_port(),
                                                 extra='activation = "on-demand"\n'))
        done = render_spec(path, ctx)
        write_files(box.unit_dir, name, tuple(f for f in done.files if not f.secret))
        names.append(name)
    box.systemctl("daemon-reload", check=True)
    started = box.systemctl("start", *(f"{n}.socket" for n in names))
    if started.returncode != 0:
        raise RuntimeError(f"starting the sockets failed: {started.stderr.strip()}")
    return names


def remove_many(box: Sandbox, names: list[str]) -> None:
    """Stop and delete the instances."""
    box.systemctl("stop", *(f"{n}.socket" for n in names))
    for name in names:
        for path in box.unit_dir.glob(f"{name}*"):
            path.unlink()
    box.systemctl("daemon-reload")


def _timed(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, check=False, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip()
        first = next((line for line in err.splitlines() if line.startswith("error:")), "")
        last = err.splitlines()[-1] if err else ""
        raise RuntimeError(f"`{' '.join(argv[-2:])}` exited {proc.returncode}: {first} "
                           f"(last line: {last})")
    return took


def measure(box: Sandbox, count: int, rounds: int) -> tuple[float, float, float, int]:
    """Median seconds of unitgen status, systemctl show per unit, one systemctl
    show of all; and the number of units."""
    env = user_env(box.env)
    with tempfile.TemporaryDirectory(prefix="bench-status-") as tmpname:
        names = install_many(box, Path(tmpname), count)
        try:
            units = [f"{n}{suffix}" for n in names
                     for suffix in (".socket", ".service", "-backend.service")]
            ours, per_unit, one_call = [], [], []
            _timed([*UNITGEN, "status", "--user"], env)  # warm-up
            for _ in range(rounds):
                ours.append(_timed([*UNITGEN, "status", "--user"], env))
                t0 = time.perf_counter()
                for unit in units:
                    subprocess.run(["systemctl", "--user", "show", unit], env=env, check=True,
                                   capture_output=True)
                per_unit.append(time.perf_counter() - t0)
                one_call.append(_timed(["systemctl", "--user", "show", *units], env))
        finally:
            remove_many(box, names)
    return median(ours), median(per_unit), median(one_call), len(units)


def status_rows(box: Sandbox, profile: Profile) -> list[Row]:
    """unitgen status (all instances) vs systemctl show per unit and in one call.
    If status fails at the profile's count, say so and measure at half of it."""
    count = profile.status_instances
    rounds = 1 if profile.quick else 5
    rows = []
    try:
        o, p, one, n_units = measure(box, count, rounds)
    except RuntimeError as exc:
        why = str(exc).splitlines()[0][:300]
        if "Resource temporarily unavailable" in why:
            why += ("; every D-Bus call is sent at once and dbus-fast drops the connection "
                    "when the socket's send buffer fills (EAGAIN in its write callback)")
        rows.append(Row(row=f"`unitgen status` of {count} instances", ours="fails",
                        goal="faster, ≤ 0.5 s", met=False, note=why))
        count //= 2
        o, p, one, n_units = measure(box, count, rounds)
    rows += [
        Row(row=f"`unitgen status` of {count} instances vs `systemctl --user show` per unit",
            ours=f"{o:.3f} s", baseline=f"{p:.3f} s ({n_units} calls)", ratio=o / p,
            goal="faster, ≤ 0.5 s", met=o < p and o <= 0.5,
            note="instances are on-demand (sockets listening, servers not started); "
                 "status does no live health probe yet",
            figures={"ours": o, "baseline": p}),
        Row(row=f"`unitgen status` of {count} instances vs one `systemctl --user show` of "
                f"all {n_units} units",
            ours=f"{o:.3f} s", baseline=f"{one:.3f} s (1 call)", ratio=o / one,
            goal="(reported)", figures={"ours": o, "baseline": one}),
    ]
    return rows
