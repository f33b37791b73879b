"""The GPU inventory: what NVML (the ``pynvml`` module of NVIDIA's
``nvidia-ml-py``) says is there, how much memory each GPU has and which
processes hold it.

This is the one module of ``inunit/`` that uses a library outside the standard
library, and only at the NVML boundary: ``pynvml`` is imported when GPUs are
read, never at import, so the programs units run stay light. Everything above
that boundary is here and real; the tests put a fake ``pynvml`` with the same
functions and error types first on the path (tests/fake_nvml).

Which instance a process belongs to is not NVML's business: :func:`read_gpus`
is given a function that answers it (systemd's cgroup names by default,
:mod:`unitgen.inunit.cgroupowner`). This module imports nothing of unitgen
outside ``inunit/``, so the GPU wait inside a unit, placement in ``plan/``
and the verbs in ``ops/`` all read GPUs through it.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from unitgen.inunit.cgroupowner import Owner, instance_of_pid

__all__ = ["Gpu", "GpuProcess", "GpuUnavailableError", "OwnerOf", "gib", "read_gpus"]


class GpuUnavailableError(Exception):
    """No NVML here: no NVIDIA driver, no library, or no permission.

    Not a :class:`unitgen.errors.UnitgenError` (``inunit/`` imports nothing
    outside it): every caller turns it into a line of its own (``no NVIDIA
    GPUs: <message>``, a skipped GPU wait, a placement problem)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class GpuProcess:
    """A process holding memory on a GPU."""

    pid: int
    used_bytes: int
    instance: str | None = None  # the unitgen instance it belongs to, if any
    alive: bool = True
    manager: str = ""  # whose instance: an opaque name from the owner function ("system", ...)

    def belongs_to(self, name: str, manager: str) -> bool:
        """True for a process of instance ``name`` of that manager: two
        managers (the system's, each user's) may each run an instance of one name."""
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


# (instance, manager) of the unit running a pid, or None: see cgroupowner
OwnerOf = Callable[[int], Owner | None]


def gib(n: int) -> str:
    """Bytes as GiB with one decimal."""
    return f"{n / 1024**3:.1f} GiB"


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


def _pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _process(pid: int, used: int, owner_of: OwnerOf) -> GpuProcess:
    owner = owner_of(pid)
    return GpuProcess(pid, used, owner[0] if owner else None, _pid_alive(pid),
                      owner[1] if owner else "")


def _processes(nv: ModuleType, handle: object) -> dict[int, int]:
    """pid -> memory it holds on the GPU (compute and graphics together)."""
    procs: dict[int, int] = {}
    for getter in ("nvmlDeviceGetComputeRunningProcesses",
                   "nvmlDeviceGetGraphicsRunningProcesses"):
        try:
            for p in getattr(nv, getter)(handle):
                procs[int(p.pid)] = procs.get(int(p.pid), 0) + int(p.usedGpuMemory or 0)
        except nv.NVMLError:
            continue
    return procs


def read_gpus(owner_of: OwnerOf = instance_of_pid) -> list[Gpu]:
    """Every GPU with its memory and processes, each process with the instance
    ``owner_of`` says it belongs to; GpuUnavailableError with a reason if none
    can be read."""
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
            procs = _processes(nv, handle)
            gpus.append(Gpu(
                index=index, uuid=_text(nv.nvmlDeviceGetUUID(handle)),
                name=_text(nv.nvmlDeviceGetName(handle)), minor=minor,
                total=int(mem.total), used=int(mem.used), free=int(mem.free),
                processes=tuple(_process(pid, used, owner_of)
                                for pid, used in sorted(procs.items())),
            ))
        return gpus
    except nv.NVMLError as exc:
        raise GpuUnavailableError(_reason(nv, exc)) from None
    finally:
        with contextlib.suppress(nv.NVMLError):
            nv.nvmlShutdown()
