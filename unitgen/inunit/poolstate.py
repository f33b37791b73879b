"""What a GPU pool's members know of each other at run time (issue 27), in the
pool's directory under the manager's runtime directory (``%t/unitgen-pool``):

* ``<name>.json``: one member's own state, written only by its proxy
  (:class:`Runtime`: when it was last used, how many requests it is
  answering, whether its server sleeps, what it waits for);
* ``gpu-<UUID>.lock``: the GPU's lock, taken in :func:`unitgen.inunit.poolpolicy.lock_order`.

And where a member stands, from its units' states and its runtime
(:func:`load_of`), for the proxy's decisions and for ``status`` alike; the
host-RAM budget of sleeping members (:func:`ram_budget`).

Standard library only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from unitgen.inunit.poolpolicy import Load

__all__ = ["BUDGET_ENV", "Runtime", "load_of", "lock_path", "parse_bytes", "ram_budget",
           "read_runtime", "write_runtime"]

# The host RAM sleeping members may hold together: an operator's setting in the
# manager's environment (systemctl set-environment, DefaultEnvironment=), read
# by every member's proxy at each turn.
BUDGET_ENV = "UNITGEN_POOL_SLEEP_RAM"
_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,47}")


@dataclass
class Runtime:
    """One member's state as its proxy keeps it (times are Unix seconds)."""

    asleep_pid: int = 0  # its server's main pid when put to sleep (0: not asleep)
    last_used: float = 0.0  # it last had a connection
    in_flight: int = 0  # connections it is serving now
    loaded_at: float = 0.0  # it last became loaded (a load or a wake)
    load_seconds: float = 0.0  # how long its last load took
    wake_seconds: float = 0.0  # how long its last wake took
    ram_asleep: int = 0  # host RAM its server held asleep, last time
    stopped_at: float = 0.0  # its proxy last stopped its server to make room
    waiting_since: float = 0.0  # its proxy waits for room since (0: not waiting)
    waiting_why: str = ""  # the pool's answer while it waits


def _path(directory: Path, name: str, suffix: str) -> Path:
    if not _NAME.fullmatch(name):
        raise ValueError(f"not an instance name: {name!r}")
    return directory / f"{name}{suffix}"


def lock_path(directory: Path, gpu: str) -> Path:
    """A GPU's lock file (UUIDs are letters, digits and '-')."""
    if not re.fullmatch(r"[A-Za-z0-9-]+", gpu):
        raise ValueError(f"not a GPU UUID: {gpu!r}")
    return directory / f"gpu-{gpu}.lock"


def read_runtime(directory: Path, name: str) -> Runtime:
    """A member's runtime; the defaults when there is none or it cannot be read."""
    try:
        data = json.loads(_path(directory, name, ".json").read_text(encoding="utf-8"))
        rt = Runtime()
        for f in fields(Runtime):
            value = data.get(f.name)
            if isinstance(value, type(getattr(rt, f.name))) or (
                    isinstance(value, int) and isinstance(getattr(rt, f.name), float)):
                setattr(rt, f.name, value)
        return rt
    except (OSError, ValueError, TypeError, AttributeError):
        return Runtime()


def write_runtime(directory: Path, name: str, rt: Runtime) -> None:
    """Write it atomically (a reader sees the old state or the new one); a
    failure is not the proxy's business, only the next decision's."""
    path = _path(directory, name, ".json")
    # its own proxy is the one writer: a name of its own suffices (no tempfile import)
    tmp = str(directory / f".{name}.{os.getpid()}.{time.monotonic_ns()}")
    with contextlib.suppress(OSError):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(asdict(rt), fh)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def load_of(proxy: str, server: str, server_pid: int, rt: Runtime) -> Load:
    """Where a member stands, from its proxy's and server's ActiveState, its
    server's main pid and its runtime. A server asleep is one whose pid is the
    one its proxy put to sleep (a server restarted since is loaded again)."""
    if server == "activating":
        return Load.LOADING
    if server == "deactivating":
        return Load.DRAINING  # its memory is on its way out
    if server not in ("active", "reloading"):
        return Load.STOPPED
    if proxy == "deactivating":
        return Load.DRAINING
    if rt.asleep_pid and rt.asleep_pid == server_pid:
        return Load.ASLEEP
    return Load.LOADED


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
          "gb": 1000**3, "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2,
          "gib": 1024**3, "tib": 1024**4}


def parse_bytes(text: str) -> int:
    """``64GiB``, ``500MB``, ``1024`` as bytes (the spec's sizes); ValueError otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{text!r} is not a size (examples: 64GiB, 500MiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _mem_total(meminfo: str) -> int:
    for line in meminfo.splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def ram_budget(env: Mapping[str, str] | None = None,
               meminfo: str | None = None) -> tuple[int, str]:
    """The host RAM sleeping members may hold together, and where it comes from:
    :data:`BUDGET_ENV` when set (``0`` turns the sleeping tier off), else half
    the host's memory."""
    value = (os.environ if env is None else env).get(BUDGET_ENV, "").strip()
    if value:
        with contextlib.suppress(ValueError):
            return parse_bytes(value), BUDGET_ENV
    if meminfo is None:
        try:
            meminfo = Path("/proc/meminfo").read_text(encoding="utf-8")
        except OSError:
            meminfo = ""
    return _mem_total(meminfo) // 2, "half the host's memory"
