"""What a target cannot do is a table (unitgen.targets.capabilities): each
target declares its capabilities, the refusals come from one table of which
keys need which capability. Giving a target a capability removes exactly its
refusals; every key of the table is a key a spec has."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tests.helpers import write_spec
from unitgen.errors import SpecError
from unitgen.features.base import Feature
from unitgen.ops.pipeline import CheckAllocator, plan_paths
from unitgen.ops.registry import names
from unitgen.plan.instance import resolve
from unitgen.spec.keys import KEYS, Activation
from unitgen.spec.model import load_spec
from unitgen.targets.capabilities import ALL, NEEDS, Capability, Limits
from unitgen.targets.supervisor.render import LIMITS as SUPERVISOR
from unitgen.targets.systemd.contexts import RenderContext
from unitgen.targets.systemd.render import SYSTEM_LIMITS, USER_LIMITS, SystemdTarget

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
EVERY_TARGET = {"supervisor": SUPERVISOR, "systemd (system)": SYSTEM_LIMITS,
                "systemd (--user)": USER_LIMITS}


def test_every_target_of_the_registry_is_tested_here():
    assert {name.split(" ")[0] for name in EVERY_TARGET} == set(names())


def _asks_everything(tmp_path: Path):
    """A planned instance whose spec uses every key of the table. Built past the
    spec's own rules (image with user, ...): the table is what is tested."""
    spec = load_spec(write_spec(tmp_path, "x", 'name = "x"\nbackend = "vllm"\nmodel = "m"\n'
                                                'host = "::1"\nport = 8000\n'))
    inst = resolve(spec)
    spec = dataclasses.replace(
        spec, activation=Activation.ON_DEMAND, idle_stop=60.0, swap_group="g", gateway="gw",
        image="example.org/vllm:1", user="u", group="g",
        systemd_unit=(("Description", "d"),), systemd_service=(("Nice", "5"),))
    return dataclasses.replace(inst, spec=spec, gateway=object())


def _refused(limits: Limits, inst) -> set[tuple[str, str]]:
    return {(p.key, p.message) for p in limits.spec_refusals(inst.spec)
            + limits.plan_refusals(inst)}


@pytest.mark.parametrize("limits", EVERY_TARGET.values(), ids=EVERY_TARGET.keys())
def test_a_capability_given_removes_its_refusals_and_nothing_else(tmp_path, limits):
    inst = _asks_everything(tmp_path)
    refused = _refused(limits, inst)
    keys = {key for key, _ in refused}
    for need in NEEDS:  # every capability it lacks is refused, once per key using it
        uses = [*(need.spec(inst.spec) if need.spec else []),
                *(need.planned(inst) if need.planned else [])]
        assert uses, need
        assert ({k for k, _ in uses} <= keys) == (need.capability not in limits.capabilities)
    for capability in ALL - limits.capabilities:
        more = Limits(limits.capabilities | {capability},
                      {c: m for c, m in limits.why_not.items() if c != capability})
        gone = refused - _refused(more, inst)
        own = {k for n in NEEDS if n.capability == capability
               for k, _ in [*(n.spec(inst.spec) if n.spec else []),
                            *(n.planned(inst) if n.planned else [])]}
        assert {key for key, _ in gone} == own, capability
        assert _refused(more, inst) == refused - gone


def test_a_lacking_capability_needs_its_reason_and_only_those_have_one():
    with pytest.raises(ValueError, match="reasons for"):
        Limits(ALL - {Capability.CONTAINER}, {})
    with pytest.raises(ValueError, match="reasons for"):
        Limits(ALL, {Capability.CONTAINER: "cannot"})


def test_the_table_names_keys_a_spec_has():
    declared = {k.name for k in KEYS} | {"kind"}  # kind: the gateway spec's own key
    for need in NEEDS:
        for key in need.keys.split(", "):
            assert key.removesuffix(".*") in declared, need


def test_a_user_manager_refuses_user_and_group_with_file_and_key(tmp_path):
    spec = write_spec(tmp_path, "x", 'name = "x"\nbackend = "vllm"\nmodel = "m"\n'
                                     'user = "llm"\ngroup = "video"\n')
    ctx = RenderContext(python="/usr/bin/python3", proxyd="/usr/lib/systemd/systemd-socket-proxyd",
                        scope="user")
    with pytest.raises(SpecError) as err:
        plan_paths([spec], SystemdTarget(ctx), CheckAllocator())
    assert {(p.file, p.key) for p in err.value.problems} == {(str(spec), "user"),
                                                             (str(spec), "group")}
    assert all("is for the system manager" in p.message and f"drop {p.key}" in p.message
               for p in err.value.problems)
    system = dataclasses.replace(ctx, scope="system")
    assert plan_paths([spec], SystemdTarget(system), CheckAllocator())


def test_the_supervisor_docs_list_exactly_what_it_lacks():
    text = (Path(__file__).resolve().parents[2] / "docs" / "supervisor.md").read_text()
    section = text.split("## What the supervisor target refuses", 1)[1].split("\n## ", 1)[0]
    rows = [line.split(" | ")[0] for line in section.splitlines()
            if line.startswith("| ") and not line.startswith(("| spec", "|---"))]

    def names(row: str, key: str) -> bool:
        key = key.removesuffix(".*")
        return any(form in row for form in (f"`{key}`", f"`{key} =", f"`[{key}]`"))

    lacking = [n for n in NEEDS if n.capability not in SUPERVISOR.capabilities]
    assert len(rows) == len(lacking)
    for need in lacking:
        assert [r for r in rows if all(names(r, k) for k in need.keys.split(", "))], need


def test_a_target_lists_a_features_capabilities_exactly_when_it_binds_it(tmp_path):
    """A target claiming a feature's capability without its binding would drop the
    feature's keys silently; one binding it without the capability refuses specs
    it could run (found by the files-touched measurement of issue 26)."""
    from unitgen.features.registry import FEATURES  # noqa: PLC0415
    from unitgen.ops.supervisor.bindings import features as supervisor_features  # noqa: PLC0415
    from unitgen.ops.supervisor.rpc import Endpoint, SupervisorRPC  # noqa: PLC0415
    from unitgen.ops.supervisor.site import Site  # noqa: PLC0415
    from unitgen.ops.systemd.bindings import features as systemd_features  # noqa: PLC0415
    from unitgen.ops.systemd.session import Session  # noqa: PLC0415
    from unitgen.targets.supervisor.render import LIMITS, SupervisorContext  # noqa: PLC0415
    from unitgen.targets.systemd.render import SYSTEM_LIMITS  # noqa: PLC0415

    every = {c for where in FEATURES.values() for c in _feature(where).capabilities}
    session = Session("system")  # never connects: bindings are made, not used
    ctx = SupervisorContext(python="/usr/bin/python3", proxyd="/bin/true", run_dir="/run/x",
                            log_dir="/var/log/x", secrets_dir="/etc/x")
    site = Site(Endpoint("unix:///nonexistent.sock"), tmp_path, ctx)
    try:
        for bound, limits in ((systemd_features(session), SYSTEM_LIMITS),
                              (supervisor_features(site, SupervisorRPC(site.endpoint)), LIMITS)):
            provided = {c for f in bound for c in f.capabilities}
            assert provided == every & limits.capabilities, (bound, limits.capabilities)
    finally:
        session.close()


def _feature(where: str) -> type[Feature]:
    import importlib  # noqa: PLC0415

    module, _, attr = where.partition(":")
    found: type[Feature] = getattr(importlib.import_module(module), attr)
    return found
