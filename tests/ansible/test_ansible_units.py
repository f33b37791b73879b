"""The pure parts of the Ansible modules (ansible/plugins/module_utils):
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
from ansible.module_utils.common.parameters import (  # type: ignore[import-untyped]
    _return_datastructure_name,
)
from hypothesis import given
from hypothesis import strategies as st

from unitgen.spec.model import parse_spec

pytestmark = pytest.mark.ansible

UTILS = Path(__file__).resolve().parents[2] / "ansible" / "plugins" / "module_utils"
MODULES = UTILS.parent / "modules"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_ansible_{name}", UTILS / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


toml = _load("unitgen_toml")
cli = _load("unitgen_cli")
sec = _load("unitgen_secrets")

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


HEADER = "# Written by the unitgen_instance Ansible module\n# second line\n"


@given(st.dictionaries(text_st, values, max_size=6))
def test_own_reader_reads_back_what_the_writer_wrote(doc):
    """Hosts whose Python has no tomllib (before 3.11) read the previous spec
    file with the writer's own reader."""
    assert toml._loads_own(HEADER + toml.dumps(doc)) == doc
    assert toml.loads(HEADER + toml.dumps(doc)) == doc


@pytest.mark.parametrize("text", [
    'name = "x"\nenv = { HF_TOKEN = "hf_1" }\n',  # an inline table the writer never writes
    "name = 'x'\n",  # a literal string
    'name = "x"  # a comment\n',
    'name = "x"\n\n\n[health]\ntimeout = "1m"\n',  # not the writer's spacing
    'args = [\n  "--api-key",\n  "sk",\n]\n',
])
def test_own_reader_refuses_what_the_writer_would_not_write(text):
    assert tomllib.loads(text)  # valid TOML, which tomllib reads
    assert toml.loads(text) == tomllib.loads(text)
    assert toml._loads_own(text) is None


@pytest.mark.parametrize("text", ['name = "x', "= 1\n", "[env\n", 'a = "\\q"\n'])
def test_a_file_that_is_not_toml_reads_as_none(text):
    assert toml.loads(text) is None and toml._loads_own(text) is None


def _found(spec: dict[str, Any]) -> dict[str, str]:
    return {label: value for label, _, _, value in sec.secrets(spec)}


@pytest.mark.parametrize(("spec", "found"), [
    ({"backend": "vllm", "env": {"VLLM_API_KEY": "sk-1", "HF_HOME": "/m"}},
     {"env.VLLM_API_KEY": "sk-1"}),
    ({"backend": "llama-server", "env": {"LLAMA_API_KEY": "k2"}}, {"env.LLAMA_API_KEY": "k2"}),
    # what unitgen is told: api_key_env and secret_env, whatever the names
    ({"backend": "custom", "api_key_env": "SERVE_AUTH", "env": {"SERVE_AUTH": "a"}},
     {"env.SERVE_AUTH": "a"}),
    ({"secret_env": ["MODEL_REPO"], "env": {"MODEL_REPO": "org/private"}},
     {"env.MODEL_REPO": "org/private"}),
    # what looks like a secret, declared or not
    ({"env": {"HF_TOKEN": "hf_x", "HUGGING_FACE_HUB_TOKEN": "hf_y", "OPENAI_API_KEY": "sk",
              "DB_PASSWORD": "pw", "AWS_SECRET_ACCESS_KEY": "aws"}},
     {"env.HF_TOKEN": "hf_x", "env.HUGGING_FACE_HUB_TOKEN": "hf_y", "env.OPENAI_API_KEY": "sk",
      "env.DB_PASSWORD": "pw", "env.AWS_SECRET_ACCESS_KEY": "aws"}),
    # where a secret is, what cannot be one, what only contains the letters
    ({"env": {"HF_TOKEN_PATH": "/etc/hf", "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
              "TOKENIZERS_PARALLELISM": "false", "AWS_ACCESS_KEY_ID": "AKIA", "HF_HOME": "/m"}},
     {}),
    ({"env": {"HF_TOKEN": "", "API_KEY": None, "PASSWORD": True}}, {}),
    ({"args": ["--dtype", "bfloat16", "--api-key", "sk-a", "--max-model-len", "8192"]},
     {"args --api-key": "sk-a"}),
    ({"args": ["--api-key=sk-b"]}, {"args --api-key": "sk-b"}),
    ({"args": ["--api_key", "sk-c"]}, {"args --api-key": "sk-c"}),
    ({"args": ["--api-k", "sk-d"]}, {"args --api-k": "sk-d"}),  # argparse reads a prefix
    ({"args": ["--api-key", "-starts-with-dash"]}, {"args --api-key": "-starts-with-dash"}),
    ({"args": ["--api-key", 12345]}, {"args --api-key": "12345"}),
    ({"args": ["--hf-token", "hf_z", "--admin-api-key", "adm"]},
     {"args --hf-token": "hf_z", "args --admin-api-key": "adm"}),
    ({"args": ["--api-key", "one", "--api-key", "two"]},
     {"args --api-key": "one", "args --api-key #2": "two"}),
    ({"command": ["/srv/bin/serve", "--token", "t0k", "--port", "{port}"]},
     {"command --token": "t0k"}),
    # not a key: a file option, a missing value, after the end of options
    ({"args": ["--api-key-file", "/etc/k", "--ssl-keyfile", "/etc/tls.key", "--max-tokens", "9",
               "--api-key", "--port", "1", "--", "--api-key", "x"]}, {}),
    ({"args": ["--api-key"]}, {}),
    ({"args": "--api-key sk"}, {}),
])
def test_which_values_of_a_spec_are_secrets(spec, found):
    assert _found(spec) == found


