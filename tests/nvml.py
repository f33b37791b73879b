"""NVML scenarios for the fake pynvml (tests/fake_nvml), and loading it in place
of the real module for in-process tests and subprocesses alike."""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

FAKE_DIR = Path(__file__).resolve().parent / "fake_nvml"
GIB = 1024**3


def uuid(i: int) -> str:
    """A stable, realistic GPU UUID for index i."""
    return f"GPU-{i:08x}-1111-2222-3333-{i:012x}"


def eight_gpus(processes: dict[int, list[dict[str, Any]]] | None = None,
               used: dict[int, int] | None = None) -> dict[str, Any]:
    """8 x 80 GiB GPUs; ``used`` adds reserved memory per index (to vary free memory)."""
    processes = processes or {}
    used = used or {}
    return {"gpus": [{"uuid": uuid(i), "name": "NVIDIA H100 80GB HBM3", "total": 80 * GIB,
                      "minor": i, "reserved": used.get(i, 0) + GIB // 2,
                      "processes": processes.get(i, [])} for i in range(8)]}


def held_by_processes(scenario: dict[str, Any], directory: Path) -> dict[str, Any]:
    """The scenario with processes saying what they hold in ``directory`` (the
    GPU stand-ins of tests/gpu_standin.py write there)."""
    directory.mkdir(parents=True, exist_ok=True)
    return {**scenario, "held_dir": str(directory)}


NO_DRIVER: dict[str, Any] = {"error": "library_not_found"}
DRIVER_NOT_LOADED: dict[str, Any] = {"error": "driver_not_loaded"}
ZERO_GPUS: dict[str, Any] = {"gpus": []}


def write_scenario(path: Path, scenario: dict[str, Any]) -> Path:
    """Write a scenario file."""
    path.write_text(json.dumps(scenario))
    return path


@pytest.fixture
def fake_nvml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Load the fake pynvml in place of the real one; returns a setter for the scenario.

    Subprocesses get it through PYTHONPATH and FAKE_NVML_SCENARIO."""
    monkeypatch.syspath_prepend(str(FAKE_DIR))
    monkeypatch.setenv("PYTHONPATH", str(FAKE_DIR))
    real = sys.modules.pop("pynvml", None)
    fake = importlib.import_module("pynvml")
    assert Path(fake.__file__ or "").parent == FAKE_DIR

    def set_scenario(scenario: dict[str, Any]) -> Path:
        path = write_scenario(tmp_path / "nvml.json", scenario)
        monkeypatch.setenv("FAKE_NVML_SCENARIO", str(path))
        return path

    set_scenario(NO_DRIVER)
    yield set_scenario
    sys.modules.pop("pynvml", None)
    if real is not None:
        sys.modules["pynvml"] = real
