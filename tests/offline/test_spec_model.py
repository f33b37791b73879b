"""One definition of the spec (issue 7): the key declarations drive parsing, the
docs table and the JSON Schema; one check run reports every kind of problem."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest

from tests.helpers import write_spec
from tests.nvml import ZERO_GPUS, eight_gpus, fake_nvml
from unitgen.spec.backends import BACKENDS, BackendName
from unitgen.spec.keys import KEYS, by_name
from unitgen.spec.model import parse_spec
from unitgen.spec.reference import docs_with_table, json_schema
from unitgen.timespan import parse_timespan

__all__ = ["fake_nvml"]

ROOT = Path(__file__).resolve().parents[2]


def unitgen(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "unitgen", *args], capture_output=True,
                          text=True, env=os.environ.copy())


def test_docs_table_is_the_generated_one():
    docs = (ROOT / "docs" / "spec.md").read_text(encoding="utf-8")
    assert docs_with_table(docs) == docs, "run: python -m unitgen.spec.reference"
    for key in KEYS:
        shown = key.name if "." not in key.name or key.name.startswith("systemd") \
            else f"[{key.name.split('.')[0]}] {key.name.split('.')[1]}"
        assert f"`{shown}`" in docs or f"`[{key.name}]`" in docs, key.name


def test_backend_names_are_the_backend_tables():
    """One list of backends: the table. The key's choices, the schema's enum and the
    docs row follow it, and every name parses."""
    names = list(BACKENDS)
    assert [b.value for b in BackendName] == names
    assert list(by_name("backend").choice_values) == names
    assert json_schema()["else"]["properties"]["backend"]["enum"] == names
    assert " / ".join(f"`{n}`" for n in names) in (ROOT / "docs" / "spec.md").read_text()
    for name in names:
        extra = 'command = ["srv", "{port}"]' if name == "custom" else 'model = "m"'
        assert parse_spec(f'name = "a"\nbackend = "{name}"\n{extra}\n', "a.toml").backend == name


def test_schema_validates_every_example_and_rejects_mistakes():
    validator = jsonschema.Draft202012Validator(json_schema())
    validator.check_schema(json_schema())
    for spec in sorted((ROOT / "examples").glob("*.toml")):
        data = tomllib.loads(spec.read_text(encoding="utf-8"))
        errors = list(validator.iter_errors(data))
        assert not errors, f"{spec.name}: {errors[0].message}"
    good = {"name": "a", "backend": "vllm", "model": "m"}
    assert not list(validator.iter_errors(good))
    unknown = list(validator.iter_errors({**good, "prot": 8000}))
    assert unknown and "prot" in unknown[0].message
    wrong_type = list(validator.iter_errors({**good, "port": "8000"}))
    assert wrong_type and wrong_type[0].path[0] == "port"
    nested = list(validator.iter_errors({**good, "health": {"timeuot": "1min"}}))
    assert nested
    # a gateway spec is checked against the gateway's keys
    gw = {"kind": "gateway", "name": "llm", "port": 8080, "max_body": "2MiB"}
    assert not list(validator.iter_errors(gw))
    assert list(validator.iter_errors({**gw, "backend": "vllm"}))  # an instance key
    assert list(validator.iter_errors({**gw, "port": 0}))
    assert list(validator.iter_errors({"kind": "gateway", "name": "llm"}))  # no port


def test_schema_command_prints_the_schema():
    done = unitgen("schema")
    assert done.returncode == 0
    assert json.loads(done.stdout) == json_schema()


FIVE_MISTAKES = """\
name = "five"
backend = "vllm"
model = "m"
port = 8000
prot = 1
args = ["--port", "9000"]
max_connections = 0
gpus = [3]
[systemd.service]
ExecStart = "/bin/sh"
"""


def test_five_kinds_of_mistakes_in_one_check_run(fake_nvml, tmp_path):
    fake_nvml(ZERO_GPUS)
    spec = write_spec(tmp_path, "five", FIVE_MISTAKES)
    done = unitgen("check", str(spec))
    assert done.returncode == 2
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error: ")]
    keys = {ln.split(": ")[2] for ln in errors}
    assert {"prot", "max_connections", "args", "systemd.service.ExecStart", "gpus"} <= keys, errors
    assert any("--port 9000 conflicts with port = 8000" in ln for ln in errors)
    assert any("GPU 3 is not on this host" in ln for ln in errors)

    done = unitgen("check", "--json", str(spec))
    assert done.returncode == 2
    data = json.loads(done.stdout)
    assert data["ok"] is False
    assert {p["key"] for p in data["problems"]} >= {"prot", "max_connections", "args",
                                                    "systemd.service.ExecStart", "gpus"}
    assert all(p["file"] == str(spec) for p in data["problems"])


def test_problems_of_every_file_together_and_gpu_host_from_a_file(fake_nvml, tmp_path):
    fake_nvml(eight_gpus())
    gpus_json = tmp_path / "gpus.json"
    gpus_json.write_text(unitgen("gpus", "--json").stdout)
    fake_nvml({"error": "library_not_found"})
    gpu = write_spec(tmp_path, "g", 'name = "g"\nbackend = "vllm"\nmodel = "m"\ngpus = 2\n')
    ok = write_spec(tmp_path, "c", 'name = "c"\nbackend = "vllm"\nmodel = "m"\n')
    # without a driver: the GPU spec "cannot be placed here" (exit 3), the other is still ok
    done = unitgen("check", str(gpu), str(ok))
    assert done.returncode == 3, done.stderr
    assert "cannot place GPUs here" in done.stderr
    # with the GPU host's `unitgen gpus --json`, both are fine
    done = unitgen("check", "--gpus-from", str(gpus_json), str(gpu), str(ok))
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("ok: ") == 2
    render = unitgen("render", "--gpus-from", str(gpus_json), str(gpu))
    assert "CUDA_VISIBLE_DEVICES=GPU-" in render.stdout


def test_two_specs_on_one_address_are_refused_naming_both(tmp_path):
    a = write_spec(tmp_path, "a", 'name = "a"\nbackend = "vllm"\nmodel = "m"\n'
                                  'host = "0.0.0.0"\nport = 8765\n')
    b = write_spec(tmp_path, "b", 'name = "b"\nbackend = "vllm"\nmodel = "m"\n'
                                  'host = "127.0.0.1"\nport = 8765\n')
    c = write_spec(tmp_path, "c", 'name = "c"\nbackend = "vllm"\nmodel = "m"\n'
                                  'host = "::"\nport = 8766\n')
    d = write_spec(tmp_path, "d", 'name = "d"\nbackend = "vllm"\nmodel = "m"\n'
                                  'host = "127.0.0.2"\nport = 8766\n')
    done = unitgen("check", str(a), str(b))
    assert done.returncode == 2
    assert "0.0.0.0:8765" in done.stderr and "127.0.0.1:8765" in done.stderr
    assert "'a'" in done.stderr
    # "::" is dual-stack: it covers IPv4 addresses too
    assert unitgen("check", str(c), str(d)).returncode == 2
    # different ports, or two distinct specific addresses, are fine
    assert unitgen("check", str(b), str(d)).returncode == 0


def test_the_shipped_examples_check_together():
    done = unitgen("check", *map(str, sorted((ROOT / "examples").glob("*.toml"))))
    # GPU examples need NVML or --gpus-from (exit 3); nothing else may be wrong
    assert done.returncode in (0, 3), done.stderr
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error: ")]
    assert all("cannot place GPUs here" in ln for ln in errors), errors


@pytest.mark.parametrize(("text", "key", "fragment"), [
    ('health = { timeout = "10000000000000000000000s" }', "health.timeout", "longer than 7d"),
    ('activation = "on-demand"\nidle_stop = "1ms"', "idle_stop", "shorter than 1s"),
    ('activation = "on-demand"\nidle_stop = "100000000d"', "idle_stop", "longer than 365d"),
    ('health = { timeout = "nan" }', "health.timeout", ""),
    ('port = "8000"', "port", "without quotes"),
    ('gpu_share = "true"', "gpu_share", "without quotes"),
    ('name = "ok\\n"', "name", "must be 1-48"),
    ('user = "nobody\\n"', "user", "not a valid user"),
    ('working_directory = "/tmp/../tmp"', "working_directory", "normalized"),
    ('secret_env = ["HF_TOKEN"]', "secret_env[0]", "not set in env"),
])
def test_values_systemd_would_reject_are_refused(text, key, fragment):
    base = 'name = "a"\nbackend = "vllm"\nmodel = "m"\n'
    if text.startswith("name"):
        base = 'backend = "vllm"\nmodel = "m"\n'
    with pytest.raises(Exception) as info:
        parse_spec(base + text + "\n", "x.toml")
    out = [str(p) for p in getattr(info.value, "problems", [])]
    assert any(p.startswith(f"x.toml: {key}: ") and fragment in p for p in out), out


def test_time_spans_follow_systemds_grammar():
    assert parse_timespan("1y") == 31557600
    assert parse_timespan("2 months") == 2 * 2629800
    assert parse_timespan("1M") == 2629800 and parse_timespan("1m") == 60
    assert parse_timespan("1w 2d 3h 4min 5s 6ms") == pytest.approx(
        604800 + 2 * 86400 + 3 * 3600 + 4 * 60 + 5 + 0.006)
    assert parse_timespan("1.5h") == 5400
    with pytest.raises(ValueError, match="unknown time unit"):
        parse_timespan("5 fortnights")


def test_a_bom_is_accepted_and_messages_escape_control_characters(tmp_path):
    spec = tmp_path / "bom.toml"
    spec.write_bytes(b'\xef\xbb\xbfname = "bom"\nbackend = "vllm"\nmodel = "m"\n')
    assert unitgen("check", str(spec)).returncode == 0
    bad = write_spec(tmp_path, "ctl", 'name = "a"\nbackend = "vllm"\nmodel = "m"\n'
                                      '"evil\\nkey\\u001b[31m" = 1\n')
    done = unitgen("check", str(bad))
    assert done.returncode == 2
    assert "\x1b" not in done.stderr and "evil\\nkey\\x1b[31m" in done.stderr


def test_booleans_are_shown_the_toml_way():
    with pytest.raises(Exception) as info:
        parse_spec('name = "a"\nbackend = "vllm"\nmodel = "m"\nargs = [true]\n', "x.toml")
    message = str(info.value)
    assert "(true)" in message and "True" not in message


def test_secret_env_values_go_to_the_secret_file_not_the_unit(tmp_path):
    spec = write_spec(tmp_path, "s", 'name = "s"\nbackend = "vllm"\nmodel = "m"\n'
                                     'secret_env = ["HF_TOKEN"]\n'
                                     'env = { HF_TOKEN = "hf_sekrit", HF_HOME = "/m" }\n')
    out = tmp_path / "out"
    done = unitgen("render", str(spec), "--out", str(out))
    assert done.returncode == 0, done.stderr
    units = "".join(p.read_text() for p in out.iterdir() if p.suffix != ".env")
    assert "hf_sekrit" not in units and "HF_HOME=/m" in units
    assert 'HF_TOKEN="hf_sekrit"' in (out / "s.env").read_text()
    assert (out / "s.env").stat().st_mode & 0o777 == 0o600


def test_render_out_never_overwrites_a_foreign_env_file(tmp_path):
    spec = write_spec(tmp_path, "k", 'name = "k"\nbackend = "vllm"\nmodel = "m"\n'
                                     'args = ["--api-key", "sk-1"]\n')
    out = tmp_path / "out"
    out.mkdir()
    (out / "k.env").write_text("MINE=1\n")
    done = unitgen("render", str(spec), "--out", str(out))
    assert done.returncode == 2 and "not generated by unitgen" in done.stderr
    assert (out / "k.env").read_text() == "MINE=1\n"


def test_default_ports_that_collide_are_not_an_overlap(tmp_path):
    """m7 and m16 hash to the same default port: check and render show it, deploy
    picks a free one for the second, so it is not refused."""
    a = write_spec(tmp_path, "m7", 'name = "m7"\nbackend = "vllm"\nmodel = "m"\n')
    b = write_spec(tmp_path, "m16", 'name = "m16"\nbackend = "vllm"\nmodel = "m"\n')
    done = unitgen("check", str(a), str(b))
    assert done.returncode == 0, done.stderr
    # but a fixed port equal to another spec's fixed port is
    c = write_spec(tmp_path, "c", 'name = "c"\nbackend = "vllm"\nmodel = "m"\nport = 31834\n')
    d = write_spec(tmp_path, "d", 'name = "d"\nbackend = "vllm"\nmodel = "m"\nport = 31834\n')
    assert unitgen("check", str(c), str(d)).returncode == 2