def test_names_that_look_like_secrets():
    for name in ("HF_TOKEN", "--hf-token", "api-key", "KEY", "SECRET", "github_pat_token",
                 "SSL_KEYFILE_PASSWORD", "CREDENTIALS"):
        assert sec.looks_secret(name), name
    for name in ("HF_HOME", "TOKENIZERS_PARALLELISM", "MAX_TOKENS", "--ssl-keyfile",
                 "--api-key-file", "HF_TOKEN_PATH", "KEY_DIR", "MONKEY", ""):
        assert not sec.looks_secret(name), name


def test_undeclared_secrets_are_those_unitgen_would_put_in_the_unit():
    spec = {"backend": "vllm", "secret_env": ["HF_TOKEN"],
            "env": {"VLLM_API_KEY": "k", "HF_TOKEN": "h", "WANDB_API_KEY": "w", "HF_HOME": "/m"}}
    assert sec.undeclared(spec) == ["WANDB_API_KEY"]
    assert sec.undeclared(None) == []


SPEC: dict[str, Any] = {
    "name": "qwen2", "backend": "vllm", "model": "Qwen/Qwen2-7B-Instruct",
    "args": ["--api-key=sk-old-key", "--dtype", "bfloat16", "--hf-token", "hf_old"],
    "env": {"HF_HOME": "/m", "WANDB_API_KEY": "w-old"},
    "health": {"timeout": "20min"},
}


def test_redacted_replaces_exactly_the_secrets_and_copies():
    spec = {**SPEC, "args": list(SPEC["args"]), "env": dict(SPEC["env"])}
    shown = sec.redacted(spec, sec.secrets(spec))
    assert shown == {**SPEC, "args": ["--api-key=<redacted>", "--dtype", "bfloat16",
                                      "--hf-token", "<redacted>"],
                     "env": {"HF_HOME": "/m", "WANDB_API_KEY": "<redacted>"}}
    assert spec == SPEC  # the input is left alone


def test_redacted_says_which_secrets_changed():
    old = sec.secrets(SPEC)
    new_spec = {**SPEC, "args": ["--dtype", "bfloat16", "--api-key=sk-new-key",
                                 "--hf-token", "hf_old"],
                "env": {"HF_HOME": "/m", "WANDB_API_KEY": "w-old", "HF_TOKEN": "hf_added"}}
    shown = sec.redacted(new_spec, sec.secrets(new_spec), old)
    # moved within args but the same value: unchanged; a new one counts as changed
    assert shown["args"] == ["--dtype", "bfloat16", "--api-key=<redacted: changed>",
                             "--hf-token", "<redacted>"]
    assert shown["env"] == {"HF_HOME": "/m", "WANDB_API_KEY": "<redacted>",
                            "HF_TOKEN": "<redacted: changed>"}
    text = toml.dumps(shown)
    for _, _, _, value in [*old, *sec.secrets(new_spec)]:
        assert value not in text


def test_redacted_spec_file_diff_hides_secrets_but_shows_their_lines_changed():
    old_text = toml.dumps(SPEC)
    new = {**SPEC, "env": {"HF_HOME": "/m", "WANDB_API_KEY": "w-new"}}
    before = toml.dumps(sec.redacted(toml.loads(old_text), sec.secrets(toml.loads(old_text))))
    after = toml.dumps(sec.redacted(new, sec.secrets(new), sec.secrets(SPEC)))
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines(), strict=True) if a != b]
    assert changed == [('WANDB_API_KEY = "<redacted>"', 'WANDB_API_KEY = "<redacted: changed>"')]


@given(st.dictionaries(text_st, values, max_size=6))
def test_spec_strings_are_what_ansible_masks_for_a_no_log_option(doc):
    """The module takes back out of no_log_values exactly what Ansible put there
    for its no_log spec option (then adds the secrets)."""
    assert set(sec.spec_strings(doc)) == set(_return_datastructure_name(doc))


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


ROLE = UTILS.parents[1] / "roles" / "unitgen"


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
    consts = _module_constants(MODULES / f"{module}.py")
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


def test_the_modules_offer_exactly_unitgens_targets():
    # the modules travel to hosts without unitgen: they carry the list, and it
    # must be the registry's (the CLI's --target choices come from the same)
    from unitgen.ops.registry import names  # noqa: PLC0415

    assert tuple(cli.TARGETS) == names()
    role = Path(__file__).resolve().parents[2] / "ansible" / "roles" / "unitgen"
    specs = yaml.safe_load((role / "meta" / "argument_specs.yml").read_text())
    options = specs["argument_specs"]["main"]["options"]
    assert tuple(options["unitgen_target"]["choices"]) == names()
    for module in ("unitgen_instance", "unitgen_status"):
        text = (MODULES / f"{module}.py").read_text()
        found = re.search(r'DOCUMENTATION = r"""(.*?)"""', text, re.S)
        assert found, module
        doc = yaml.safe_load(found.group(1))
        assert tuple(doc["options"]["target"]["choices"]) == names(), module
        assert f'"choices": {list(names())!r}'.replace("'", '"') in text, module
