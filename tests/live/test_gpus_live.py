"""GPU instances under a real systemd user manager, NVML faked at the pynvml
boundary (the units' own ExecStartPre reads the fake too, via PYTHONPATH)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import custom_spec, prop, wait_for, write_spec
from tests.nvml import FAKE_DIR, GIB, eight_gpus, uuid, write_scenario
from unitgen.ops.systemd.sandbox import Sandbox

pytestmark = pytest.mark.systemd


def cli(box: Sandbox, scenario: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **box.env, "PYTHONPATH": str(FAKE_DIR), "FAKE_NVML_SCENARIO": str(scenario)}
    return subprocess.run([sys.executable, "-m", "unitgen", *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_gpu_instance_status_stop_and_late_free(sandbox, tmp_path):
    scenario = write_scenario(tmp_path / "nvml.json", eight_gpus())
    spec = write_spec(tmp_path, "gpu1", custom_spec(
        "gpu1", env={"PYTHONPATH": str(FAKE_DIR), "FAKE_NVML_SCENARIO": str(scenario),
                     "STANDIN_WORKERS": "2"},
        extra='gpus = 1\n[health]\ntimeout = "20s"\n'))
    try:
        done = cli(sandbox, scenario, "deploy", "--user", "--json", str(spec))
        assert done.returncode == 0, done.stdout + done.stderr
        backend = sandbox.unit_dir / "gpu1-backend.service"
        assert f"CUDA_VISIBLE_DEVICES={uuid(0)}" in backend.read_text()

        pid = int(prop(sandbox, "gpu1-backend.service", "MainPID"))
        write_scenario(scenario, eight_gpus(processes={0: [{"pid": pid, "used": 5 * GIB}]}))
        status = json.loads(cli(sandbox, scenario, "status", "--user", "--json").stdout)
        row = status["instances"][0]
        assert row["gpus"] == [0] and row["gpu_memory_bytes"] == 5 * GIB
        gpus = cli(sandbox, scenario, "gpus").stdout
        assert f"pid {pid}  5.0 GiB  gpu1" in gpus

        # a restart waits until the old process's memory is released
        until = time.time() + 2.5
        write_scenario(scenario, eight_gpus(processes={0: [
            {"pid": 2**22 + 3, "used": 20 * GIB, "until": until}]}))
        # the server's unit (its proxy follows); restarting the proxy alone leaves it
        assert sandbox.systemctl("restart", "gpu1-backend.service", timeout=60).returncode == 0
        started = int(prop(sandbox, "gpu1-backend.service", "ExecMainStartTimestampMonotonic"))
        assert started > 0
        assert time.time() >= until
        assert "gpu wait: GPU memory released after" in sandbox.journal("gpu1-backend.service")

        # stopping kills the whole tree: the "tensor-parallel workers" too
        pid = int(prop(sandbox, "gpu1-backend.service", "MainPID"))
        workers = [c.pid for c in psutil.Process(pid).children()]
        assert len(workers) == 2
        sandbox.systemctl("stop", "gpu1.socket", check=True)
        assert wait_for(lambda: not any(psutil.pid_exists(w) for w in [pid, *workers]), 10)
    finally:
        cli(sandbox, scenario, "remove", "--user", "gpu1")


def test_second_instance_on_a_claimed_gpu_is_refused(sandbox, tmp_path):
    scenario = write_scenario(tmp_path / "nvml.json", eight_gpus())
    # out of the GPU pool: claims are conflicts (in a pool they share by memory)
    extra = 'gpus = [0]\nactivation = "on-demand"\ngpu_pool = false\n'
    a = write_spec(tmp_path, "ga", custom_spec("ga", extra=extra))
    b = write_spec(tmp_path, "gb", custom_spec("gb", extra=extra))
    try:
        assert cli(sandbox, scenario, "deploy", "--user", str(a)).returncode == 0
        done = cli(sandbox, scenario, "deploy", "--user", str(b))
        assert done.returncode == 2
        assert f"gb.toml: gpus: GPU {uuid(0)} is already claimed by ga" in done.stderr
        assert not (sandbox.unit_dir / "gb.socket").exists()
    finally:
        cli(sandbox, scenario, "remove", "--user", "ga")
