"""status and ls: what every instance is doing, in words users know, gathered in
one round of D-Bus calls."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import psutil

from unitgen.features.base import Feature
from unitgen.inunit.cgroupowner import manager_of_scope
from unitgen.inunit.nvml import Gpu, GpuUnavailableError, read_gpus
from unitgen.inunit.probe import attempt
from unitgen.ops.gpus import gpus_report
from unitgen.ops.systemd.bindings import features
from unitgen.ops.systemd.journal import last_lines
from unitgen.ops.systemd.manager import UnitInfo, connect
from unitgen.ops.systemd.session import Session
from unitgen.result import Result, table
from unitgen.targets.systemd.installed import Installed, require, scan, unit_dir

__all__ = ["HEALTH_TIMEOUT", "InstanceStatus", "ProcessTable", "health_target", "list_instances",
           "restart_reason", "status", "tree_memory"]

# "ready" means the health path answered just now, within this long; every
# instance is asked at once, so 100 instances take about this long at worst.
HEALTH_TIMEOUT = 1.0


@dataclass(frozen=True)
class InstanceStatus:
    """One instance's state for ``unitgen status``."""

    name: str
    state: str  # stopped, listening, starting, ready, unhealthy, idle-stopped, failed
    address: str
    backend: str
    pid: int | None
    uptime_s: float | None
    memory_bytes: int | None
    detail: str
    gpus: tuple[int, ...] = ()  # GPU indexes it is placed on
    gpu_memory_bytes: int | None = None  # GPU memory its processes hold
    restarts: int = 0  # automatic restarts of the server since it was started
    activation: str = ""  # eager or on-demand (a gateway must not wake an on-demand one)


class ProcessTable:
    """Parents and resident memory of every process, read once: asking psutil for
    each instance's children scans all of /proc again (1.2 s for 100 instances)."""

    def __init__(self) -> None:
        self.children: dict[int, list[int]] = {}
        self.rss: dict[int, int] = {}
        for proc in psutil.process_iter(["ppid", "memory_info"]):
            info = proc.info
            if info.get("memory_info") is None:
                continue
            self.children.setdefault(int(info["ppid"] or 0), []).append(proc.pid)
            self.rss[proc.pid] = int(info["memory_info"].rss)

    def tree_memory(self, pid: int) -> int | None:
        """Resident memory of a process and all its descendants."""
        if pid not in self.rss:
            return None
        total, todo, seen = 0, [pid], set()
        while todo:
            current = todo.pop()
            if current in seen:
                continue
            seen.add(current)
            total += self.rss.get(current, 0)
            todo.extend(self.children.get(current, []))
        return total


    def unit_memory(self, pid: int) -> int | None:
        """Resident memory of every process in the unit of ``pid`` (its cgroup and
        those below): a container's processes are conmon's children, not podman's,
        but they are in the unit's cgroup (--cgroups=split)."""
        try:
            lines = Path(f"/proc/{pid}/cgroup").read_text(encoding="utf-8").split("\n")
        except OSError:
            return self.tree_memory(pid)
        v1 = [ln.split(":", 2)[2] for ln in lines if ":name=systemd:" in ln]
        v2 = [ln.split(":", 2)[2] for ln in lines if ln.startswith("0::")]
        top = (Path("/sys/fs/cgroup/systemd") / v1[0].lstrip("/")) if v1 else \
            (Path("/sys/fs/cgroup") / v2[0].lstrip("/")) if v2 else None
        if top is None:
            return self.tree_memory(pid)
        top = top.parent if top.name == "runtime" else top  # podman run's own leaf
        pids: set[int] = set()
        for procs in top.rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                pids |= {int(w) for w in procs.read_text(encoding="utf-8").split()}
        return sum(self.rss.get(p, 0) for p in pids) or self.tree_memory(pid)


def tree_memory(pid: int) -> int | None:
    """Resident memory of a process and all its descendants."""
    return ProcessTable().tree_memory(pid)


START_LIMIT_BURST = 5  # as the units say (StartLimitBurst=)

# systemd's Result= values of a failed unit, in words.
_RESULTS = {
    "start-limit-hit": "failed again and again and was stopped at its start limit (5 starts in "
                       "10 min); see `unitgen logs`, fix it, then deploy again",
    "exit-code": "the server exited with an error",
    "signal": "the server was killed by a signal",
    "core-dump": "the server crashed (core dump)",
    "watchdog": "did not answer its health path within the watchdog bound",
    "timeout": "did not become ready before the [health] timeout",
    "resources": "systemd could not set it up (a missing directory, user or device?)",
}


