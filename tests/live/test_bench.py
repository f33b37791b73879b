"""The benchmark harness cannot rot: every row runs in its quick profile (a few
seconds each, on the real manager, nginx, wrk) and yields figures. Timing goals
are NOT asserted here (a loaded CI machine would fail them); ``python -m bench``
reports them."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import llama, suite
from bench.rows import QUICK, Row, table
from bench.tools import parse_wrk

REPO = Path(__file__).resolve().parents[2]

WRK_OUTPUT = """\
Running 1s test @ http://127.0.0.1:8080/
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   120.50us   30.00us   1.20ms   90.00%
    Req/Sec    70.00k     1.00k   72.00k    80.00%
  Latency Distribution
     50%  110.00us
     75%  130.00us
     90%  150.00us
     99%    1.05ms
  70000 requests in 1.00s, 10.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  70000.00
Transfer/sec:     10.00MB
"""


def test_parse_wrk_reads_rate_percentiles_and_errors():
    res = parse_wrk(WRK_OUTPUT)
    assert res.requests_per_s == 70000.0
    assert res.mean_ms == pytest.approx(0.1205)
    assert res.p50_ms == pytest.approx(0.11)
    assert res.p99_ms == pytest.approx(1.05)
    assert res.requests == 70000
    assert res.errors == 7
    assert res.read_errors == 2


def test_parse_wrk_refuses_output_without_figures():
    with pytest.raises(RuntimeError, match="no figures"):
        parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_table_has_ratio_goal_met_and_footnotes():
    rows = [Row(row="a", ours="1 s", baseline="2 s", ratio=0.5, goal="≤ 1", met=True),
            Row(row="b", ours="3 s", goal="≤ 1", met=False, note="why"),
            Row.not_built("c", "≤ 0.3 s", "later")]
    text = table(rows)
    assert "| a | 1 s | 2 s | 0.50 | ≤ 1 | yes |" in text
    assert "| b [1] | 3 s | — | — | ≤ 1 | **no** |" in text
    assert "| c [2] | n/a (not built yet) |" in text
    assert text.endswith("[1] why\n[2] later")


def _needs(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None and not Path(f"/usr/sbin/{t}").exists()]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (./setup installs them)")


def _check_rows(rows: list[Row]) -> None:
    assert rows
    measured = [r for r in rows if not r.ours.startswith(("n/a", "skipped")) and r.ours != "fails"]
    assert measured or rows[0].ours.startswith(("n/a", "skipped")), rows
    for r in measured:
        assert r.figures, r
        for name, value in r.figures.items():
            assert math.isfinite(value), (r.row, name, value)
        assert r.figures["ours"] > 0, r
        assert r.met is not None or r.goal == "(reported)", r


@pytest.mark.systemd
@pytest.mark.parametrize("group", list(suite.GROUPS))
def test_every_row_produces_figures(sandbox, group):
    if group in ("stream", "tiny"):
        _needs("wrk", "nginx")
    if group in ("gateway", "keys"):
        _needs("wrk", "nginx", "haproxy")
    if group == "llama" and not llama.ENABLED:
        pytest.skip(llama.WHY_OFF)
    rows = suite.GROUPS[group](sandbox, QUICK)
    _check_rows(rows)
    if group == "stream":
        assert [r.row.split("c=")[1].split(":")[0] for r in rows] == ["1", "16", "64"]
        for r in rows:
            assert r.figures["baseline"] > 0
    if group == "tiny":
        assert len(rows) == 4  # c=16, c=64, p50, p99
    if group == "gateway":
        assert [r.row.split(": ")[1].split(",")[0] for r in rows] == [
            "LLM-shaped stream", "failed requests while it reloads under load (c=16 streams)",
            "added latency per request"]
        assert rows[1].figures["reloads"] >= 2  # the reloads did happen under the load
        assert rows[0].figures["baseline"] > 0
    if group == "keys":  # the policy against the gateway before it, side by side
        assert [r.figures["baseline"] > 0 for r in rows] == [True, True, True]  # c=1, tiny, streams
    if group == "swap":
        assert rows[0].figures["ours"] > rows[0].figures["baseline"] * 0.5  # a swap loads
    # the deployed instances are gone again
    leftovers = [p.name for p in sandbox.unit_dir.glob("b*") if p.name.startswith(
        ("bstream", "bfast", "bready", "bcold", "bgw"))]
    assert leftovers == []


def test_command_line_refuses_unknown_rows():
    proc = subprocess.run([sys.executable, "-m", "bench", "--rows", "nope"], cwd=REPO,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert "unknown rows" in proc.stderr
