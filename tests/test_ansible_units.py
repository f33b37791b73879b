"""The pure parts of the Ansible modules (ansible/roles/unitgen/module_utils):
the TOML writer that turns a spec mapping into the host's spec file, and the
helpers that read unitgen's command-line output. Loaded from their files, as
Ansible ships them to a host."""

from __future__ import annotations

import ast
import importlib.util
import math
import re
import sys
import tomllib
from datetime import date
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]
from hypothesis import given
from hypothesis import strategies as st

from unitgen.spec.model import parse_spec

pytestmark = pytest.mark.ansible

UTILS = Path(__file__).resolve().parent.parent / "ansible" / "roles" / "unitgen" / "module_utils"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_ansible_{name}", UTILS / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


toml = _load("unitgen_toml")
cli = _load("unitgen_cli")

HOSTILE = [
    "", " ", '"', '""', '"""', "'", "'''", "\\", "\\\\", "\\n", "a\nb", "a\r\nb", "\r", "\t",
    "\x00", "\x01", "\x1f", "\x7f", "\x80", "\u2028", "\ufeff", "é", "😀", "%i %% $HOME $$",
    "{port} {{ }}", 'a = 1\n[b]\nc = "d"', "# not a comment", "key = value", "]", "[",
    "trailing \\", "\U0010ffff",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_strings_round_trip_as_values_and_keys(text):
    doc = {"s": text, "l": [text, text], "t": {text: text}, text: 1}
    assert tomllib.loads(toml.dumps(doc)) == doc


text_st = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=12)
scalars = st.one_of(text_st, st.integers(-(2**63), 2**63 - 1), st.booleans(),
                    st.floats(allow_nan=False))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(text_st, inner, max_size=4)),
    max_leaves=16,
)


@given(st.dictionaries(text_st, values, max_size=6))
def test_any_mapping_round_trips_through_tomllib(doc):
    assert tomllib.loads(toml.dumps(doc)) == doc


def test_floats_keep_their_kind():
    doc = {"a": 1.0, "b": 1e16, "c": -0.0, "d": 5e-324, "e": math.inf, "f": -math.inf, "i": 1}
    back = tomllib.loads(toml.dumps(doc))
    assert back == doc and isinstance(back["a"], float) and isinstance(back["i"], int)
    assert math.isnan(tomllib.loads(toml.dumps({"n": math.nan}))["n"])


def test_tables_come_after_plain_keys_and_nest():
    doc = {"health": {"path": "/health", "timeout": "20min"}, "name": "q",
           "systemd": {"service": {"Nice": "5"}, "unit": {"Description": "x"}},
           "empty": {}, "deep": {"a": {"b": {}}}}
    text = toml.dumps(doc)
    assert text.index('name = "q"') < text.index("[health]")
    assert "[systemd.service]" in text and "[systemd]" not in text
    assert tomllib.loads(text) == doc


def test_null_means_absent_in_tables_and_is_refused_in_lists():
    assert tomllib.loads(toml.dumps({"a": None, "b": 1, "t": {"c": None}})) == {"b": 1, "t": {}}
    with pytest.raises(toml.TomlWriteError, match=r"^args\[1\]: TOML has no null"):
        toml.dumps({"args": ["x", None]})


@pytest.mark.parametrize(("doc", "words"), [
    ({"env": {"A": "\ud800"}}, "env.A: contains an unpaired surrogate"),
    ({"port": 2**63}, "port: 9223372036854775808 does not fit"),
    ({"when": date(2024, 1, 1)}, "when: cannot write a date"),
    ({"t": {1: "x"}}, "t.1: keys must be strings"),
])
def test_what_toml_cannot_hold_is_refused_with_its_key(doc: dict[str, Any], words):
    with pytest.raises(toml.TomlWriteError) as err:
        toml.dumps(doc)
    assert str(err.value).startswith(words)


