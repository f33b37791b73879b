"""The listening socket a socket unit passes to the program it starts
(``LISTEN_FDS``/``LISTEN_PID``, sd_listen_fds(3)): for the proxies that take
the public port's connections. Standard library only, and light: the swap
proxy imports it before anything else."""

from __future__ import annotations

import os
import socket

__all__ = ["SD_LISTEN_FDS_START", "passed_listener"]

SD_LISTEN_FDS_START = 3  # the first passed descriptor (sd-daemon.h)


def passed_listener() -> socket.socket | None:
    """The first socket passed to this process, None when none was."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or not os.environ.get("LISTEN_FDS"):
        return None
    return socket.socket(fileno=SD_LISTEN_FDS_START)
