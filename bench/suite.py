"""``python -m bench``: every row under one private systemd user manager, one
markdown table (unitgen's figure, the baseline measured in the same run, their
ratio, the goal, met?), printed and written to a file with the machine it ran on."""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from bench import (
    balance,
    cli,
    gateway,
    gateway_keys,
    llama,
    memory,
    pool,
    poolswap,
    proxy,
    ready,
    status,
    swap,
)
from bench.rows import FULL, QUICK, Profile, Row, report, table, write_report
from bench.tools import loadavg, machine
from unitgen.ops.systemd.sandbox import Sandbox, sandbox_unavailable_reason

RESULTS = Path(__file__).resolve().parent / "results"

Group = Callable[[Sandbox, Profile], list[Row]]


# In the order of the table; each name can be picked with --rows.
GROUPS: dict[str, Group] = {
    "stream": proxy.stream_rows,
    "tiny": proxy.tiny_rows,
    "llama": llama.llama_rows,
    "ready": ready.ready_rows,
    "swap": swap.swap_rows,
    "cli": lambda _box, profile: cli.cli_rows(profile),
    "status": status.status_rows,
    "gateway": gateway.gateway_rows,
    "keys": gateway_keys.keys_rows,
    "balance": balance.balance_rows,
    "memory": lambda _box, profile: memory.memory_rows(profile),
    "pool": lambda _box, profile: pool.pool_rows(profile),
    "poolswap": poolswap.pool_swap_rows,
}


def run(names: list[str], profile: Profile, *, echo: bool = True) -> tuple[list[Row], bool]:
    """Run the groups under one private manager; a group that fails becomes an
    error row (the others still run). Returns the rows and whether all ran."""
    rows: list[Row] = []
    ok = True
    box = Sandbox.start(tie_to_parent=True)
    try:
        for name in names:
            t0 = time.monotonic()
            try:
                got = GROUPS[name](box, profile)
            except Exception as exc:  # one broken row must not hide the rest
                ok = False
                traceback.print_exc()
                got = [Row(row=f"{name}: failed", ours=f"error: {type(exc).__name__}: {exc}"[:200],
                           met=False)]
            rows.extend(got)
            if echo:
                print(f"bench: {name}: {time.monotonic() - t0:.0f} s", file=sys.stderr)
    finally:
        box.stop()
    return rows, ok


def main(argv: list[str] | None = None) -> int:
    """Parse options, run, print the table, write the results file."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="the CI profile: seconds per row, proves the harness works")
    parser.add_argument("--rows", default=",".join(GROUPS),
                        help=f"comma-separated groups (default all): {','.join(GROUPS)}")
    parser.add_argument("--out", type=Path, default=None,
                        help="results file (default bench/results/latest.md for the full "
                             "profile; the quick profile writes none unless given)")
    ns = parser.parse_args(argv)
    names = [n.strip() for n in ns.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in GROUPS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(GROUPS)}")
    reason = sandbox_unavailable_reason()
    if reason:
        print(f"bench: cannot start a private systemd manager: {reason}", file=sys.stderr)
        return 2
    profile = QUICK if ns.quick else FULL
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    before = loadavg()
    t0 = time.monotonic()
    rows, ok = run(names, profile)
    text = report(rows, profile=profile, machine=machine(), load_before=before,
                  load_after=loadavg(), started=started, seconds=time.monotonic() - t0)
    print(table(rows))
    out = ns.out if ns.out is not None else (None if profile.quick else RESULTS / "latest.md")
    if out is not None:
        write_report(text, out)
        print(f"bench: wrote {out}", file=sys.stderr)
    return 0 if ok else 1
