"""The live tier's shared fixture (the private manager itself: tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.live.test_operate_live import cli
from unitgen.ops.systemd.sandbox import Sandbox


@pytest.fixture
def box(sandbox: Sandbox) -> Iterator[Sandbox]:
    """The shared sandbox; instances a test deployed are removed afterwards (and
    the manager forgets failed units), whatever the test's outcome."""
    before = {p.name for p in sandbox.unit_dir.glob("*")}
    yield sandbox
    names = sorted({p.stem for p in sandbox.unit_dir.glob("*.socket")
                    if p.name not in before and "unitgen-instance" in p.read_text()})
    if names:
        cli(sandbox, "remove", "--user", *names)
    sandbox.systemctl("reset-failed")