def describe(inst: Installed, infos: dict[str, UnitInfo],
             table: ProcessTable | None = None, *, cgroup: bool = False) -> InstanceStatus:
    """Turn unit states into one word and a reason (``cgroup``: its server's
    processes are not the main process's tree, count its unit's whole cgroup)."""
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
        words = _RESULTS.get(unit.result, f"Result: {unit.result}")
        if unit.n_restarts >= START_LIMIT_BURST - 1:
            # systemd 252 keeps the last run's Result= when the start limit stops it
            words = _RESULTS["start-limit-hit"] + f" (last run: {words})"
        detail = f"{unit.name}: {words}" + (f"; {unit.status_text}" if unit.status_text else "")
    elif "activating" in (server.active_state, svc.active_state):
        state = "starting"
        detail = server.status_text or svc.status_text
    elif server.active_state == "active" and (svc.active_state == "active" or (
            server is not svc and sock.active_state == "active")):
        # After a restart of the server its proxy starts again with the next
        # connection (the socket holds it meanwhile): that is still ready.
        state = "ready"
    elif sock.active_state == "active":
        state = "idle-stopped" if server.exec_main_start_usec else "listening"
    else:
        state = "stopped"
    pid = server.main_pid or None
    uptime = None
    if pid and server.active_enter_usec:
        uptime = max(0.0, time.time() - server.active_enter_usec / 1e6)
    return InstanceStatus(name, state, address, "gateway" if inst.is_gateway else inst.backend,
                          pid, uptime,
                          _memory(table or ProcessTable(), pid, cgroup), detail,
                          restarts=server.n_restarts,
                          activation="eager" if inst.eager else "on-demand")


def _memory(table: ProcessTable, pid: int | None, cgroup: bool) -> int | None:
    if not pid:
        return None
    return table.unit_memory(pid) if cgroup else table.tree_memory(pid)


def health_target(inst: Installed, scope: str) -> str:
    """Where an instance's health path is asked from outside: the server's private
    endpoint when it has one (a check through the public port would count as a
    connection and keep an idle_stop instance running), else the public port."""
    if inst.private_unix:
        runtime = os.environ.get("XDG_RUNTIME_DIR", "/run") if scope == "user" else "/run"
        return inst.private_unix.replace("%t", runtime)
    if inst.private_port:
        return f"127.0.0.1:{inst.private_port}"
    return inst.probe_target


def _check_health(row: InstanceStatus, inst: Installed, scope: str) -> InstanceStatus:
    if row.state != "ready":
        return row
    target = health_target(inst, scope)
    result = attempt(target, inst.probe_path, None, timeout=HEALTH_TIMEOUT)
    if result.outcome in ("ready", "fatal"):  # 401/403 answers too: only the key is missing
        return row
    if result.detail.startswith("PermissionError"):
        # a sandboxed server's socket is its own user's; only root may ask it
        return replace(row, detail=f"health not checked: no permission to reach {target} "
                                   "(run status as root)")
    return replace(row, state="unhealthy",
                   detail=f"{target}{inst.probe_path} did not answer: {result.detail}")


# Our own tools say why best (the checker, the probe); the manager's lines next.
_WHY_MARKS = (("did not answer", "exited while loading", "not ready"),
              ("Watchdog timeout", "Main process exited"))


def restart_reason(unit: str, scope: str) -> str:
    """Why systemd last restarted ``unit``, from its journal: the manager's verdict
    (``Failed with result 'watchdog'``, where the journal has the manager's lines)
    and the liveness checker's or probe's last complaint before it."""
    lines = last_lines(unit, scope, lines=300)
    verdicts = [i for i, ln in enumerate(lines) if "Failed with result" in ln]
    cut = verdicts[-1] if verdicts else len(lines)
    begin = verdicts[-2] + 1 if len(verdicts) > 1 else 0  # not an earlier restart's cause
    why: list[str] = []
    for marks in _WHY_MARKS:
        why = why or [ln.strip() for ln in lines[begin:cut] if any(m in ln for m in marks)]
    reason = why[-1] if why else ""
    if verdicts:
        result = lines[cut].partition("Failed with result")[2].strip(" '.")
        return f"{result} ({reason})" if reason else result
    return reason


