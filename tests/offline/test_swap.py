"""Swap groups without a manager: spec keys, membership after deploy/remove, the
group drop-ins, GPU placement of members, and the proxy's pieces (issue 12)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import GOLDEN_CTX, custom_spec, write_spec
from unitgen.errors import SpecError
from unitgen.features.gateway.plan import member_of
from unitgen.features.swap.ops import SwapFeature, installed_groups
from unitgen.features.swap.plan import RunTogether, SwapGroups, after_change, groups_of, turn_wait
from unitgen.inunit.nvml import Gpu, GpuProcess
from unitgen.inunit.swapctl import parse_show
from unitgen.inunit.swapproxy import mates_from_conflicts
from unitgen.ops.files import write_files
from unitgen.ops.systemd.bind_swap import SystemdSwap
from unitgen.ops.systemd.session import Session
from unitgen.ops.systemd.specs import render_spec
from unitgen.plan.gpus import place
from unitgen.plan.record import parse_record
from unitgen.spec.model import DEFAULT_SWAP_DRAIN, parse_spec
from unitgen.targets.systemd.installed import scan, unit_dir
from unitgen.targets.systemd.render import render_swap_dropin
from unitgen.timespan import format_seconds

MEMBER = 'name = "a"\nbackend = "vllm"\nmodel = "m"\nactivation = "on-demand"\n'


def problems(text: str) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(text, "x.toml")
    return [str(p) for p in info.value.problems]


def test_member_keys_and_default_drain():
    spec = parse_spec(MEMBER + 'swap_group = "gpu0"\n', "a.toml")
    assert spec.swap_group == "gpu0" and spec.swap_drain == DEFAULT_SWAP_DRAIN
    spec = parse_spec(MEMBER + 'swap_group = "gpu0"\nswap_drain = "90s"\n', "a.toml")
    assert spec.swap_drain == 90


@pytest.mark.parametrize(("text", "key", "words"), [
    ('name = "a"\nbackend = "vllm"\nmodel = "m"\nswap_group = "g"\n', "swap_group",
     'needs activation = "on-demand"'),
    (MEMBER + 'swap_group = "G 0"\n', "swap_group", "lowercase letters"),
    (MEMBER + 'swap_drain = "1min"\n', "swap_drain", "needs swap_group"),
    (MEMBER + 'swap_group = "g"\nswap_drain = "soon"\n', "swap_drain", "not a time span"),
    ('name = "a"\nbackend = "custom"\ncommand = ["/bin/x"]\nsocket_activation = true\n'
     'activation = "on-demand"\nswap_group = "g"\n', "swap_group", "socket_activation"),
])
def test_member_key_problems(text, key, words):
    out = problems(text)
    assert any(p.startswith(f"x.toml: {key}: ") and words in p for p in out), out


def test_membership_follows_deploy_and_remove():
    spec = parse_spec(MEMBER.replace('"a"', '"c"') + 'swap_group = "g"\n', "c.toml")
    plain = parse_spec(MEMBER.replace('"a"', '"b"'), "b.toml")
    now = after_change({"a": "g", "b": "g"}, [spec, plain])
    assert now == {"a": "g", "c": "g"}  # b left the group by a redeploy without the key
    assert groups_of(now) == {"g": ["a", "c"]}
    policy: RunTogether = SwapGroups(now)
    assert policy.never_with("a") == ["c"] and policy.never_with("b") == []
    assert policy.makes_room_for("c") == {"a"} and policy.makes_room_for("b") == frozenset()
    assert after_change(now, removed=["c"]) == {"a": "g"}


def test_dropin_names_every_other_member_and_orders_each_pair_once():
    text = render_swap_dropin("b", "g", ["a", "c"]).text
    lines = [ln for ln in text.splitlines() if not ln.startswith("#")]
    assert lines == ["[Unit]", "Conflicts=a-backend.service", "Conflicts=c-backend.service",
                     "After=a-backend.service"]
    assert render_swap_dropin("b", "g", []).name == "b-backend.service.d/unitgen-swap.conf"


def _spec(tmp_path: Path, name: str, group: str | None) -> Path:
    extra = 'activation = "on-demand"\n' + (f'swap_group = "{group}"\n' if group else "")
    return write_spec(tmp_path, name, custom_spec(name, port=None, extra=extra))


def _install(tmp_path: Path, name: str, group: str | None) -> Path:
    """Into unit_dir("user"): callers point XDG_CONFIG_HOME at tmp_path first."""
    path = _spec(tmp_path, name, group)
    done = render_spec(path, GOLDEN_CTX)
    write_files(unit_dir("user"), name, tuple(f for f in done.files if not f.secret))
    return path


def test_dropins_are_rewritten_for_every_member(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    for name in ("a", "b", "c"):
        _install(tmp_path, name, "g")
    _install(tmp_path, "plain", None)
    installed = scan(unit_dir("user"))
    assert installed_groups(installed) == {"a": "g", "b": "g", "c": "g"}
    binding = SystemdSwap(Session("user"))  # files only: the manager is never asked
    swap = SwapFeature(binding)
    binding.write(swap.dropins(installed))
    conf = unit_dir("user") / "a-backend.service.d" / "unitgen-swap.conf"
    assert "Conflicts=b-backend.service\nConflicts=c-backend.service\n" in conf.read_text()
    assert not (unit_dir("user") / "plain-backend.service.d").exists()
    assert swap.dropins(installed) == []  # idempotent

    changes = swap.dropins(installed, removed=["c"])
    assert sorted(p.parent.name for p, _ in changes) == [
        "a-backend.service.d", "b-backend.service.d", "c-backend.service.d"]
    binding.write(changes)
    assert "c-backend" not in conf.read_text()
    assert not (unit_dir("user") / "c-backend.service.d").exists()


def _gpu(index: int, free: int, procs: tuple[GpuProcess, ...] = ()) -> Gpu:
    return Gpu(index=index, uuid=f"GPU-{index}", name="fake", minor=index, total=80,
               used=80 - free, free=free, processes=procs)


def test_members_share_a_gpu_without_gpu_share():
    gpus = [_gpu(0, 10, (GpuProcess(pid=1, used_bytes=60, instance="a", manager="system"),))]
    claims = {"GPU-0": [("a", False)]}
    with pytest.raises(SpecError, match="already claimed by a"):
        place(source="b.toml", name="b", want=(0,), memory=50, share=False, gpus=gpus,
              claims=claims)
    placed = place(source="b.toml", name="b", want=(0,), memory=50, share=False, gpus=gpus,
                   claims=claims, mates=frozenset({"a"}))
    assert placed.uuids == ("GPU-0",)  # a's 60 count as free: a unloads before b loads
    with pytest.raises(SpecError, match="needs"):
        place(source="b.toml", name="b", want=(0,), memory=75, share=False, gpus=gpus,
              claims=claims, mates=frozenset({"a"}))


def test_mates_come_from_the_servers_conflicts():
    assert mates_from_conflicts("b-backend.service c-backend.service foo.service", "a") == [
        "b", "c"]
    assert mates_from_conflicts("a-backend.service shutdown.target", "a") == []


def _loaded_after(module: str) -> set[str]:
    """Which of the swap proxy's modules (and asyncio) importing ``module`` loads."""
    code = (f"import sys, {module}; print(' '.join(m for m in sys.modules "
            "if m == 'asyncio' or m.startswith('unitgen.inunit.swap')))")
    done = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                          check=True)
    return set(done.stdout.split())


