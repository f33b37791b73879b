"""Fixtures: a real systemd user manager (with journald and session D-Bus),
started once per test session and stopped by its pid even when tests fail."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from unitgen.ops.sandbox import Sandbox, sandbox_unavailable_reason


@pytest.fixture(scope="session")
def sandbox() -> Iterator[Sandbox]:
    """A private systemd user manager; skipped with the reason where it cannot start."""
    reason = sandbox_unavailable_reason()
    if reason:
        pytest.skip(f"no private systemd manager: {reason}")
    box = Sandbox.start(tie_to_parent=True)
    try:
        yield box
    finally:
        box.stop()
