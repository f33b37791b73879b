"""Hostile values reach the server byte for byte under a real systemd manager:
the stand-in server records its own argv and environment (issue 2)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import free_port, install, standin_exe, uninstall, write_spec
from unitgen.errors import SpecError
from unitgen.ops.systemd.sandbox import Sandbox

pytestmark = pytest.mark.systemd

HOSTILE = st.text(
    st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=24
) | st.sampled_from(['a b', '"q"', "'s'", "back\\slash\\", "100%n", "%t", "$HOME", "${X}",
                     "$$", "line\nnext", "[Service]\nExecStart=/bin/evil", ";", "\\", "ünï 漢字",
                     "-x", "tab\tx", "", " lead", "trail "])


def toml_str(value: str) -> str:
    out = []
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


@pytest.fixture(scope="module")
def stage(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    directory = tmp_path_factory.mktemp("quoting")
    yield directory
    uninstall(sandbox, "hostile")


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(model=HOSTILE, args=st.lists(HOSTILE, max_size=4), env=st.lists(HOSTILE, max_size=3))
def test_values_reach_the_server_byte_exact(sandbox, stage, model, args, env):
    exe = standin_exe(stage)
    record = stage / "record.json"
    record.unlink(missing_ok=True)
    port = free_port()
    env_toml = ", ".join(f"V{i} = {toml_str(v)}" for i, v in enumerate(env))
    text = (
        f'name = "hostile"\nbackend = "custom"\nport = {port}\nmodel = {toml_str(model)}\n'
        f'command = ["{exe}", "--host", "{{host}}", "--port", "{{port}}", "--model", "{{model}}"]\n'
        f"args = [{', '.join(toml_str(a) for a in args)}]\n"
        f'env = {{ STANDIN_RECORD = "{record}"{", " if env_toml else ""}{env_toml} }}\n'
        '[health]\ntimeout = "20s"\n'
    )
    spec = write_spec(stage, "hostile", text)
    try:
        install(sandbox, spec)
    except SpecError as exc:
        refused = exc.problems
    else:
        refused = []
    if refused:
        # Refusing is allowed, with a message that names the file and the key.
        assert all(p.file.endswith("hostile.toml") and p.key for p in refused)
        return
    # No value added a line, a section or a directive.
    backend = (sandbox.unit_dir / "hostile-backend.service").read_text()
    # split like systemd does (on \n, never on U+0085 or U+2028)
    lines = [ln for ln in backend.split("\n") if ln and not ln.startswith("#")]
    assert [ln for ln in lines if ln.startswith("[")] == ["[Unit]", "[Service]"]
    assert all(re.match(r"^(\[(Unit|Service)\]|[A-Za-z]+=.*)$", ln) for ln in lines)
    assert sum(ln.startswith("Environment=") for ln in lines) == len(env) + 1
    assert sum(ln.startswith("ExecStart=") for ln in lines) == 1
    done = sandbox.systemctl("restart", "hostile.socket", "hostile.service", timeout=60)
    assert done.returncode == 0, sandbox.journal("hostile-backend.service")
    recorded = json.loads(record.read_text(encoding="utf-8"))
    assert recorded["argv"][4:6] == ["--model", model]
    # args are a custom command's words too: "{{" and "}}" are its literal braces
    # (docs/spec.md, placeholders); a lone brace would have been refused above
    assert recorded["argv"][6:] == [re.sub(r"\{\{|\}\}", lambda m: m.group(0)[0], a)
                                    for a in args]
    for i, value in enumerate(env):
        assert recorded["env"][f"V{i}"] == value