def test_the_entry_point_leaves_asyncio_and_the_forwarder_for_later():
    """asyncio takes tens of milliseconds to import: the entry point imports it
    (with the forwarder) in a thread while it takes the turn, so importing the
    entry point must not pull it in; and the forwarder never imports the entry
    point back."""
    assert _loaded_after("unitgen.inunit.swapproxy") == {
        "unitgen.inunit.swapproxy", "unitgen.inunit.swapctl"}
    assert "unitgen.inunit.swapproxy" not in _loaded_after("unitgen.inunit.swapforward")


def test_member_units_use_the_swap_proxy(tmp_path):
    path = _spec(tmp_path, "m", "g")
    units = {f.name: f.text for f in render_spec(path, GOLDEN_CTX).files}
    assert "unitgen.inunit.swapproxy --name m --group g" in units["m.service"]
    assert "BindsTo=m.socket\n" in units["m.service"]  # not the server: no pulled Conflicts=
    assert "StopWhenUnneeded" not in units["m-backend.service"]
    record = parse_record(units["m.socket"])
    assert record is not None and record.swap_group == "g"
    plain = _spec(tmp_path, "p", None)
    # a plain instance's server is part of its socket (see docs/reliability.md)
    assert "PartOf=p.socket" in {f.name: f.text for f in render_spec(
        plain, GOLDEN_CTX).files}["p-backend.service"]


