"""The gateway's status page (issue 28) in a real headless browser: Debian's
Chromium opens it on a real HAProxy running the rendered configuration (the
metrics listener, a gateway key as the browser's password), and the routes
and keys are on the page it renders, in its DOM and in its screenshot."""

from __future__ import annotations

import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from tests.offline.test_gateway_door import HAPROXY, _chat, door
from tests.offline.test_gateway_keys import _keys
from unitgen.features.gateway.plan import GatewaySettings

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.skipif(not Path(HAPROXY).exists(), reason="HAProxy is not installed (./setup)"),
    pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (./setup installs it)")]


def _browser(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                           "--no-first-run", f"--user-data-dir={tmp / 'profile'}", *args],
                          capture_output=True, text=True, timeout=120, check=False)


def _pixels(png: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and rows of RGB(A) pixels of an 8-bit PNG (what Chromium writes)."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, data, width, height, channels = 8, b"", 0, 0, 0
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        chunk = png[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", chunk[:10])
            assert depth == 8 and colour in (2, 6), (depth, colour)
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            data += chunk
        pos += 12 + length
    raw, stride, rows, prev = zlib.decompress(data), width * channels, [], bytes(width * channels)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b, c = prev[i], prev[i - channels] if i >= channels else 0
            p = a + b - c
            pred = (a if abs(p - a) <= abs(p - b) and abs(p - a) <= abs(p - c)
                    else b if abs(p - b) <= abs(p - c) else c)
            line[i] = (line[i] + (0, a, b, (a + b) // 2, pred)[kind]) & 0xFF
        rows.append(bytes(line))
        prev = bytes(line)
    return width, height, rows


def test_the_page_shows_routes_replicas_and_keys_in_a_real_browser(tmp_path):
    gw = GatewaySettings("page", api_keys_file=str(_keys(tmp_path)), metrics="127.0.0.1:9101")
    with door(tmp_path, gw) as d:
        for model in ("m1", "m2"):
            assert d.request("POST", "/v1/chat/completions", _chat(model), key="sk-two-9c2e")[0] \
                in (200, 404)
        url = f"http://127.0.0.1:{d.metrics_port}/status"
        # without a key: the browser gets 401 and no page
        said = _browser(tmp_path, "--dump-dom", url)
        assert "two" not in said.stdout and "m1" not in said.stdout, said.stdout[:400]
        # a gateway key as the password (Basic: any user name)
        keyed = url.replace("http://", "http://me:sk-plain-1f3a@")
        said = _browser(tmp_path, "--dump-dom", keyed)
        dom = said.stdout
        assert '<table id="routes">' in dom, (dom[:400], said.stderr[-400:])
        # names that lead to the same replicas share a row
        for route in ("alias, m1", "m2"):
            assert f'<td class="route" rowspan="1">{route}</td>' in dom, dom
        assert '<td class="key">two</td>' in dom and "sk-" not in dom
        shot = tmp_path / "page.png"
        said = _browser(tmp_path, f"--screenshot={shot}", "--window-size=900,700", keyed)
        assert shot.exists() and shot.stat().st_size > 2000, said.stderr[-400:]
        width, height, rows = _pixels(shot.read_bytes())
        assert (width, height) == (900, 700)
        # text was drawn: dark pixels on the light page, on many lines
        dark_rows = [y for y, row in enumerate(rows)
                     if any(sum(row[i:i + 3]) < 200 for i in range(0, len(row), len(row) // width))]
        assert len(dark_rows) > 60, len(dark_rows)
