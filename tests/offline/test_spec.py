"""Spec parsing: every problem named with file and key, nothing accepted silently."""

from __future__ import annotations

import pytest

from unitgen.errors import SpecError
from unitgen.spec.model import DEFAULT_HEALTH_TIMEOUT, parse_spec


def problems(text: str) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(text, "x.toml")
    return [str(p) for p in info.value.problems]


def test_minimal_spec_defaults():
    spec = parse_spec('name = "a"\nbackend = "vllm"\nmodel = "m"\n', "a.toml")
    assert spec.activation == "eager"
    assert spec.health.timeout == DEFAULT_HEALTH_TIMEOUT
    assert spec.port is None and spec.host is None


def test_required_keys_are_named():
    assert problems("") == [
        "x.toml: name: is required (lowercase letters, digits and '-')",
        "x.toml: backend: is required: one of vllm, sglang, llama-server, llama-box, vox-box, custom",
    ]


def test_unknown_key_suggests_the_close_one():
    out = problems('name = "a"\nbackend = "vllm"\nmodel = "m"\nprot = 1\n')
    assert len(out) == 1 and out[0].startswith("x.toml: prot: unknown key (did you mean 'port'?)")


def test_every_problem_is_reported_at_once():
    out = problems('name = "Bad_Name"\nbackend = "vlm"\nport = 70000\nargs = "--x"\n')
    keys = [p.split(": ")[1] for p in out]
    assert keys == ["name", "backend", "port", "args"]
    assert "did you mean 'vllm'" in out[1]


def test_invalid_toml_names_the_file():
    out = problems('name = "a\n')
    assert out[0].startswith("x.toml: invalid TOML:")


@pytest.mark.parametrize(("text", "key", "fragment"), [
    ('idle_stop = "5min"', "idle_stop", 'needs activation = "on-demand"'),
    ('activation = "lazy"', "activation", "not one of eager, on-demand"),
    ('health = { timeout = "soon" }', "health.timeout", "not a time span"),
    ('health = { path = "health" }', "health.path", "must start with '/'"),
    ('args = ["a\\u0000b"]', "args[0]", "NUL"),
    # systemd takes a line with a noncharacter as not UTF-8 clean and drops it: an
    # ExecStart= gone made a unit that does not load, an Environment= gone a
    # server without its variable
    ('args = ["a\\uFFFEb"]', "args[0]", "U+FFFE, a Unicode noncharacter"),
    ('args = ["\\U0010FFFF"]', "args[0]", "U+10FFFF"),
    ('env = { X = "\\uFDD0" }', "env.X", "U+FDD0"),
    ('description = "m\\uFFFF"', "description", "U+FFFF"),
    ('systemd = { service = { Nice = "\\uFFFE" } }', "systemd.service.Nice", "U+FFFE"),
    ('env = { "1X" = "v" }', "env.1X", "not a valid environment variable name"),
    ('env = { X = true }', "env.X", "boolean"),
    ('executable = "-/bin/x"', "executable", "without leading"),
    ('executable = "bin/x"', "executable", "absolute path"),
    ('command = ["x"]', "command", "only for backend 'custom'"),
    ('working_directory = "rel"', "working_directory", "absolute path"),
    ('systemd = { service = { "bad key" = "1" } }', "systemd.service.bad key", "directive"),
    ('systemd = { service = { Nice = "1\\n[Service]" } }', "systemd.service.Nice", "one line"),
    ('gpus = "all"', "gpus", "count"),
    ('api_key_env = "K"', "api_key_env", "only for backend 'custom'"),
])
def test_bad_values_name_key_and_reason(text, key, fragment):
    out = problems(f'name = "a"\nbackend = "vllm"\nmodel = "m"\n{text}\n')
    assert any(p.startswith(f"x.toml: {key}: ") and fragment in p for p in out), out


def test_name_must_not_end_in_backend():
    out = problems('name = "x-backend"\nbackend = "vllm"\nmodel = "m"\n')
    assert "must not end in '-backend'" in out[0]


def test_custom_requires_command():
    out = problems('name = "a"\nbackend = "custom"\n')
    assert out[0].startswith("x.toml: command: is required for backend 'custom'")


def test_numbers_in_args_become_text():
    spec = parse_spec('name = "a"\nbackend = "vllm"\nmodel = "m"\nargs = ["--tp", 2]\n', "a")
    assert spec.args == ("--tp", "2")
