"""Rows about the command itself: whole-process time of ``unitgen --help`` and
``unitgen render`` against the interpreter's and the dependencies' floor, and
rendering many specs."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from bench.rows import Profile, Row
from bench.tools import PYTHON, time_interleaved, time_many, time_process
from tests.helpers import custom_spec, write_spec

# The console script next to this interpreter (what users run), else python -m unitgen.
_SCRIPT = Path(sys.executable).parent / "unitgen"
UNITGEN = [str(_SCRIPT)] if _SCRIPT.exists() else [PYTHON, "-m", "unitgen"]


def _version(dist: str) -> str:
    from importlib.metadata import version  # noqa: PLC0415

    return version(dist)


def cli_rows(profile: Profile) -> list[Row]:
    """--help vs `python -c pass`; render vs importing click+jinja2+tomllib; N specs."""
    rows = []
    rounds = profile.cli_rounds
    ours, base, click = time_many(
        [[*UNITGEN, "--help"], [PYTHON, "-c", "pass"], [PYTHON, "-c", "import click"]], rounds)
    rows.append(Row(
        row="`unitgen --help`, whole process", ours=f"{ours * 1000:.0f} ms",
        baseline=f"{base * 1000:.0f} ms `python -c pass`", ratio=ours / base, goal="≤ 3.5 x",
        met=ours / base <= 3.5, figures={"ours": ours, "baseline": base, "click": click},
        note=f"`python -c 'import click'` alone: {click * 1000:.0f} ms = {click / base:.1f} x "
             f"(click {_version('click')} imports inspect, uuid, datetime for its types); "
             f"unitgen's own share: {(ours - click) * 1000:.0f} ms",
    ))
    with tempfile.TemporaryDirectory(prefix="bench-render-") as tmpname:
        tmp = Path(tmpname)
        spec = write_spec(tmp, "one", custom_spec("one", port=40001))
        ours, base = time_interleaved(
            [*UNITGEN, "render", "--user", str(spec)],
            [PYTHON, "-c", "import click, jinja2, tomllib"], rounds)
        rows.append(Row(
            row="`unitgen render` of one spec, whole process", ours=f"{ours * 1000:.0f} ms",
            baseline=f"{base * 1000:.0f} ms `import click, jinja2, tomllib`",
            ratio=ours / base, goal="≤ 1.25 x", met=ours / base <= 1.25,
            figures={"ours": ours, "baseline": base},
        ))
        n = profile.render_specs
        paths = [str(write_spec(tmp, f"s{i:04d}", custom_spec(f"s{i:04d}", port=30000 + i)))
                 for i in range(n)]
        took = min(time_process([*UNITGEN, "check", "--no-verify", "--user", *paths])
                   for _ in range(1 if profile.quick else 3))
        goal = 2.0 * n / 1000
        rows.append(Row(
            row=f"render {n:,} specs (`unitgen check --no-verify` of all, whole process)",
            ours=f"{took:.2f} s", goal=f"≤ {goal:g} s total",
            met=took <= goal, figures={"ours": took},
        ))
    return rows
