"""GPU processes belong to an instance of one manager: the system's, or one
user's (``user@UID``). Two users' managers may each run a ``qwen2``; the GPU
wait and placement must not take one for the other.

The processes here are real (``sleep``), put into cgroups shaped like two user
managers' ``app.slice/qwen2-backend.service``; NVML is the fake, listing them."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.nvml import GIB, eight_gpus, fake_nvml, uuid
from unitgen.errors import SpecError
from unitgen.inunit.cgroupowner import manager_of_scope, unit_of_cgroup
from unitgen.inunit.gpuwait import held
from unitgen.inunit.nvml import Gpu, GpuProcess, read_gpus
from unitgen.plan.gpus import place

__all__ = ["fake_nvml"]  # the fixture, re-exported for pytest


def cgroup_text(uid: int, unit: str = "qwen2-backend.service") -> str:
    return f"0::/user.slice/user-{uid}.slice/user@{uid}.service/app.slice/{unit}\n"


# --- from the cgroup path alone ----------------------------------------------


@pytest.mark.parametrize(("text", "owner"), [
    (cgroup_text(1000), ("qwen2", "user@1000")),
    (cgroup_text(1001), ("qwen2", "user@1001")),
    (cgroup_text(0, "qwen2.service"), ("qwen2", "user@0")),
    ("0::/system.slice/qwen2-backend.service\n", ("qwen2", "system")),
])
def test_the_manager_of_a_process_names_its_user(text, owner):
    assert unit_of_cgroup(text) == owner


def gpu_with(*procs: GpuProcess) -> list[Gpu]:
    used = sum(p.used_bytes for p in procs)
    return [Gpu(0, uuid(0), "H100", 0, 80 * GIB, used, 80 * GIB - used, procs)]


def owned(pid: int, used: int, text: str) -> GpuProcess:
    owner = unit_of_cgroup(text)
    assert owner is not None
    return GpuProcess(pid, used, owner[0], True, owner[1])


def test_gpu_wait_of_one_user_does_not_wait_for_another_users_instance():
    mine, theirs = owned(11, 10 * GIB, cgroup_text(1000)), owned(12, 30 * GIB, cgroup_text(1001))
    me = unit_of_cgroup(cgroup_text(1000))
    assert me is not None
    assert held(gpu_with(theirs), "qwen2", {uuid(0)}, me[1]) == []
    assert held(gpu_with(mine, theirs), "qwen2", {uuid(0)}, me[1]) == [
        f"GPU 0 ({uuid(0)}): pid 11 (still running) holds 10.0 GiB"]


def test_placement_counts_only_its_own_managers_processes_as_free(monkeypatch):
    monkeypatch.setattr(os, "getuid", lambda: 1000)
    gpus = gpu_with(owned(11, 10 * GIB, cgroup_text(1000)), owned(12, 60 * GIB, cgroup_text(1001)))
    placed = place(source="q.toml", name="qwen2", want=1, memory=20 * GIB, share=False,
                   gpus=gpus, claims={}, manager=manager_of_scope("user"))
    assert placed.uuids == (uuid(0),)  # 10 GiB free + its own 10 GiB
    with pytest.raises(SpecError) as info:
        place(source="q.toml", name="qwen2", want=1, memory=30 * GIB, share=False,
              gpus=gpus, claims={}, manager=manager_of_scope("user"))
    assert str(info.value.problems[0]).endswith(
        "has 20.0 GiB free of 80.0 GiB; the rest is held by pid 12 (qwen2) 60.0 GiB")


# --- real processes in two user managers' cgroups ----------------------------


def _hierarchy() -> Path | None:
    """Where systemd keeps its cgroups: the named v1 hierarchy on hybrid hosts
    (as here), else cgroup2; None if this process cannot make cgroups there."""
    for root in (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup")):
        if (root / "cgroup.procs").is_file() and os.access(root / "cgroup.procs", os.W_OK):
            return root
    return None


@pytest.fixture
def user_cgroups(tmp_path: Path) -> Iterator[dict[int, Path]]:
    """``cgroup.procs`` of ``.../user@UID.service/app.slice/qwen2-backend.service``
    for users 1000 and 1001, under a slice of this test's own."""
    root = _hierarchy()
    if root is None:
        pytest.skip("cannot create cgroups here (needs root and a writable cgroup hierarchy)")
    top = root / f"unitgen_gputest_{tmp_path.name.replace('-', '_')}.slice"
    leaves = {uid: top / f"user@{uid}.service" / "app.slice" / "qwen2-backend.service"
              for uid in (1000, 1001)}
    try:
        for leaf in leaves.values():
            leaf.mkdir(parents=True)
    except OSError as exc:
        pytest.skip(f"cannot create cgroups here: {exc}")
    try:
        yield {uid: leaf / "cgroup.procs" for uid, leaf in leaves.items()}
    finally:
        for dirpath, _, _ in sorted(os.walk(top), key=lambda w: -w[0].count("/")):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)


@pytest.fixture
def sleepers(user_cgroups: dict[int, Path]) -> Iterator[dict[int, int]]:
    """A live process in each user's qwen2-backend cgroup: uid -> pid."""
    procs = {uid: subprocess.Popen(["sleep", "120"]) for uid in user_cgroups}
    try:
        for uid, proc in procs.items():
            user_cgroups[uid].write_text(str(proc.pid))
        yield {uid: proc.pid for uid, proc in procs.items()}
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()


def gpuwait_as(procs_file: Path) -> subprocess.CompletedProcess[str]:
    """The GPU wait as ExecStartPre runs it, from inside that unit's cgroup."""
    script = 'echo $$ > "$1" && shift && exec "$@"'
    return subprocess.run(
        ["sh", "-c", script, "sh", str(procs_file), sys.executable, "-m",
         "unitgen.inunit.gpuwait", "--instance", "qwen2", "--gpus", uuid(0),
         "--timeout", "1s", "--interval", "100ms"],
        capture_output=True, text=True, timeout=60, env=os.environ.copy(), check=False)


def test_gpu_wait_and_report_tell_two_users_qwen2_apart(fake_nvml, user_cgroups, sleepers):
    fake_nvml(eight_gpus(processes={0: [{"pid": sleepers[1001], "used": 30 * GIB}]}))
    owners = {p.pid: (p.instance, p.manager) for p in read_gpus()[0].processes}
    assert owners == {sleepers[1001]: ("qwen2", "user@1001")}

    # user 1000's qwen2 starting: user 1001's qwen2 is not its previous process
    done = gpuwait_as(user_cgroups[1000])
    assert done.returncode == 0, done.stderr

    # its own previous process is waited for, and only that one is named
    fake_nvml(eight_gpus(processes={0: [{"pid": sleepers[1001], "used": 30 * GIB},
                                        {"pid": sleepers[1000], "used": 5 * GIB}]}))
    done = gpuwait_as(user_cgroups[1000])
    assert done.returncode == 1
    assert f"pid {sleepers[1000]} (still running) holds 5.0 GiB" in done.stderr
    assert f"pid {sleepers[1001]}" not in done.stderr

    report = subprocess.run([sys.executable, "-m", "unitgen", "gpus", "--json"],
                            capture_output=True, text=True, env=os.environ.copy(), check=True)
    procs = {p["pid"]: p["manager"] for p in json.loads(report.stdout)["gpus"][0]["processes"]}
    assert procs == {sleepers[1000]: "user@1000", sleepers[1001]: "user@1001"}