def _verify(root: Path, units: Path, names: list[str]) -> str:
    done = subprocess.run(["systemd-analyze", "verify", f"--root={root}", "--man=no",
                           *(str(units / n) for n in names)], capture_output=True, text=True)
    return f"rc={done.returncode}\n{done.stdout}{done.stderr}".strip()


def test_member_units_and_dropin_pass_systemd_analyze_verify(tmp_path):
    """The drop-in is read with its unit, and verify prints nothing about either."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    spec = _spec(tmp_path, "m", "g")
    files = {f.name: f.text for f in render_spec(spec, GOLDEN_CTX).files}
    dropin = render_swap_dropin("m", "g", ["a", "z"])
    root = tmp_path / "root"
    units = root / "etc/systemd/system"
    for src in ("/usr/lib/systemd/system", "/lib/systemd/system"):
        if Path(src).is_dir():
            shutil.copytree(src, root / "usr/lib/systemd/system", symlinks=True)
            break
    (units / "m-backend.service.d").mkdir(parents=True)
    for name, text in {**files, dropin.name: dropin.text}.items():
        (units / name).write_text(text)
    for mate in ("a", "z"):
        (units / f"{mate}-backend.service").write_text("[Service]\nExecStart=/bin/true\n")
    for program in ("/usr/bin/python3", sys.executable):
        stub = root / program.lstrip("/")
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\n")
        stub.chmod(0o755)
    assert _verify(root, units, list(files)) == "rc=0"
    # the drop-in is really read: a bad line in it is reported
    (units / dropin.name).write_text(dropin.text + "Bogus=1\n")
    assert "Unknown key 'Bogus'" in _verify(root, units, list(files))


def test_the_gateway_waits_for_a_swap_member_as_long_as_its_proxy_does(tmp_path):
    """One rule for how long a request to a swap-group member may wait: the
    gateway's ``timeout server`` for it is the deadline of the member's own
    proxy (its public probe), whatever the turns and the drain say."""
    path = write_spec(tmp_path, "a", MEMBER + 'swap_group = "gpu0"\nswap_drain = "45s"\n'
                      'gateway = "llm"\n[health]\ntimeout = "7min"\n')
    done = render_spec(path, GOLDEN_CTX)
    proxy = next(f.text for f in done.files if f.name == "a.service")
    probe = next(ln for ln in proxy.splitlines() if "--label public" in ln).split()
    deadline = probe[probe.index("--timeout") + 1]
    member = member_of(done.instance)
    assert member is not None
    assert deadline == format_seconds(member.wait)
    assert member.wait == turn_wait(7 * 60, 45) > 7 * 60 + 45


def test_systemctl_show_of_several_units_is_read_per_block():
    """systemctl prints a service's own properties (MainPID, Result) before the
    unit's Id: read line by line after each Id, the next unit got them (a
    stopped member seemed to run the other's pid, and its Result was the
    other's)."""
    text = ("MainPID=0\nResult=success\nId=b-backend.service\nActiveState=inactive\n\n"
            "MainPID=123\nResult=exit-code\nId=a-backend.service\nActiveState=active\n")
    shown = parse_show(text, ["b-backend.service", "a-backend.service"],
                       ("ActiveState", "MainPID", "Result"))
    assert shown == {"b-backend.service": {"ActiveState": "inactive", "MainPID": "0",
                                           "Result": "success"},
                     "a-backend.service": {"ActiveState": "active", "MainPID": "123",
                                           "Result": "exit-code"}}
