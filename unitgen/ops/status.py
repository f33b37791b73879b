"""status and ls: what every instance is doing, in words users know, gathered in
one round of D-Bus calls."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import asdict, dataclass, replace

import psutil

from unitgen.ops.swap import status_section
from unitgen.ops.systemd import UnitInfo, connect
from unitgen.plan.gpus import Gpu, GpuUnavailableError, read_gpus
from unitgen.result import Result
from unitgen.targets.systemd.installed import Installed, require, scan, unit_dir

__all__ = ["InstanceStatus", "list_instances", "status", "tree_memory"]


@dataclass(frozen=True)
class InstanceStatus:
    """One instance's state for ``unitgen status``."""

    name: str
    state: str  # stopped, listening, starting, ready, idle-stopped, failed
    address: str
    backend: str
    pid: int | None
    uptime_s: float | None
    memory_bytes: int | None
    detail: str
    gpus: tuple[int, ...] = ()  # GPU indexes it is placed on
    gpu_memory_bytes: int | None = None  # GPU memory its processes hold


def tree_memory(pid: int) -> int | None:
    """Resident memory of a process and all its descendants."""
    try:
        proc = psutil.Process(pid)
        total = proc.memory_info().rss
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += child.memory_info().rss
        return int(total)
    except psutil.Error:
        return None


def describe(inst: Installed, infos: dict[str, UnitInfo]) -> InstanceStatus:
    """Turn unit states into one word and a reason."""
    name = inst.name
    sock = infos[f"{name}.socket"]
    svc = infos[f"{name}.service"]
    server = infos.get(f"{name}-backend.service", svc)
    address = f"{inst.public_host}:{inst.public_port}" if ":" not in inst.public_host \
        else f"[{inst.public_host}]:{inst.public_port}"
    failed = [u for u in (server, svc, sock) if u.active_state == "failed"]
    detail = ""
    if failed:
        unit = failed[0]
        state = "failed"
        detail = f"{unit.name}: {unit.status_text or 'Result: ' + unit.result}"
    elif "activating" in (server.active_state, svc.active_state):
        state = "starting"
        detail = server.status_text or svc.status_text
    elif server.active_state == "active" and svc.active_state == "active":
        state = "ready"
    elif sock.active_state == "active":
        state = "idle-stopped" if server.exec_main_start_usec else "listening"
    else:
        state = "stopped"
    pid = server.main_pid or None
    uptime = None
    if pid and server.active_enter_usec:
        uptime = max(0.0, time.time() - server.active_enter_usec / 1e6)
    return InstanceStatus(name, state, address, inst.backend, pid, uptime,
                          tree_memory(pid) if pid else None, detail)


def _human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return f"{size:.1f}GiB"


def _human_time(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f}min"
    return f"{s / 3600:.1f}h"


async def _status(names: list[str], scope: str) -> list[InstanceStatus]:
    installed = require(scope, names)
    chosen = names or sorted(installed)
    units = [u for n in chosen for u in installed[n].units]
    async with connect(scope) as m:
        infos = await m.info(units) if units else {}
    rows = [describe(installed[n], infos) for n in chosen]
    if any(installed[n].gpus for n in chosen):
        try:
            gpus = read_gpus()
        except GpuUnavailableError:
            gpus = []
        rows = [_with_gpus(r, installed[r.name], gpus) for r in rows]
    return rows


def _with_gpus(row: InstanceStatus, inst: Installed, gpus: list[Gpu]) -> InstanceStatus:
    index = {g.uuid: g.index for g in gpus}
    used = sum(p.used_bytes for g in gpus for p in g.processes if p.instance == row.name)
    return replace(row, gpus=tuple(index[u] for u in inst.gpus if u in index),
                   gpu_memory_bytes=used if gpus else None)


def status(names: list[str], scope: str) -> Result:
    """Status of the named instances (all when none are named)."""
    rows = asyncio.run(_status(names, scope))
    table = [("NAME", "STATE", "ADDRESS", "BACKEND", "PID", "UPTIME", "MEMORY", "GPUS", "GPU MEM",
              "DETAIL")]
    table += [(r.name, r.state, r.address, r.backend, str(r.pid or "-"), _human_time(r.uptime_s),
               _human_bytes(r.memory_bytes), ",".join(map(str, r.gpus)) or "-",
               _human_bytes(r.gpu_memory_bytes), r.detail) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(9)]
    lines = tuple(
        "  ".join(cell.ljust(w) for cell, w in zip(row[:9], widths, strict=True)) + "  " + row[9]
        for row in table
    )
    swap_data, swap_lines = status_section(scope)
    return Result(data={"instances": [asdict(r) for r in rows], **swap_data},
                  lines=(tuple(ln.rstrip() for ln in lines) if rows else ("no instances",))
                  + swap_lines)


def list_instances(scope: str) -> Result:
    """Installed instances, from the unit files alone (no manager needed)."""
    installed = scan(unit_dir(scope))
    rows = [{"name": i.name, "backend": i.backend, "address": f"{i.public_host}:{i.public_port}",
             "activation": "eager" if i.eager else "on-demand", "units": i.units}
            for i in installed.values()]
    lines = tuple(f"{r['name']}  {r['backend']}  {r['address']}  {r['activation']}" for r in rows)
    return Result(data={"instances": rows}, lines=lines or ("no instances",))
