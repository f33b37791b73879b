"""What doctor finds, for every target: a finding is a sentence a user can act
on; ``listening`` says where a server's process tree really listens."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import psutil

__all__ = ["Finding", "listening"]


@dataclass(frozen=True)
class Finding:
    """One check: ok or not, in a sentence a user can act on."""

    ok: bool
    text: str


def _tree(pid: int) -> list[int]:
    try:
        proc = psutil.Process(pid)
        return [pid, *(c.pid for c in proc.children(recursive=True))]
    except psutil.Error:
        return []


def listening(pid: int) -> tuple[set[int], set[str]]:
    """TCP ports and Unix socket paths the process tree of ``pid`` listens on."""
    pids = set(_tree(pid))
    ports: set[int] = set()
    paths: set[str] = set()
    for conn in psutil.net_connections(kind="inet"):
        if conn.pid in pids and conn.status == psutil.CONN_LISTEN and conn.laddr:
            ports.add(int(conn.laddr.port))
    with contextlib.suppress(psutil.Error):
        for conn in psutil.net_connections(kind="unix"):
            if conn.pid in pids and conn.laddr and conn.status in (psutil.CONN_LISTEN,
                                                                    psutil.CONN_NONE):
                paths.add(str(conn.laddr))
    return ports, paths
