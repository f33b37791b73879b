"""GPU pools (issue 27) without a manager: who is a member, the flags that let
a server sleep, each member's pool file, how a member's proxy reads the pool
(units, NVML, runtimes) into what the policy weighs, the runtime files, and
the deploy check. The turn itself runs on a real manager: tests/live/test_pool_live.py."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.helpers import GOLDEN_CTX, write_spec
from tests.nvml import eight_gpus, fake_nvml, uuid
from unitgen.errors import SpecError
from unitgen.features.pool.ops import PoolFeature
from unitgen.features.pool.plan import GpuPools, is_member, pool_file
from unitgen.inunit.gpuneed import GIB, NeedSource
from unitgen.inunit.nvml import Gpu, GpuProcess
from unitgen.inunit.poolfile import PoolFile, PoolMember, PoolTerms
from unitgen.inunit.poolpolicy import Load
from unitgen.inunit.poolread import Units, member_states
from unitgen.inunit.poolstate import (
    Runtime,
    load_of,
    lock_path,
    ram_budget,
    read_runtime,
    write_runtime,
)
from unitgen.ops.pipeline import Planned
from unitgen.plan.gpus import Placement
from unitgen.plan.instance import resolve
from unitgen.plan.record import parse_record, record_of
from unitgen.spec.model import InstanceSpec, parse_spec
from unitgen.targets.systemd.render import render_instance

__all__ = ["fake_nvml"]  # the fixture, re-exported for pytest

G0, G1 = "GPU-00000000-aaaa", "GPU-11111111-bbbb"


def spec(extra: str = "", backend: str = "vllm") -> InstanceSpec:
    return parse_spec(f'name = "a"\nbackend = "{backend}"\nmodel = "m"\n'
                      f'activation = "on-demand"\ngpus = ["{G0}"]\n{extra}', "a.toml")


def terms(need: str = "declared:32212254720", **kw: object) -> PoolTerms:
    return PoolTerms(need=need, **kw)  # type: ignore[arg-type]


# --- membership and the plan ---------------------------------------------------


def test_on_demand_instances_with_gpus_are_members_unless_they_say_otherwise():
    assert is_member(spec())
    assert not is_member(spec('gpu_pool = false\n'))
    assert not is_member(parse_spec(f'name = "a"\nbackend = "vllm"\nmodel = "m"\n'
                                    f'gpus = ["{G0}"]\n', "a.toml"))  # eager
    assert not is_member(spec('swap_group = "g"\n'))  # one at a time: its group's
    with pytest.raises(SpecError) as info:
        spec('swap_group = "g"\npool_min_turn = "1s"\n')
    assert "is not for a swap group member" in str(info.value)


def test_a_member_that_can_sleep_is_started_so_once():
    inst = resolve(spec('args = ["--gpu-memory-utilization", "0.4"]\n'),
                   placement=Placement((G0,), None))
    assert inst.argv.count("--enable-sleep-mode") == 1
    assert ("VLLM_SERVER_DEV_MODE", "1") in inst.env
    assert inst.pool is not None and inst.pool.sleep and inst.pool.fixed
    again = resolve(spec('args = ["--enable-sleep-mode"]\nenv = { VLLM_SERVER_DEV_MODE = "1" }\n'),
                    placement=Placement((G0,), None))
    assert again.argv.count("--enable-sleep-mode") == 1
    assert [k for k, _ in again.env].count("VLLM_SERVER_DEV_MODE") == 1
    plain = resolve(spec('pool_sleep = false\n'), placement=Placement((G0,), None))
    assert "--enable-sleep-mode" not in plain.argv and plain.pool is not None
    assert not plain.pool.sleep
    sglang = resolve(spec(backend="sglang"), placement=Placement((G0,), None))
    assert {"--enable-memory-saver", "--enable-weights-cpu-backup"} <= set(sglang.argv)


def test_the_record_carries_the_terms_and_reads_them_back():
    inst = resolve(spec('idle_stop = "10min"\npool_min_turn = "2s"\nswap_drain = "30s"\n'),
                   placement=Placement((G0,), None))
    rec = parse_record(record_of(inst).line())
    assert rec is not None and rec.pool is not None and rec.pool == inst.pool
    assert rec.pool.min_turn == 2.0 and rec.pool.drain == 30.0 and rec.pool.idle_stop == 600.0
    assert rec.pool.need_value().source == NeedSource.BACKEND_ARGS


def test_a_pool_members_units(tmp_path):
    inst = resolve(spec(), placement=Placement((G0,), (0,)))
    files = {f.name: f.text for f in render_instance(inst, GOLDEN_CTX)}
    proxy, server = files["a.service"], files["a-backend.service"]
    assert "unitgen.inunit.swapproxy --name a --pool \"%E/unitgen/pool/a.json\"" in proxy
    assert "RuntimeDirectory=unitgen-pool" in proxy and "RuntimeDirectoryPreserve=yes" in proxy
    assert "DeviceAllow=/dev/nvidia0 rw" in proxy and "PrivateDevices=yes" not in proxy
    assert "PartOf=a.socket" in server and "Conflicts=" not in server
    assert "memrecord" not in server  # the need is the backend's own arguments
    guessed = resolve(spec(backend="llama-server"), placement=Placement((G0,), (0,)))
    server = {f.name: f.text for f in render_instance(guessed, GOLDEN_CTX)}["a-backend.service"]
    assert 'ExecStartPost=+/usr/bin/python3 -P -m unitgen.inunit.memrecord --instance a' in server


def test_members_share_a_pool_when_they_share_a_gpu():
    pools = GpuPools({"a": (G0,), "b": (G0, G1), "c": (G1,), "d": ()})
    assert pools.never_with("a") == []
    assert pools.neighbours("a") == ["b"] and pools.neighbours("b") == ["a", "c"]
    assert pools.makes_room_for("a") == frozenset({"b", "c", "d"})
    members = {"a": ((G0,), terms(sleep=True)), "b": ((G0, G1), terms()), "c": ((G1,), terms())}
    file = pool_file("a", members, "vllm")
    assert [m.name for m in file.members] == ["a", "b"]
    assert file.sleep == ("POST", "/sleep?level=1", "") and file.wake == ("POST", "/wake_up", "")
    assert file.refused == ("/is_sleeping", "/sleep", "/wake_up")
    assert PoolFile.parse(file.text()) == file
    assert pool_file("c", members, "llama-server").sleep is None


def test_a_pool_file_that_is_not_one_is_refused():
    for text in ("{}", '{"format": 2}', "not json",
                 '{"format": 1, "name": "a", "members": [{"name": "a", "gpus": [], '
                 '"terms": {"need": "nonsense"}}]}'):
        with pytest.raises(ValueError, match=r"not a pool file|not a GPU memory need|'nonsense'"):
            PoolFile.parse(text)


# --- what a member's proxy reads ----------------------------------------------


def gpu(uuid: str, used: dict[int, int], total: int = 80 * GIB, reserved: int = GIB // 2) -> Gpu:
    procs = tuple(GpuProcess(pid, b, f"m{pid}", True, "user@0") for pid, b in used.items())
    taken = reserved + sum(used.values())
    return Gpu(0, uuid, "H100", 0, total, taken, total - taken, procs)


def test_the_pool_as_a_proxy_reads_it():
    file = PoolFile("m1", (
        PoolMember("m1", (G0,), terms("estimate:1.0x", fixed=False)),
        PoolMember("m2", (G0,), terms("backend-args:0.375x", sleep=True)),
        PoolMember("m3", (G0,), terms("estimate:1.0x", fixed=False)),
        PoolMember("m4", (G0,), terms("declared:10737418240"))))
    units = {"m1": Units("activating", "inactive"),
             "m2": Units("inactive", "active", pid=2, since=100.0, memory=5 * GIB),
             "m3": Units("active", "active", pid=3, since=50.0),
             "m4": Units("active", "activating", pid=4)}
    runtimes = {"m2": Runtime(asleep_pid=2, ram_asleep=GIB), "m3": Runtime(in_flight=2,
                                                                          last_used=70.0)}
    gpus = [gpu(G0, {2: GIB, 3: 20 * GIB, 4: 3 * GIB, 99: 6 * GIB})]
    states, free = member_states(file, units, gpus, runtimes, {"m3": 20 * GIB}, "user@0")
    by = {s.name: s for s in states}
    assert free[0].free == 80 * GIB - GIB // 2 - 30 * GIB
    # the whole GPU, guessed: what the pool has there (processes outside hold 6.5 GiB)
    assert by["m1"].state == Load.STOPPED and by["m1"].need.bytes == 80 * GIB - 6 * GIB - GIB // 2
    assert by["m2"].state == Load.ASLEEP and by["m2"].ram_asleep == 5 * GIB
    assert by["m2"].held == {G0: GIB} and by["m2"].can_sleep
    assert by["m3"].need.source == NeedSource.MEASURED and by["m3"].in_flight == 2
    assert by["m3"].last_used == 70.0 and by["m3"].loaded_at == 50.0
    assert by["m4"].state == Load.LOADING and by["m4"].held is None  # counted at its need
    units["m2"] = Units("inactive", "active", pid=22)  # restarted since: loaded, not asleep
    assert member_states(file, units, gpus, runtimes, {}, "user@0")[0][1].state == Load.LOADED


@pytest.mark.parametrize(("proxy", "server", "pid", "asleep", "load"), [
    ("inactive", "inactive", 0, 0, Load.STOPPED),
    ("inactive", "failed", 0, 0, Load.STOPPED),
    ("activating", "activating", 5, 0, Load.LOADING),
    ("active", "active", 5, 0, Load.LOADED),
    ("deactivating", "active", 5, 0, Load.DRAINING),
    ("inactive", "deactivating", 5, 0, Load.DRAINING),
    ("inactive", "active", 5, 5, Load.ASLEEP),
    ("inactive", "active", 6, 5, Load.LOADED),
])
def test_where_a_member_stands(proxy, server, pid, asleep, load):
    assert load_of(proxy, server, pid, Runtime(asleep_pid=asleep)) == load


def test_a_runtime_is_written_whole_and_read_leniently(tmp_path):
    rt = Runtime(asleep_pid=7, last_used=1.5, waiting_why="x")
    write_runtime(tmp_path, "m", rt)
    assert read_runtime(tmp_path, "m") == rt
    (tmp_path / "m.json").write_text('{"asleep_pid": "7", "last_used": 3, "zz": 1}')
    assert read_runtime(tmp_path, "m") == Runtime(last_used=3)
    (tmp_path / "m.json").write_text("[")
    assert read_runtime(tmp_path, "m") == Runtime()
    assert read_runtime(tmp_path, "../etc") == Runtime()  # not a name: nothing read
    with pytest.raises(ValueError):
        write_runtime(tmp_path, "../etc", rt)
    with pytest.raises(ValueError):
        lock_path(tmp_path, "GPU-1/../x")


def test_the_sleeping_budget():
    meminfo = "MemTotal:       16000000 kB\nMemFree: 1 kB\n"
    assert ram_budget({}, meminfo) == (8000000 * 1024, "half the host's memory")
    assert ram_budget({"UNITGEN_POOL_SLEEP_RAM": "64GiB"}, meminfo)[0] == 64 * GIB
    assert ram_budget({"UNITGEN_POOL_SLEEP_RAM": "0"}, meminfo)[0] == 0  # no sleeping
    assert ram_budget({"UNITGEN_POOL_SLEEP_RAM": "lots"}, meminfo)[0] == 8000000 * 1024


# --- deploy ------------------------------------------------------------------


class Binding:
    """What the deploy check reads of a manager (no manager here)."""

    manager = "user@0"

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp

    def pool_file(self, name: str) -> Path:
        return self.tmp / "pool" / f"{name}.json"

    def measured_dir(self) -> Path:
        return self.tmp / "state"


def planned(tmp: Path, name: str, text: str, uuids: tuple[str, ...] = (G0,)) -> Planned:
    inst = resolve(parse_spec(f'name = "{name}"\n{text}', str(write_spec(tmp, name, ""))),
                   placement=Placement(uuids, None, share=True))
    return Planned(tmp / f"{name}.toml", inst, ())


def test_deploy_check_weighs_the_run_against_this_hosts_gpus(tmp_path, fake_nvml):
    fake_nvml(eight_gpus())
    u0 = uuid(0)
    feature = PoolFeature(Binding(tmp_path))  # type: ignore[arg-type]
    od = f'backend = "vllm"\nmodel = "m"\nactivation = "on-demand"\ngpus = ["{u0}"]\n'
    run = [planned(tmp_path, "fixed", f'backend = "vllm"\nmodel = "m"\ngpus = ["{u0}"]\n'
                   'gpu_share = true\nargs = ["--gpu-memory-utilization", "0.6"]\n', (u0,)),
           planned(tmp_path, "fits", od + 'args = ["--gpu-memory-utilization", "0.3"]\n', (u0,)),
           planned(tmp_path, "late", od + 'args = ["--gpu-memory-utilization", "0.5"]\n', (u0,)),
           planned(tmp_path, "guess", od.replace('"vllm"', '"custom"').replace(
               'model = "m"\n', 'command = ["/bin/srv", "{port}"]\n'), (u0,))]
    problems = feature.check({}, run, {})
    assert [(Path(p.file).name, p.key) for p in problems] == [("late.toml", "args")]
    assert "but the always-on fixed (" in problems[0].message
    assert "it could never load" in problems[0].message


def test_a_start_the_pool_weighed_just_now_skips_the_gpu_wait(tmp_path, fake_nvml, capsys):
    from unitgen.inunit.poolstart import FRESH, checked_just_now, main  # noqa: PLC0415

    stamp = tmp_path / "a.start"
    stamp.write_text(f"{time.monotonic()}\n")
    assert checked_just_now(str(stamp))
    assert not checked_just_now(str(stamp), now=time.monotonic() + FRESH + 1)
    assert not checked_just_now(str(tmp_path / "none"))
    # the pool's own start: no NVML read at all (here NVML says a dead process holds memory)
    fake_nvml(eight_gpus(processes={0: [{"pid": 2**22 + 5, "used": GIB}]}))
    assert main(["--checked", str(stamp), "--", "--instance", "a", "--gpus", uuid(0),
                 "--timeout", "1s", "--interval", "100ms"]) == 0
    assert "skipped: the pool's turn weighed its GPUs just now" in capsys.readouterr().err
    stamp.write_text(f"{time.monotonic() - FRESH - 1}\n")  # any other start waits as ever
    assert main(["--checked", str(stamp), "--", "--instance", "a", "--gpus", uuid(0),
                 "--timeout", "1s", "--interval", "100ms"]) == 1
    assert "not released after 1s" in capsys.readouterr().err
