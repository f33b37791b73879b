"""Fixtures that carry their own assertions (Podman Quadlet's ``## assert-key-is``
lines): each file in tests/fixtures is a spec whose comment lines say what its
rendered units must hold. A property is pinned by the line that states it,
not by a byte-golden file that would also pin every comment.

    # context: user                                    (default: system scope)
    # assert-has: UNIT SECTION KEY VALUE              one assignment of KEY is VALUE
    # assert-absent: UNIT SECTION KEY                 KEY is not set in SECTION
    # assert-match: UNIT SECTION KEY REGEX            one assignment matches REGEX
    # assert-not-in-any-unit: TEXT                    no unit file contains TEXT
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import GOLDEN_CTX
from unitgen.ops.systemd.specs import render_spec
from unitgen.targets.systemd.render import RenderContext

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
ASSERT = re.compile(r"^# (assert-[a-z-]+|context): (.*)$")


def parse_unit(text: str) -> dict[tuple[str, str], list[str]]:
    """(section, key) -> every value assigned, in order (systemd's list semantics)."""
    out: dict[tuple[str, str], list[str]] = {}
    section = ""
    for line in text.splitlines():
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        if sep:
            out.setdefault((section, key), []).append(value)
    return out


def _check(kind: str, args: str, units: dict[str, str]) -> None:
    if kind == "assert-not-in-any-unit":
        assert not [n for n, t in units.items() if args in t], f"{args!r} is in a unit"
        return
    unit, section, key, *rest = args.split(" ", 3)
    values = parse_unit(units[unit]).get((section, key), [])
    want = rest[0] if rest else ""
    if kind == "assert-has":
        assert want in values, f"{unit} [{section}] {key}: {values} has no {want!r}"
    elif kind == "assert-absent":
        assert not values, f"{unit} [{section}] {key} is set: {values}"
    elif kind == "assert-match":
        assert any(re.search(want, v) for v in values), f"{unit} [{section}] {key}: {values}"
    else:
        raise AssertionError(f"unknown assertion {kind!r}")


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.toml")), ids=lambda p: p.stem)
def test_fixture_holds_what_it_says(path):
    lines = [m.groups() for line in path.read_text(encoding="utf-8").splitlines()
             if (m := ASSERT.match(line))]
    checks = [(k, a) for k, a in lines if k != "context"]
    assert checks, f"{path.name} asserts nothing"
    scope = next((a for k, a in lines if k == "context"), "system")
    ctx = GOLDEN_CTX if scope == "system" else RenderContext(
        python=GOLDEN_CTX.python, proxyd=GOLDEN_CTX.proxyd, scope="user")
    units = {f.name: f.text for f in render_spec(path, ctx).files if not f.secret}
    for kind, args in checks:
        _check(kind, args, units)


def test_an_assertion_can_fail():
    units = {"x.service": "[Service]\nUser=a\nUser=\n"}
    _check("assert-has", "x.service Service User a", units)
    with pytest.raises(AssertionError):
        _check("assert-has", "x.service Service User b", units)
    with pytest.raises(AssertionError):
        _check("assert-absent", "x.service Service User", units)
    with pytest.raises(AssertionError):
        _check("assert-match", "x.service Service User ^b", units)
    with pytest.raises(AssertionError):
        _check("assert-not-in-any-unit", "User=a", units)
