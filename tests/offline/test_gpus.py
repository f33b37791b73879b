"""GPU placement, rendering and the GPU-memory wait, with NVML faked at the
pynvml function boundary (tests/fake_nvml); everything above it is real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.helpers import GOLDEN_CTX, write_spec
from tests.nvml import DRIVER_NOT_LOADED, GIB, NO_DRIVER, ZERO_GPUS, eight_gpus, fake_nvml, uuid
from unitgen.errors import SpecError
from unitgen.inunit.gpuwait import main as gpuwait
from unitgen.inunit.nvml import read_gpus
from unitgen.ops.pipeline import placement_for
from unitgen.plan.gpus import Placement
from unitgen.plan.instance import resolve
from unitgen.spec.backends import BACKENDS
from unitgen.spec.model import parse_spec
from unitgen.targets.systemd.render import RenderContext, render_instance

__all__ = ["fake_nvml"]  # the fixture, re-exported for pytest


def unitgen(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "unitgen", *args], capture_output=True,
                          text=True, env=os.environ.copy())


@pytest.mark.parametrize(("scenario", "words"), [
    (NO_DRIVER, "no NVIDIA driver library (libnvidia-ml.so) on this host"),
    (DRIVER_NOT_LOADED, "the NVIDIA driver is not loaded"),
])
def test_gpus_without_driver_is_one_line_and_exit_0(fake_nvml, scenario, words):
    fake_nvml(scenario)
    done = unitgen("gpus")
    assert done.returncode == 0
    assert done.stdout.strip().splitlines() == [f"no NVIDIA GPUs: {words}"]
    assert done.stderr == ""


def test_zero_gpus(fake_nvml):
    fake_nvml(ZERO_GPUS)
    done = unitgen("gpus")
    assert done.returncode == 0 and "reports 0 GPUs" in done.stdout


def test_eight_gpus_with_processes(fake_nvml):
    fake_nvml(eight_gpus(processes={3: [{"pid": os.getpid(), "used": 10 * GIB},
                                        {"pid": 2**22 + 7, "used": GIB}]}))
    done = unitgen("gpus", "--json")
    data = json.loads(done.stdout)
    assert done.returncode == 0 and data["available"] and len(data["gpus"]) == 8
    gpu3 = data["gpus"][3]
    assert gpu3["uuid"] == uuid(3) and gpu3["used"] == 11 * GIB + GIB // 2
    procs = {p["pid"]: p for p in gpu3["processes"]}
    assert procs[os.getpid()]["alive"] and procs[os.getpid()]["instance"] is None
    assert not procs[2**22 + 7]["alive"]
    text = unitgen("gpus").stdout
    assert "exited" in text and "not a unitgen instance" in text


def spec(extra: str, backend: str = "vllm"):
    return parse_spec(f'name = "g"\nbackend = "{backend}"\nmodel = "m"\nport = 8000\n{extra}\n',
                      "g.toml")


def backend_unit(s, scope: str = "system", claims=None) -> str:
    inst = resolve(s, placement=placement_for(s, claims))
    ctx = RenderContext(GOLDEN_CTX.python, GOLDEN_CTX.proxyd, scope)
    return next(f.text for f in render_instance(inst, ctx) if f.name == "g-backend.service")


def test_count_picks_most_free_unclaimed(fake_nvml):
    fake_nvml(eight_gpus(used={0: 70 * GIB, 1: 60 * GIB, 5: 1 * GIB}))
    claims = {uuid(2): [("other", False)], uuid(3): [("other", False)]}
    p = placement_for(spec("gpus = 2"), claims)
    assert p is not None
    # 0 and 1 are busy, 2 and 3 claimed, 5 has 1 GiB used: 4 and 6 have the most free
    assert p.uuids == (uuid(4), uuid(6)) and p.minors == (4, 6)


def test_indexes_become_uuids_and_render(fake_nvml):
    fake_nvml(eight_gpus())
    text = backend_unit(spec("gpus = [1, 3]"))
    assert f'Environment="CUDA_VISIBLE_DEVICES={uuid(1)},{uuid(3)}"' in text
    assert 'Environment="CUDA_DEVICE_ORDER=PCI_BUS_ID"' in text
    assert "--tensor-parallel-size 2" in text
    assert "DevicePolicy=closed" in text
    assert [ln for ln in text.splitlines() if ln.startswith("DeviceAllow=")] == [
        "DeviceAllow=/dev/nvidiactl rw", "DeviceAllow=/dev/nvidia-uvm rw",
        "DeviceAllow=/dev/nvidia-uvm-tools rw", "DeviceAllow=/dev/nvidia1 rw",
        "DeviceAllow=/dev/nvidia3 rw"]
    assert "KillMode=control-group" in text and "TimeoutStopSec=60s" in text
    assert "ExecStartPre=" in text and "unitgen.inunit.gpuwait" in text


def test_backend_defaults_respect_user_choices(fake_nvml):
    fake_nvml(eight_gpus())
    assert "--tensor-parallel-size 4" not in backend_unit(
        spec('gpus = 4\nargs = ["-tp", "2"]'))
    assert "--tp-size 2" in backend_unit(spec("gpus = 2", "sglang"))
    assert "--n-gpu-layers 999" in backend_unit(spec("gpus = 1", "llama-server"))
    assert "--n-gpu-layers" not in backend_unit(spec('gpus = 1\nargs = ["-ngl", "20"]',
                                                     "llama-box"))


@pytest.mark.parametrize("backend", sorted(n for n, b in BACKENDS.items() if b.gpu_use))
def test_how_a_server_uses_its_gpus_is_the_backend_tables_data(backend):
    """The words a GPU count adds come from the backend table alone, and any of the
    table's spellings in args keeps them out."""
    use = BACKENDS[backend].gpu_use
    assert use is not None

    def argv(count: int, args: str = "[]") -> tuple[str, ...]:
        placement = Placement(tuple(f"GPU-{i}" for i in range(count)), None) if count else None
        words = resolve(spec(f"args = {args}", backend), placement=placement).argv
        # the names vLLM is told come last: not a GPU's business
        return words[:words.index("--served-model-name")] if "--served-model-name" in words \
            else words

    without = len(argv(0))
    for count in (1, 2, 4):
        want = tuple(w.replace("{count}", str(count)) for w in use.words)
        assert argv(count)[without:] == (want if count >= use.min_count else ()), count
        for flag in use.flags:
            assert argv(count, f'["{flag}", "3"]')[without:] == (flag, "3"), (count, flag)


