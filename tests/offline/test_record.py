"""The installed record (issue 26): one format written from the plan and one
reader for every target and feature; what is read back is what was planned."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from tests.golden_files import eight_fake_gpus, example_specs
from tests.helpers import GOLDEN_CTX, write_spec
from unitgen.features.gateway.plan import Member
from unitgen.ops.systemd.specs import render_spec
from unitgen.plan.record import RECORD_PREFIX, Record, parse_record, record_of
from unitgen.spec.keys import Activation
from unitgen.targets.supervisor.installed import scan as scan_supervisor
from unitgen.targets.supervisor.render import SupervisorContext, render_instance
from unitgen.targets.systemd.installed import scan as scan_systemd

_text = st.text(max_size=40)
_records = st.builds(
    Record,
    name=st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True),
    kind=st.sampled_from(["instance", "gateway"]),
    backend=_text, public=_text, private=_text, probe=_text, health=_text,
    ports=st.tuples(st.integers(1, 65535), st.integers(1, 65535)),
    timeout=st.floats(0, 1e6, allow_nan=False),
    key_env=st.none() | _text, eager=st.booleans(),
    gpus=st.tuples(_text), gpu_share=st.booleans(), swap_group=st.none() | _text,
    member=st.none() | st.builds(Member, instance=_text, address=_text,
                                 names=st.tuples(_text, _text),
                                 max_concurrent=st.none() | st.integers(1, 100),
                                 wait=st.floats(0, 1e4, allow_nan=False),
                                 queue_timeout=st.floats(0, 1e4, allow_nan=False),
                                 on_demand=st.booleans(), gateway=_text, remote=st.booleans()),
    container=st.none() | _text, image=_text,
)


@given(_records)
def test_a_record_reads_back_as_written_on_one_line(record):
    line = record.line()
    assert line.startswith(RECORD_PREFIX)
    assert line.isascii() and "\n" not in line and "\r" not in line
    assert parse_record(f"# a header\n{line}\n[Unit]\n") == record


def test_an_unreadable_or_foreign_record_is_none():
    assert parse_record("# unitgen-record: {not json\n") is None
    assert parse_record('# unitgen-record: {"v": 99, "name": "x"}\n') is None
    assert parse_record('# unitgen-record: {"v": 1, "name": "x", "ports": ["a"]}\n') is None
    assert parse_record("[Unit]\n") is None


def _spec(tmp_path: Path) -> Path:
    return write_spec(tmp_path, "q", 'name = "q"\nbackend = "vllm"\nmodel = "m"\nport = 8123\n'
                      'activation = "on-demand"\ngateway = "llm"\naliases = ["qq"]\n'
                      'swap_group = "g"\n')


def test_both_targets_read_back_the_planned_record(tmp_path):
    """Written by the systemd templates and by the supervisor template, read by
    each target's scan through the one reader: the planned record both times."""
    done = render_spec(_spec(tmp_path), GOLDEN_CTX)
    want = record_of(done.instance)
    assert want.member is not None and want.member.names == ("q", "qq")
    assert want.swap_group == "g" and want.public == "127.0.0.1:8123"
    units = tmp_path / "units"
    units.mkdir()
    for f in done.files:
        (units / f.name).write_text(f.text)
    assert scan_systemd(units)["q"].record == want

    ctx = SupervisorContext(python="/usr/bin/python3", proxyd="/usr/lib/systemd/proxyd",
                            run_dir="/run/ug", log_dir="/var/log/ug", secrets_dir="/etc/ug")
    inst = dataclasses.replace(done.instance, spec=dataclasses.replace(
        done.instance.spec, swap_group=None, gateway=None, activation=Activation.EAGER))
    conf = tmp_path / "conf"
    conf.mkdir()
    for cf in render_instance(inst, ctx):
        if not cf.secret:
            (conf / cf.name).write_text(cf.text)
    found = scan_supervisor(conf, "/run/ug")["q"]
    assert found.record == record_of(inst)
    assert found.private == "/run/ug/unitgen-q/http.sock"


def test_every_example_reads_back_its_record(tmp_path):
    for example in example_specs():
        with eight_fake_gpus():
            done = render_spec(example, GOLDEN_CTX)
        out = tmp_path / example.stem
        out.mkdir()
        for f in done.files:
            if not f.config and not f.secret:
                (out / f.name).write_text(f.text)
        assert scan_systemd(out)[done.instance.name].record == record_of(done.instance), example
