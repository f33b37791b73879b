"""GPUs through NVML (the ``pynvml`` module of NVIDIA's ``nvidia-ml-py``): what is
there, who uses it, where an instance goes, and whether its memory is free.

Everything above the pynvml function boundary is here and real; the tests swap
in a fake ``pynvml`` module with the same functions and error types.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType

from unitgen.errors import Problem, SpecError, UnitgenError
from unitgen.result import Result

__all__ = [
    "Gpu",
    "GpuProcess",
    "GpuUnavailableError",
    "Placement",
    "gpus_report",
    "instance_of_pid",
    "manager_of_scope",
    "place",
    "read_gpus",
    "unit_of_cgroup",
]


class GpuUnavailableError(UnitgenError):
    """No NVML here: no NVIDIA driver, no library, or no permission."""


@dataclass(frozen=True)
class GpuProcess:
    """A process holding memory on a GPU."""

    pid: int
    used_bytes: int
    instance: str | None = None  # the unitgen instance it belongs to, if any
    alive: bool = True
    manager: str = ""  # whose unit runs it: "system", or "user@UID" for a user's manager

    def belongs_to(self, name: str, manager: str) -> bool:
        """True for a process of instance ``name`` of that manager (``system`` or
        ``user@UID``): a user's own ``app.slice/qwen2.service`` is not system
        instance ``qwen2``, and user 1000's ``qwen2`` is not user 1001's."""
        return self.instance == name and self.manager == manager


@dataclass(frozen=True)
class Gpu:
    """One GPU as NVML reports it."""

    index: int
    uuid: str
    name: str
    minor: int | None
    total: int
    used: int
    free: int
    processes: tuple[GpuProcess, ...] = ()

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Gpu:
        """One GPU of ``unitgen gpus --json`` (another host's, for --gpus-from)."""
        procs = data.get("processes") or []
        assert isinstance(procs, list)  # noqa: S101 - a TypeError below says the same
        return cls(
            index=int(str(data["index"])), uuid=str(data["uuid"]), name=str(data["name"]),
            minor=None if data.get("minor") is None else int(str(data["minor"])),
            total=int(str(data["total"])), used=int(str(data["used"])),
            free=int(str(data["free"])),
            processes=tuple(GpuProcess(int(p["pid"]), int(p["used_bytes"]), p.get("instance"),
                                       bool(p.get("alive", True)), str(p.get("manager", "")))
                            for p in procs),
        )


@dataclass(frozen=True)
class Placement:
    """Where an instance runs: GPU UUIDs (stable across reboots) and device minors."""

    uuids: tuple[str, ...]
    minors: tuple[int, ...] | None  # None: unknown (rendered without NVML)
    share: bool = False
    notices: tuple[str, ...] = field(default_factory=tuple)


def _nvml() -> ModuleType:
    try:
        return importlib.import_module("pynvml")
    except ImportError:
        raise GpuUnavailableError("the pynvml module (package nvidia-ml-py) is not installed") from None


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _reason(nv: ModuleType, exc: Exception) -> str:
    value = getattr(exc, "value", None)
    if value == getattr(nv, "NVML_ERROR_LIBRARY_NOT_FOUND", -1):
        return "no NVIDIA driver library (libnvidia-ml.so) on this host"
    if value == getattr(nv, "NVML_ERROR_DRIVER_NOT_LOADED", -1):
        return "the NVIDIA driver is not loaded"
    if value == getattr(nv, "NVML_ERROR_NO_PERMISSION", -1):
        return "no permission to query the NVIDIA driver"
    return f"NVML error: {exc}"


_UNIT_CGROUP = re.compile(
    r"^(?P<root>.*?)/(?P<slice>system\.slice|app\.slice)/"
    r"(?P<name>[a-z0-9][a-z0-9-]*?)(?:-backend)?\.service(?:/.*)?$")


_USER_MANAGER = re.compile(r"/user@(?P<uid>\d+)\.service$")


def manager_of_scope(scope: str) -> str:
    """The manager unitgen talks to for ``scope``, named as :func:`unit_of_cgroup`
    names a process's: ``system``, or ``user@UID`` for this user's own manager."""
    return "system" if scope == "system" else f"user@{os.getuid()}"


def unit_of_cgroup(text: str) -> tuple[str, str] | None:
    """(instance, manager) from the text of /proc/PID/cgroup: ``system`` for
    ``/system.slice/NAME(-backend).service``, ``user@UID`` for the user manager
    of UID, ``.../user@UID.service/app.slice/NAME(-backend).service`` (two users'
    managers may each run a ``qwen2``); None otherwise. Reads the cgroup2 line,
    or systemd's named v1 hierarchy on hybrid hosts."""
    for line in text.splitlines():
        _, controllers, path = ([*line.split(":", 2), "", ""])[:3]
        if controllers not in ("", "name=systemd"):
            continue
        match = _UNIT_CGROUP.fullmatch(path)
        if not match:
            continue
        root, kind = match.group("root"), match.group("slice")
        if kind == "system.slice" and root == "":
            return match.group("name"), "system"
        user = _USER_MANAGER.search(root)
        if kind == "app.slice" and user:
            return match.group("name"), f"user@{user.group('uid')}"
    return None


def instance_of_pid(pid: int | str) -> tuple[str, str] | None:
    """(instance, manager) of the unit that runs ``pid``."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    return unit_of_cgroup(text)


def _pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _process(pid: int, used: int) -> GpuProcess:
    owner = instance_of_pid(pid)
    return GpuProcess(pid, used, owner[0] if owner else None, _pid_alive(pid),
                      owner[1] if owner else "")


def read_gpus() -> list[Gpu]:
    """Every GPU with its memory and processes; GpuUnavailableError with a reason if none can be read."""
    nv = _nvml()
    try:
        nv.nvmlInit()
    except nv.NVMLError as exc:
        raise GpuUnavailableError(_reason(nv, exc)) from None
    try:
        gpus: list[Gpu] = []
        for index in range(nv.nvmlDeviceGetCount()):
            handle = nv.nvmlDeviceGetHandleByIndex(index)
            mem = nv.nvmlDeviceGetMemoryInfo(handle)
            try:
                minor: int | None = int(nv.nvmlDeviceGetMinorNumber(handle))
            except nv.NVMLError:
                minor = None
            procs: dict[int, int] = {}
            for getter in ("nvmlDeviceGetComputeRunningProcesses",
                           "nvmlDeviceGetGraphicsRunningProcesses"):
                try:
                    for p in getattr(nv, getter)(handle):
                        procs[int(p.pid)] = procs.get(int(p.pid), 0) + int(p.usedGpuMemory or 0)
                except nv.NVMLError:
                    continue
            gpus.append(Gpu(
                index=index, uuid=_text(nv.nvmlDeviceGetUUID(handle)),
                name=_text(nv.nvmlDeviceGetName(handle)), minor=minor,
                total=int(mem.total), used=int(mem.used), free=int(mem.free),
                processes=tuple(_process(pid, used) for pid, used in sorted(procs.items())),
            ))
        return gpus
    except nv.NVMLError as exc:
        raise GpuUnavailableError(_reason(nv, exc)) from None
    finally:
        with contextlib.suppress(nv.NVMLError):
            nv.nvmlShutdown()


def gib(n: int) -> str:
    """Bytes as GiB with one decimal."""
    return f"{n / 1024**3:.1f} GiB"


def place(
    *,
    source: str,
    name: str,
    want: int | tuple[int, ...] | tuple[str, ...],
    memory: int | None,
    share: bool,
    gpus: list[Gpu] | None,
    claims: dict[str, list[tuple[str, bool]]],
    scope: str = "system",
    mates: frozenset[str] = frozenset(),
) -> Placement:
    """Choose GPUs for instance ``name``.

    ``gpus`` is None when NVML is unavailable (offline render: only UUIDs work).
    ``claims`` maps a GPU UUID to the other instances placed there (name, shares).
    ``scope`` is the manager the instance goes to: only processes of its units
    under that very manager (``user@UID`` for a user's) are its own.
    ``mates`` are the other members of its swap group: they never run at the
    same time, so their claims are no conflict and their memory counts as free.
    """
    def fail(message: str) -> SpecError:
        return SpecError(problems=[Problem(source, "gpus", message)])

    manager = manager_of_scope(scope)
    mine = mates | {name}
    others = {u: [(n, s) for n, s in c if n not in mine] for u, c in claims.items()}
    if gpus is None:
        if isinstance(want, tuple) and want and isinstance(want[0], str):
            uuids = tuple(str(w) for w in want)
            _check_claims(fail, uuids, others, share, name)
            return Placement(uuids, None, share, ("NVML is not available: GPUs rendered by UUID "
                                                  "without checking them",))
        raise fail("choosing GPUs by count or index needs NVML (an NVIDIA driver) on this host; "
                   "give GPU UUIDs to render elsewhere")
    by_uuid = {g.uuid: g for g in gpus}
    by_index = {g.index: g for g in gpus}
    if isinstance(want, int):
        if want > len(gpus):
            raise fail(f"asks for {want} GPUs; this host has {len(gpus)}")
        usable = [g for g in gpus if _may_use(others.get(g.uuid, []), share)]
        if len(usable) < want:
            taken = ", ".join(f"{g.index} ({', '.join(n for n, _ in others[g.uuid])})"
                              for g in gpus if others.get(g.uuid))
            raise fail(f"asks for {want} GPUs but only {len(usable)} are not claimed by other "
                       f"instances (claimed: {taken}); set gpu_share = true to share")
        current = [by_uuid[u] for u, c in claims.items()
                   if any(n == name for n, _ in c) and u in by_uuid and by_uuid[u] in usable]
        if len(current) == want:
            chosen = sorted(current, key=lambda g: g.index)  # a redeploy keeps its GPUs
        else:
            usable.sort(key=lambda g: (-_free_for(g, mine, manager), g.index))
            chosen = sorted(usable[:want], key=lambda g: g.index)
    else:
        chosen = []
        for item in want:
            gpu = by_index.get(item) if isinstance(item, int) else by_uuid.get(item)
            if gpu is None:
                known = ", ".join(f"{g.index}={g.uuid}" for g in gpus) or "none"
                raise fail(f"GPU {item} is not on this host (GPUs: {known})")
            chosen.append(gpu)
        _check_claims(fail, tuple(g.uuid for g in chosen), others, share, name)
    if memory is not None:
        for g in chosen:
            free = _free_for(g, mine, manager)
            if free < memory:
                holders = ", ".join(
                    f"pid {p.pid}" + (f" ({p.instance})" if p.instance else "")
                    + f" {gib(p.used_bytes)}" for p in g.processes
                    if not p.belongs_to(name, manager)
                ) or "no process NVML can see"
                raise SpecError(problems=[Problem(
                    source, "gpu_memory",
                    f"needs {gib(memory)} but GPU {g.index} ({g.uuid}) has {gib(free)} free of "
                    f"{gib(g.total)}; the rest is held by {holders}")])
    minors = tuple(g.minor for g in chosen if g.minor is not None)
    return Placement(tuple(g.uuid for g in chosen),
                     minors if len(minors) == len(chosen) else None, share)


def _free_for(g: Gpu, names: frozenset[str], manager: str) -> int:
    """Free memory, counting what this instance's own processes (a redeploy
    replaces them) and its swap-group mates' (they unload first) hold as free."""
    return g.free + sum(p.used_bytes for p in g.processes
                        if any(p.belongs_to(n, manager) for n in names))


def _may_use(claimers: list[tuple[str, bool]], share: bool) -> bool:
    return not claimers or (share and all(s for _, s in claimers))


def _check_claims(
    fail: Callable[[str], SpecError],
    uuids: tuple[str, ...],
    others: dict[str, list[tuple[str, bool]]],
    share: bool,
    name: str,
) -> None:
    for uuid in uuids:
        claimers = others.get(uuid, [])
        if not _may_use(claimers, share):
            names = ", ".join(n for n, _ in claimers)
            raise fail(f"GPU {uuid} is already claimed by {names}; set gpu_share = true in "
                       "every instance that shares it")


def gpus_report() -> Result:
    """``unitgen gpus``: every GPU, its memory and processes, and their instances.
    Without NVML: one line saying why, exit 0 (CPU-only hosts are fine)."""
    try:
        gpus = read_gpus()
    except GpuUnavailableError as exc:
        return Result(data={"available": False, "reason": exc.message, "gpus": []},
                      lines=(f"no NVIDIA GPUs: {exc.message}",))
    lines: list[str] = []
    for g in gpus:
        lines.append(f"{g.index}  {g.uuid}  {g.name}  {gib(g.used)} used / {gib(g.total)} "
                     f"({gib(g.free)} free)")
        for p in g.processes:
            owner = (f"{p.instance} ({p.manager} manager)" if p.instance else
                     "exited" if not p.alive else "not a unitgen instance")
            lines.append(f"     pid {p.pid}  {gib(p.used_bytes)}  {owner}")
    if not gpus:
        lines.append("NVML works but reports 0 GPUs")
    return Result(data={"available": True, "gpus": [asdict(g) for g in gpus]}, lines=tuple(lines))
