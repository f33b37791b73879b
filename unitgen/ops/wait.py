"""The one readiness wait: ask until there is an answer, the deadline passes,
or the caller gives up; say how it goes every few seconds. Every target's
deploy (a systemd start job, supervisord's public port, a restored version)
waits through it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["wait_until"]

T = TypeVar("T")


def wait_until(poll: Callable[[], T | None], *, timeout: float, every: float,
               progress: Callable[[float], None] | None = None,
               progress_every: float = 5.0) -> T | None:
    """Call ``poll`` until it returns something (returned), or ``timeout``
    seconds pass (None). ``poll`` may block up to ``every`` itself (a D-Bus
    signal); otherwise the wait sleeps ``every`` between polls. ``progress`` gets
    the seconds waited, every ``progress_every``."""
    start = time.monotonic()
    deadline = start + timeout
    next_say = start + progress_every
    while True:
        began = time.monotonic()
        answer = poll()
        if answer is not None:
            return answer
        now = time.monotonic()
        if now >= deadline:
            return None
        if progress is not None and now >= next_say:
            progress(now - start)
            next_say = now + progress_every
        time.sleep(max(0.0, min(every - (now - began), deadline - now)))
