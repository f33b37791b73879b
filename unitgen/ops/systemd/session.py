"""One conversation with a systemd manager for a whole command: one D-Bus
connection, subscribed to job signals, on one event loop, made on first use.
Deploy, remove and the features' bindings all speak through it, so a
command opens one connection however many steps it takes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, TypeVar

from unitgen.ops.systemd.manager import Manager, UnitInfo, connect

__all__ = ["Session"]

T = TypeVar("T")


class Session:
    """A manager (``system`` or ``user``) and an event loop to call it from sync code."""

    def __init__(self, scope: str) -> None:
        self.scope = scope
        self._runner = asyncio.Runner()
        self._conn: connect | None = None
        self._m: Manager | None = None

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run one coroutine (a D-Bus call or a few) to its end."""
        return self._runner.run(coro)

    @property
    def m(self) -> Manager:
        """The connected manager (connected on first use, subscribed to jobs)."""
        if self._m is None:
            self._conn = connect(self.scope)
            self._m = self.run(self._conn.__aenter__())
            self.run(self._m.subscribe())
        return self._m

    def info(self, units: list[str]) -> dict[str, UnitInfo]:
        """Units' states in one round trip."""
        return self.run(self.m.info(units))

    def active(self, unit: str) -> bool:
        """True when ``unit`` is active."""
        return self.info([unit])[unit].active_state == "active"

    def close(self) -> None:
        """Disconnect and close the event loop."""
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self.run(self._conn.__aexit__(None, None, None))
        self._runner.close()