def test_user_units_get_no_device_policy(fake_nvml):
    fake_nvml(eight_gpus())
    assert "DevicePolicy" not in backend_unit(spec("gpus = 1"), scope="user")


def test_claimed_gpu_refused_unless_shared(fake_nvml):
    fake_nvml(eight_gpus())
    claims = {uuid(0): [("qwen", False)]}
    with pytest.raises(SpecError, match=r"g.toml: gpus: GPU GPU-0+-1111-2222-3333-0+ is already "
                                        r"claimed by qwen; set gpu_share = true"):
        placement_for(spec("gpus = [0]"), claims)
    shared = {uuid(0): [("qwen", True)]}
    p = placement_for(spec("gpus = [0]\ngpu_share = true"), shared)
    assert p is not None and p.uuids == (uuid(0),)


def test_gpu_memory_that_does_not_fit_names_gpu_free_and_holders(fake_nvml):
    fake_nvml(eight_gpus(processes={2: [{"pid": 2**22 + 9, "used": 50 * GIB}]}))
    with pytest.raises(SpecError) as info:
        placement_for(spec('gpus = [2]\ngpu_memory = "40GiB"'))
    assert str(info.value) == (
        f"g.toml: gpu_memory: needs 40.0 GiB but GPU 2 ({uuid(2)}) has 29.5 GiB free of "
        "80.0 GiB; the rest is held by pid 4194313 50.0 GiB")


def test_cpu_only_specs_work_without_a_driver(fake_nvml):
    fake_nvml(NO_DRIVER)
    assert "CUDA_VISIBLE_DEVICES" not in backend_unit(spec(""))
    with pytest.raises(SpecError, match="needs NVML"):
        placement_for(spec("gpus = 2"))
    p = placement_for(spec(f'gpus = ["{uuid(5)}"]'))
    assert p is not None and p.minors is None
    # the device nodes are unknown here: the sandbox allows every NVIDIA device group
    text = backend_unit(spec(f'gpus = ["{uuid(5)}"]'))
    assert "DeviceAllow=/dev/nvidia" not in text and "DeviceAllow=char-nvidia* rw" in text


def test_check_with_unknown_gpu_index_is_a_clear_error(fake_nvml, tmp_path):
    fake_nvml(eight_gpus())
    done = unitgen("check", str(write_spec(tmp_path, "g", 'name = "g"\nbackend = "vllm"\n'
                                                          'model = "m"\ngpus = [9]\n')))
    assert done.returncode == 2
    assert "g.toml: gpus: GPU 9 is not on this host" in done.stderr


def test_gpu_wait_returns_when_late_memory_is_freed(fake_nvml, capsys):
    until = time.time() + 1.5
    fake_nvml(eight_gpus(processes={0: [{"pid": 2**22 + 11, "used": 30 * GIB, "until": until}]}))
    t0 = time.monotonic()
    assert gpuwait(["--instance", "g", "--gpus", uuid(0), "--timeout", "20s",
                    "--interval", "100ms"]) == 0
    assert time.time() >= until and time.monotonic() - t0 < 10
    assert "released after" in capsys.readouterr().err


def test_gpu_wait_times_out_with_a_reason(fake_nvml, capsys):
    fake_nvml(eight_gpus(processes={0: [{"pid": 2**22 + 11, "used": 30 * GIB}]}))
    assert gpuwait(["--instance", "g", "--gpus", uuid(0), "--timeout", "500ms",
                    "--interval", "100ms"]) == 1
    err = capsys.readouterr().err
    assert f"not released after 500ms: GPU 0 ({uuid(0)}): pid 4194315 (exited) holds 30.0 GiB" in err


def test_gpu_wait_ignores_other_live_processes_and_no_driver(fake_nvml):
    fake_nvml(eight_gpus(processes={0: [{"pid": os.getpid(), "used": GIB}]}))
    assert gpuwait(["--instance", "g", "--gpus", uuid(0), "--timeout", "1s"]) == 0
    fake_nvml(NO_DRIVER)
    assert gpuwait(["--instance", "g", "--gpus", uuid(0), "--timeout", "1s"]) == 0


def test_read_gpus_is_the_fake_here(fake_nvml):
    fake_nvml(eight_gpus())
    assert [g.index for g in read_gpus()] == list(range(8))


def test_redeploy_keeps_its_gpus_even_when_others_have_more_free(fake_nvml):
    fake_nvml(eight_gpus(used={2: 50 * GIB}))
    mine = {uuid(2): [("g", False)]}
    p = placement_for(spec("gpus = 1"), mine)
    assert p is not None and p.uuids == (uuid(2),)
    assert placement_for(spec("gpus = 1"), {}).uuids == (uuid(0),)  # type: ignore[union-attr]