def _with_restarts(row: InstanceStatus, inst: Installed, scope: str) -> InstanceStatus:
    if not row.restarts:
        return row
    reason = restart_reason(inst.server_unit, scope)
    times = "time" if row.restarts == 1 else "times"
    note = f"restarted {row.restarts} {times}" + (f"; last: {reason}" if reason else "")
    return replace(row, detail=f"{row.detail}; {note}" if row.detail else note)


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


async def _status(names: list[str], scope: str,
                  feats: list[Feature]) -> list[InstanceStatus]:
    installed = require(scope, names)
    chosen = names or sorted(installed)
    units = [u for n in chosen for u in installed[n].units]
    async with connect(scope) as m:
        # one call for every unit's state; all properties only of each server
        # unit (pid, restarts, status line) and of units in trouble
        infos = await m.overview(units, {installed[n].server_unit for n in chosen})
    table = ProcessTable()
    rows = [describe(installed[n], infos, table,
                     cgroup=any(f.owns_processes(installed[n]) for f in feats)) for n in chosen]
    if rows:
        # Health and restart reasons are network and journal reads: all at once.
        with ThreadPoolExecutor(max_workers=min(64, len(rows))) as pool:
            rows = list(pool.map(lambda r: _with_restarts(
                _check_health(r, installed[r.name], scope), installed[r.name], scope), rows))
    if any(installed[n].gpus for n in chosen):
        try:
            gpus = read_gpus()
        except GpuUnavailableError:
            gpus = []
        rows = [_with_gpus(r, installed[r.name], gpus, scope) for r in rows]
    return rows


def _with_gpus(row: InstanceStatus, inst: Installed, gpus: list[Gpu], scope: str) -> InstanceStatus:
    index = {g.uuid: g.index for g in gpus}
    manager = manager_of_scope(scope)
    used = sum(p.used_bytes for g in gpus for p in g.processes if p.belongs_to(row.name, manager))
    return replace(row, gpus=tuple(index[u] for u in inst.gpus if u in index),
                   gpu_memory_bytes=used if gpus else None)


def status(names: list[str], scope: str, detail: frozenset[str] = frozenset()) -> Result:
    """Status of the named instances (all when none are named), and what each
    feature says (swap groups, gateways)."""
    session = Session(scope)
    try:
        feats = features(session)
        rows = asyncio.run(_status(names, scope, feats))
        installed = scan(unit_dir(scope))
        states = {r.name: r.state for r in rows}
        data: dict[str, object] = {"instances": [asdict(r) for r in rows]}
        more: tuple[str, ...] = ()
        for f in feats:
            said, lines = f.status(installed, states, detail)
            data.update(said)
            more += lines
    finally:
        session.close()
    table = [("NAME", "STATE", "ADDRESS", "BACKEND", "PID", "UPTIME", "MEMORY", "GPUS", "GPU MEM",
              "DETAIL")]
    table += [(r.name, r.state, r.address, r.backend, str(r.pid or "-"), _human_time(r.uptime_s),
               _human_bytes(r.memory_bytes), ",".join(map(str, r.gpus)) or "-",
               _human_bytes(r.gpu_memory_bytes), r.detail) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(9)]
    shown = tuple(
        "  ".join(cell.ljust(w) for cell, w in zip(row[:9], widths, strict=True)) + "  " + row[9]
        for row in table
    )
    return Result(data=data, lines=(tuple(ln.rstrip() for ln in shown) if rows
                                    else ("no instances",)) + more)


def gpus_with_features(scope: str) -> Result:
    """``unitgen gpus``: NVML's view, then what each feature says of the GPUs."""
    session = Session(scope)
    try:
        installed = scan(unit_dir(scope))
        sections = [f.gpus(installed) for f in features(session)]
    finally:
        session.close()
    return gpus_report([s for s in sections if s != ({}, ())])


def list_instances(scope: str) -> Result:
    """Installed instances, from the unit files alone (no manager needed)."""
    installed = scan(unit_dir(scope))
    rows = [{"name": i.name, "backend": i.backend, "address": f"{i.public_host}:{i.public_port}",
             "activation": "eager" if i.eager else "on-demand", "units": i.units}
            for i in installed.values()]
    lines = table(("NAME", "BACKEND", "ADDRESS", "ACTIVATION"),
                  [(str(r["name"]), str(r["backend"]), str(r["address"]), str(r["activation"]))
                   for r in rows]) if rows else ("no instances",)
    return Result(data={"instances": rows}, lines=lines)
