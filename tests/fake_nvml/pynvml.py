"""A fake ``pynvml`` for machines without GPUs: the same function names,
``NVMLError`` subclasses and error codes as NVIDIA's nvidia-ml-py, driven by a
JSON scenario named by ``FAKE_NVML_SCENARIO``.

Scenario: ``{"error": "library_not_found" | "driver_not_loaded"}`` or
``{"gpus": [{"uuid", "name", "total", "minor", "reserved",
"processes": [{"pid", "used", "until"?}]}], "held_dir"?: DIR}``. A process with
``until`` (a Unix time) is listed only until then: a GPU whose memory frees late.

``held_dir``: processes that hold memory say so themselves (the stand-in
servers of tests/gpu_standin.py), one file ``DIR/<pid>.json`` each,
``{"pid": N, "gpus": {UUID: bytes}}``, listed while that process lives (not a
zombie): like the driver, a process killed with -9 holds nothing.

Tests put this directory first on ``sys.path``/``PYTHONPATH``; nothing in
unitgen knows it exists.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any, ClassVar

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_UNKNOWN = 999

_STRINGS = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
    NVML_ERROR_NOT_FOUND: "Not Found",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}


class NVMLError(Exception):
    """Like pynvml.NVMLError: constructing it with a code gives the subclass."""

    _valClassMapping: ClassVar[dict[int, type[NVMLError]]] = {}
    value: int

    def __new__(cls, value: int) -> NVMLError:
        typ = cls._valClassMapping.get(value, cls) if cls is NVMLError else cls
        obj = Exception.__new__(typ)
        obj.value = value
        return obj

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _STRINGS.get(self.value, f"Unknown Error code {self.value}")


def _subclass(name: str, code: int) -> type[NVMLError]:
    cls = type(name, (NVMLError,), {})
    NVMLError._valClassMapping[code] = cls
    return cls


NVMLError_Uninitialized = _subclass("NVMLError_Uninitialized", NVML_ERROR_UNINITIALIZED)
NVMLError_NotSupported = _subclass("NVMLError_NotSupported", NVML_ERROR_NOT_SUPPORTED)
NVMLError_NoPermission = _subclass("NVMLError_NoPermission", NVML_ERROR_NO_PERMISSION)
NVMLError_NotFound = _subclass("NVMLError_NotFound", NVML_ERROR_NOT_FOUND)
NVMLError_DriverNotLoaded = _subclass("NVMLError_DriverNotLoaded", NVML_ERROR_DRIVER_NOT_LOADED)
NVMLError_LibraryNotFound = _subclass("NVMLError_LibraryNotFound", NVML_ERROR_LIBRARY_NOT_FOUND)

_ERRORS = {"library_not_found": NVML_ERROR_LIBRARY_NOT_FOUND,
           "driver_not_loaded": NVML_ERROR_DRIVER_NOT_LOADED,
           "no_permission": NVML_ERROR_NO_PERMISSION}

_state: dict[str, Any] = {"init": 0}


@dataclass
class c_nvmlMemory_t:
    total: int
    free: int
    used: int


@dataclass
class c_nvmlProcessInfo_t:
    pid: int
    usedGpuMemory: int
    gpuInstanceId: int = 0xFFFFFFFF
    computeInstanceId: int = 0xFFFFFFFF


def _scenario() -> dict[str, Any]:
    path = os.environ.get("FAKE_NVML_SCENARIO")
    if not path:
        return {"error": "library_not_found"}
    with open(path, encoding="utf-8") as fh:
        data: dict[str, Any] = json.load(fh)
    return data


def _gpus() -> list[dict[str, Any]]:
    if _state["init"] <= 0:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)
    gpus: list[dict[str, Any]] = _scenario().get("gpus", [])
    return gpus


def _handle(handle: int) -> dict[str, Any]:
    gpus = _gpus()
    if not 0 <= handle < len(gpus):
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return gpus[handle]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            return fh.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _held(uuid: str) -> list[dict[str, Any]]:
    """What live processes say they hold on this GPU (``held_dir``)."""
    directory = _scenario().get("held_dir")
    if not directory:
        return []
    out = []
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(directory, name), encoding="utf-8") as fh:
                entry = json.load(fh)
        except (OSError, ValueError):
            continue  # being replaced: the next read sees it
        used = int(entry.get("gpus", {}).get(uuid, 0))
        if used and _alive(int(entry["pid"])):
            out.append({"pid": int(entry["pid"]), "used": used})
    return out


def _procs(gpu: dict[str, Any]) -> list[dict[str, Any]]:
    now = time.time()
    listed = [p for p in gpu.get("processes", []) if p.get("until", now + 1) > now]
    return listed + _held(str(gpu["uuid"]))


def nvmlInit() -> None:
    error = _scenario().get("error")
    if error:
        raise NVMLError(_ERRORS[error])
    _state["init"] += 1


def nvmlShutdown() -> None:
    if _state["init"] <= 0:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)
    _state["init"] -= 1


def nvmlSystemGetDriverVersion() -> str:
    _gpus()
    return "550.54.15"


def nvmlDeviceGetCount() -> int:
    return len(_gpus())


def nvmlDeviceGetHandleByIndex(index: int) -> int:
    _handle(index)
    return index


def nvmlDeviceGetHandleByUUID(uuid: str | bytes) -> int:
    text = uuid.decode() if isinstance(uuid, bytes) else uuid
    for i, gpu in enumerate(_gpus()):
        if gpu["uuid"] == text:
            return i
    raise NVMLError(NVML_ERROR_NOT_FOUND)


def nvmlDeviceGetIndex(handle: int) -> int:
    _handle(handle)
    return handle


def nvmlDeviceGetUUID(handle: int) -> str:
    return str(_handle(handle)["uuid"])


def nvmlDeviceGetName(handle: int) -> str:
    return str(_handle(handle).get("name", "NVIDIA H100 80GB HBM3"))


def nvmlDeviceGetMinorNumber(handle: int) -> int:
    gpu = _handle(handle)
    if "minor" not in gpu:
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    return int(gpu["minor"])


def nvmlDeviceGetMemoryInfo(handle: int) -> c_nvmlMemory_t:
    gpu = _handle(handle)
    used = int(gpu.get("reserved", 0)) + sum(int(p["used"]) for p in _procs(gpu))
    total = int(gpu["total"])
    return c_nvmlMemory_t(total=total, free=max(0, total - used), used=used)


def nvmlDeviceGetComputeRunningProcesses(handle: int) -> list[c_nvmlProcessInfo_t]:
    return [c_nvmlProcessInfo_t(int(p["pid"]), int(p["used"])) for p in _procs(_handle(handle))]


def nvmlDeviceGetGraphicsRunningProcesses(handle: int) -> list[c_nvmlProcessInfo_t]:
    _handle(handle)
    return []