def test_a_full_spec_reads_back_as_unitgen_reads_it():
    spec = {
        "name": "qwen2", "backend": "vllm", "model": "Qwen/Qwen2-7B-Instruct",
        "host": "0.0.0.0", "port": 8000, "gpus": [0, 1],
        "args": ["--dtype", "bfloat16", "--max-model-len", 8192],
        "env": {"HF_HOME": "/var/lib/models/hf", "NOTE": '100% "ready" for $USER\n'},
        "health": {"timeout": "20min"},
        "systemd": {"service": {"Nice": "5", "MemoryMax": "64G"}},
    }
    parsed = parse_spec(toml.dumps(spec), "qwen2.toml")
    assert (parsed.name, parsed.backend, parsed.port, parsed.gpus) == ("qwen2", "vllm", 8000, (0, 1))
    assert parsed.args == ("--dtype", "bfloat16", "--max-model-len", "8192")
    assert dict(parsed.env)["NOTE"] == '100% "ready" for $USER\n'
    assert parsed.health.timeout == 1200
    assert dict(parsed.systemd_service) == {"Nice": "5", "MemoryMax": "64G"}


@pytest.mark.parametrize(("stderr", "message"), [
    ("error: /etc/unitgen/specs/q.toml: port: 70000 is out of range 1..65535\n",
     "/etc/unitgen/specs/q.toml: port: 70000 is out of range 1..65535"),
    ("notice: x\nerror: a.toml: prot: unknown key\nerror: a.toml: name: is required\n",
     "a.toml: prot: unknown key\na.toml: name: is required"),
    ("Usage: unitgen deploy [OPTIONS] SPECS...\nTry 'unitgen deploy -h' for help.\n\n"
     "Error: No such option: --target\n", "No such option: --target"),
    ('Traceback (most recent call last):\n  File "x", line 1, in <module>\n'
     "ModuleNotFoundError: No module named 'unitgen'\n",
     "ModuleNotFoundError: No module named 'unitgen'"),
    ("", "unitgen failed and printed nothing"),
])
def test_error_message_is_unitgens_own_words(stderr, message):
    assert cli.error_message(stderr) == message


def test_argv_passes_target_only_when_not_systemd():
    assert cli.argv_for("/u", "deploy", scope="system", target="systemd") == ["/u", "deploy", "--json"]
    assert cli.argv_for("/u", "ls", scope="user", target="supervisor") == \
        ["/u", "ls", "--user", "--target", "supervisor", "--json"]


@pytest.mark.parametrize(("address", "parts"), [
    ("127.0.0.1:31005", ("127.0.0.1", 31005)), ("[::]:8000", ("::", 8000)),
    ("0.0.0.0:80", ("0.0.0.0", 80)), ("nonsense", ("nonsense", None)),
])
def test_address_parts(address, parts):
    assert cli.address_parts(address) == parts


def test_parse_json_accepts_objects_only():
    assert cli.parse_json('{"changed": false}\n') == {"changed": False}
    assert cli.parse_json("") is None and cli.parse_json("[1]") is None and cli.parse_json("x") is None


ROLE = UTILS.parent


def _module_constants(path: Path) -> dict[str, Any]:
    """DOCUMENTATION and ARGUMENT_SPEC of a module file, read without importing it."""
    found: dict[str, Any] = {}
    for node in ast.parse(path.read_text()).body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if isinstance(target, ast.Name) and target.id in ("DOCUMENTATION", "ARGUMENT_SPEC"):
            found[target.id] = ast.literal_eval(node.value)  # type: ignore[attr-defined]
    return found


@pytest.mark.parametrize("module", ["unitgen_instance", "unitgen_status"])
def test_module_documentation_matches_its_argument_spec(module):
    consts = _module_constants(ROLE / "library" / f"{module}.py")
    documented = yaml.safe_load(consts["DOCUMENTATION"])["options"]
    spec = consts["ARGUMENT_SPEC"]
    assert set(documented) == set(spec)
    for name, arg in spec.items():
        doc = documented[name]
        for key in ("type", "default", "choices", "elements"):
            assert doc.get(key) == arg.get(key), (module, name, key)


def test_role_variables_are_declared_defaulted_and_documented():
    specs = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())
    options = specs["argument_specs"]["main"]["options"]
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    assert set(options) == set(defaults)
    for name, option in options.items():
        if "default" in option:
            assert option["default"] == defaults[name], name
        else:  # computed from facts in defaults/main.yml
            assert "{{" in str(defaults[name]), name
    readme = (ROLE / "README.md").read_text()
    table = set(re.findall(r"^\| `(unitgen_\w+)` \|", readme, re.M))
    assert table == set(options)
