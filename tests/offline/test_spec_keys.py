"""Keys build the spec: every declared key reaches InstanceSpec, and each default is
written once, in its declaration (unitgen/spec/keys.py)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path
from typing import Any

import pytest

from unitgen.errors import SpecError
from unitgen.spec import model
from unitgen.spec.backends import BACKENDS
from unitgen.spec.keys import KEYS, RECORDS, Activation, Key, Kind, by_name
from unitgen.spec.model import HealthSpec, InstanceSpec, from_mapping
from unitgen.spec.reference import markdown_table, shown_default
from unitgen.timespan import parse_timespan

ROOT = Path(__file__).resolve().parents[2]
BASE: dict[str, Any] = {"name": "k", "backend": "vllm", "model": "m"}
CUSTOM: dict[str, Any] = {"name": "k", "backend": "custom", "command": ["srv", "{port}"]}
ON_DEMAND: dict[str, Any] = {"activation": "on-demand"}
IMAGE: dict[str, Any] = {"image": "vllm/vllm-openai:v0.11.0"}

# For every declared key: what a spec sets (with what that key needs besides) and
# the value InstanceSpec must then hold, never the key's default. A key declared
# without a line here fails test_every_declared_key_has_a_sample.
SAMPLES: dict[str, tuple[dict[str, Any], object]] = {
    "name": ({"name": "other"}, "other"),
    "backend": ({"backend": "sglang"}, "sglang"),
    "model": ({"model": "Qwen/Qwen2-7B"}, "Qwen/Qwen2-7B"),
    "description": ({"description": "a model"}, "a model"),
    "executable": ({"executable": "/opt/vllm/bin/vllm"}, "/opt/vllm/bin/vllm"),
    "host": ({"host": "0.0.0.0"}, "0.0.0.0"),
    "port": ({"port": 8123}, 8123),
    "args": ({"args": ["--dtype", 16]}, ("--dtype", "16")),
    "env": ({"env": {"HF_HOME": "/m"}}, (("HF_HOME", "/m"),)),
    "secret_env": ({"env": {"HF_TOKEN": "t"}, "secret_env": ["HF_TOKEN"]}, ("HF_TOKEN",)),
    "command": ({**CUSTOM, "command": ["/bin/srv", "--listen", "{port}"]},
                ("/bin/srv", "--listen", "{port}")),
    "socket_activation": ({**CUSTOM, "command": ["/bin/srv"], "socket_activation": True}, True),
    "activation": (ON_DEMAND, "on-demand"),
    "idle_stop": ({**ON_DEMAND, "idle_stop": "10min"}, 600.0),
    "health.path": ({"health": {"path": "/ready"}}, "/ready"),
    "health.timeout": ({"health": {"timeout": "2min"}}, 120.0),
    "health.watchdog": ({"health": {"watchdog": "off"}}, None),
    "user": ({"user": "models"}, "models"),
    "group": ({"group": "gpu"}, "gpu"),
    "working_directory": ({"working_directory": "/srv/m"}, "/srv/m"),
    "restart": ({"restart": "always"}, "always"),
    "private_port": ({"private_port": 812}, 812),
    "max_connections": ({"max_connections": 77}, 77),
    "api_key_env": ({**CUSTOM, "env": {"KEY": "k"}, "api_key_env": "KEY"}, "KEY"),
    "systemd.unit": ({"systemd": {"unit": {"After": "x.service"}}}, (("After", "x.service"),)),
    "systemd.service": ({"systemd": {"service": {"Nice": 5}}}, (("Nice", "5"),)),
    "gpus": ({"gpus": [0, 2]}, (0, 2)),
    "gpu_memory": ({"gpus": 1, "gpu_memory": "1KiB"}, 1024),
    "gpu_share": ({"gpu_share": True}, True),
    "swap_group": ({**ON_DEMAND, "swap_group": "gpu0"}, "gpu0"),
    "swap_drain": ({**ON_DEMAND, "swap_group": "gpu0", "swap_drain": "1min"}, 60.0),
    "gpu_pool": ({**ON_DEMAND, "gpus": 1, "gpu_pool": False}, False),
    "pool_min_turn": ({**ON_DEMAND, "gpus": 1, "pool_min_turn": "30s"}, 30.0),
    "pool_sleep": ({**ON_DEMAND, "gpus": 1, "pool_sleep": False}, False),
    "hardening": ({"hardening": False}, False),
    "offline": ({"offline": True}, True),
    "gateway": ({"gateway": "gw"}, "gw"),
    "aliases": ({"aliases": ["qwen", "Qwen/Qwen2-7B"]}, ("qwen", "Qwen/Qwen2-7B")),
    "max_concurrent": ({"max_concurrent": 4}, 4),
    "queue_timeout": ({"queue_timeout": "2min"}, 120.0),
    "balance": ({"balance": "leastconn"}, "leastconn"),
    "image": (IMAGE, "vllm/vllm-openai:v0.11.0"),
    "volumes": ({**IMAGE, "volumes": ["/srv/hf:/root/.cache/huggingface:ro"]},
                ("/srv/hf:/root/.cache/huggingface:ro",)),
    "pull": ({**IMAGE, "pull": "never"}, "never"),
    "pull_timeout": ({**IMAGE, "pull_timeout": "2h"}, 7200.0),
    "shm_size": ({**IMAGE, "shm_size": "8GiB"}, 8 * 1024**3),
    "ipc": ({**IMAGE, "ipc": "host"}, "host"),
    "podman_args": ({**IMAGE, "podman_args": ["--tmpfs=/scratch"]}, ("--tmpfs=/scratch",)),
}


def value_of(spec: InstanceSpec, key: Key) -> object:
    record, attr = key.field
    return getattr(getattr(spec, record) if record else spec, attr)


def test_every_declared_key_has_a_sample():
    assert sorted(SAMPLES) == sorted(k.name for k in KEYS)


@pytest.mark.parametrize("key", KEYS, ids=lambda k: k.name)
def test_a_declared_key_reaches_the_built_spec(key):
    """A key the build leaves out would hold its default: the sample's value must
    arrive, on the field the declaration names."""
    given, expected = SAMPLES[key.name]
    assert expected != key.default, f"{key.name}: the sample must not be the default"
    data = {**BASE, **given}
    spec = from_mapping(data, "k.toml")
    assert value_of(spec, key) == expected
    for other in KEYS:  # and what the spec does not set holds the declared default
        if other.name.split(".")[0] not in data:
            assert value_of(spec, other) == other.default, other.name


def test_every_field_is_a_declared_key_and_no_other():
    fields = {("", f.name) for f in dataclasses.fields(InstanceSpec)} - {("", "source")}
    fields -= {("", r) for r in RECORDS}
    fields |= {("health", f.name) for f in dataclasses.fields(HealthSpec)}
    declared = [k.field for k in KEYS]
    assert len(declared) == len(set(declared))
    assert set(declared) == fields


def test_the_dataclass_defaults_are_the_declarations():
    for key in KEYS:
        record, attr = key.field
        cls = HealthSpec if record == "health" else InstanceSpec
        (f,) = (f for f in dataclasses.fields(cls) if f.name == attr)
        if key.required:
            assert f.default is dataclasses.MISSING, key.name
        else:
            assert f.default == key.default and type(f.default) is type(key.default), key.name
    # and a spec that sets nothing holds exactly them
    spec = from_mapping(dict(BASE), "k.toml")
    for key in KEYS:
        if key.name not in BASE:
            assert value_of(spec, key) == key.default, key.name


def test_no_default_is_written_in_the_dataclasses():
    """Each field's default is the call that reads its declaration, never a literal
    (a second place for 1024 would drift)."""
    tree = ast.parse(inspect.getsource(model))
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    fields = {k.field: k.name for k in KEYS}
    for cls_name, record in (("InstanceSpec", ""), ("HealthSpec", "health")):
        for stmt in classes[cls_name].body:
            if not isinstance(stmt, ast.AnnAssign) or stmt.value is None:
                continue
            assert isinstance(stmt.target, ast.Name)
            attr = stmt.target.id
            if attr in RECORDS:
                continue  # a record: its own fields follow the same rule
            call = stmt.value
            assert isinstance(call, ast.Call) and isinstance(call.func, ast.Name), attr
            assert call.func.id == "default_of", attr
            assert [ast.literal_eval(a) for a in call.args] == [fields[record, attr]], attr


def test_the_docs_show_the_declared_defaults():
    """The table's default column is derived from each declaration's value."""
    rows = markdown_table().splitlines()[2:]  # one row per key, in declaration order
    assert len(rows) == len(KEYS)
    for key, row in zip(KEYS, rows, strict=True):
        shown = row.split(" | ")[2]
        assert shown == shown_default(key), key.name
        if key.required or key.default_doc or key.default in (None, ()):
            continue
        text = shown.strip("`")
        if key.kind is Kind.DURATION:
            assert parse_timespan(text) == key.default, key.name
        elif isinstance(key.default, bool):
            assert text == str(key.default).lower(), key.name
        else:
            assert text == str(key.default), key.name


def test_restrictions_name_what_exists():
    for key in KEYS:
        assert set(key.backends) <= set(BACKENDS), key.name
        assert key.activation is None or key.activation in Activation
        assert (key.kind is Kind.CHOICE) == (key.choices is not None), key.name
        if key.choices is not None and key.default is not None:
            assert key.default in key.choices, key.name


@pytest.mark.parametrize("key", [k for k in KEYS if k.activation], ids=lambda k: k.name)
def test_a_declared_activation_is_enforced(key):
    given, _ = SAMPLES[key.name]
    eager = {k: v for k, v in given.items() if k != "activation"}
    with pytest.raises(SpecError) as info:
        from_mapping({**BASE, **eager}, "k.toml")
    assert any(p.key == key.name and key.activation in p.message
               for p in info.value.problems), info.value.problems


@pytest.mark.parametrize("key", [k for k in KEYS if k.backends], ids=lambda k: k.name)
def test_a_declared_backend_restriction_is_enforced(key):
    given, _ = SAMPLES[key.name]
    elsewhere = {k: v for k, v in given.items() if k not in CUSTOM or k == key.name}
    with pytest.raises(SpecError) as info:
        from_mapping({**BASE, **elsewhere}, "k.toml")
    assert any(p.key == key.name and "is only for backend 'custom'" in p.message
               for p in info.value.problems), info.value.problems


def test_the_duration_constants_are_the_declarations():
    assert by_name("health.timeout").default == model.DEFAULT_HEALTH_TIMEOUT
    assert by_name("swap_drain").default == model.DEFAULT_SWAP_DRAIN
