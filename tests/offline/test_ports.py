"""The port rules: every spelling caught; adopt when unambiguous, refuse conflicts;
in every rendered instance the probed port is the socket's and the server never
binds it."""

from __future__ import annotations

import re
import shlex

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import GOLDEN_CTX
from unitgen.errors import SpecError
from unitgen.plan.instance import resolve
from unitgen.spec.argscan import find_options
from unitgen.spec.model import parse_spec
from unitgen.spec.ports import DEFAULT_PORT_RANGE, default_port
from unitgen.targets.systemd.render import render_instance

BUILTIN = ("vllm", "sglang", "llama-server", "llama-box", "vox-box")


def spec_text(backend: str, extra: str = "") -> str:
    return f'name = "p"\nbackend = "{backend}"\nmodel = "m"\n{extra}\n'


def resolve_text(text: str):
    return resolve(parse_spec(text, "p.toml"))


def problems(text: str) -> list[str]:
    with pytest.raises(SpecError) as info:
        resolve_text(text)
    return [str(p) for p in info.value.problems]


@pytest.mark.parametrize("backend", BUILTIN)
@pytest.mark.parametrize("args", [
    '["--port", "9000"]', '["--port=9000"]', '["--dtype", "x", "--port", "9000", "--y"]',
])
def test_unambiguous_port_in_args_is_adopted(backend, args):
    inst = resolve_text(spec_text(backend, f"args = {args}"))
    assert inst.public.port == 9000
    assert "9000" not in inst.argv
    assert not any(a.startswith("--port=") for a in inst.argv)
    assert any("taken as the public port" in n for n in inst.notices)


@pytest.mark.parametrize("backend", ["vllm", "sglang", "vox-box"])
def test_argparse_abbreviations_are_caught(backend):
    inst = resolve_text(spec_text(backend, 'args = ["--por", "9000"]'))
    assert inst.public.port == 9000 and "--por" not in inst.argv


def test_vox_box_short_port():
    assert resolve_text(spec_text("vox-box", 'args = ["-p", "9000"]')).public.port == 9000


@pytest.mark.parametrize("backend", BUILTIN)
def test_conflict_names_both_values(backend):
    out = problems(spec_text(backend, 'port = 40001\nargs = ["--port", "9000"]'))
    assert out == ["p.toml: args: --port 9000 conflicts with port = 40001; the port is written "
                   "once: remove one of them"]


@pytest.mark.parametrize("backend", BUILTIN)
def test_bare_trailing_port_is_refused(backend):
    out = problems(spec_text(backend, 'args = ["--dtype", "x", "--port"]'))
    assert "--port (without a value): the option needs a value" in out[0]


def test_same_port_is_removed_with_a_notice():
    inst = resolve_text(spec_text("vllm", 'port = 9000\nargs = ["--port", "9000"]'))
    assert inst.public.port == 9000 and "--port" not in inst.argv
    assert "repeats port = 9000" in inst.notices[0]


def test_llama_env_port_and_host_are_caught():
    inst = resolve_text(spec_text("llama-server",
                                  'env = { LLAMA_ARG_PORT = "9100", LLAMA_ARG_HOST = "0.0.0.0" }'))
    assert (inst.public.host, inst.public.port) == ("0.0.0.0", 9100)
    assert dict(inst.env) == {}
    out = problems(spec_text("llama-server", 'port = 1\nenv = { LLAMA_ARG_PORT = "2" }'))
    assert "env.LLAMA_ARG_PORT: LLAMA_ARG_PORT=2 conflicts with port = 1" in out[0]


def test_two_values_in_args_and_env_disagree():
    out = problems(spec_text("llama-server",
                             'args = ["--port", "1"]\nenv = { LLAMA_ARG_PORT = "2" }'))
    assert "disagree" in out[0]


@pytest.mark.parametrize(("backend", "args"), [
    ("vllm", '["--uds", "/tmp/x.sock"]'),
    ("llama-server", '["--host", "/tmp/x.sock"]'),
    ("llama-box", '["--host", "x.sock"]'),
])
def test_private_endpoint_options_are_refused(backend, args):
    out = problems(spec_text(backend, f"args = {args}"))
    assert "belongs to unitgen" in out[0]


def test_host_conflict_and_bad_host():
    assert "conflicts with host" in problems(
        spec_text("vllm", 'host = "127.0.0.1"\nargs = ["--host", "0.0.0.0"]'))[0]
    assert "must be an IP address" in problems(spec_text("vllm", 'host = "localhost"'))[0]


def test_custom_literal_port_is_refused_placeholder_allowed():
    bad = 'name = "c"\nbackend = "custom"\ncommand = ["/x", "--port", "9000"]\n'
    assert "fixes the server's own listen address" in problems(bad)[0]
    good = 'name = "c"\nbackend = "custom"\ncommand = ["/x", "--port={port}"]\nport = 8000\n'
    inst = resolve_text(good)
    assert inst.private is not None and inst.argv[1] == f"--port={inst.private.port}"


def test_custom_without_listen_placeholder_is_refused():
    out = problems('name = "c"\nbackend = "custom"\ncommand = ["/x"]\n')
    assert "must say where the server listens" in out[0]


def test_default_port_is_stable_and_in_range():
    assert default_port("qwen") == default_port("qwen")
    assert DEFAULT_PORT_RANGE[0] <= default_port("qwen") <= DEFAULT_PORT_RANGE[1]
    inst = resolve_text(spec_text("vllm"))
    assert inst.public.port == default_port("p") and not inst.port_from_spec


def test_api_key_refused_where_it_would_land_in_argv():
    out = problems(spec_text("sglang", 'args = ["--api-key", "k"]'))
    assert "only on its command line" in out[0]


# --- the invariant, over generated argument lists -------------------------

PORT_SPELLINGS = st.sampled_from(["--port", "--port=", "--por"])
WORDS = st.sampled_from(["--dtype", "bfloat16", "--host", "0.0.0.0", "-p", "7", "--x=1", "9000"])


@st.composite
def arg_lists(draw):
    out: list[str] = []
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            spelling = draw(PORT_SPELLINGS)
            port = str(draw(st.sampled_from([8000, 9000, 0, 70000])))
            if spelling.endswith("="):
                out.append(spelling + port)
            elif draw(st.integers(0, 5)) == 0:
                out.append(spelling)  # bare
            else:
                out += [spelling, port]
        else:
            out.append(draw(WORDS))
    return out


def _directive(text: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(key + "=")]


def _occurrence(shown: str, args: list[str]) -> str:
    """The value of an occurrence a message quotes (``--por 9000`` or
    ``--port=9000``), after checking the user wrote exactly that."""
    if " " in shown:
        option, value = shown.split(" ", 1)
        assert any(args[i:i + 2] == [option, value] for i in range(len(args))), (shown, args)
        return value
    assert shown in args and "=" in shown, (shown, args)
    return shown.split("=", 1)[1]


def _is_port(value: str) -> bool:
    return value.isdigit() and 1 <= int(value) <= 65535


def _is_host(value: str) -> bool:
    import ipaddress  # noqa: PLC0415

    try:
        ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        return False
    return True


def assert_refusal_is_justified(message: str, args: list[str], port: int | None) -> None:
    """A refusal names the file and the key, quotes the option as written, names
    both values of a conflict, and is true of the spec it refuses."""
    prefix = "p.toml: args: "
    assert message.startswith(prefix), message
    text = message[len(prefix):]
    if m := re.fullmatch(r"(\S+) \(without a value\): the option needs a value; the (port|host) "
                         r"is set once, with \2 = \.\.\. in the spec", text):
        # the option is written last, or followed by another option
        bare = [i for i, word in enumerate(args) if word == m[1] and (
            i == len(args) - 1 or (args[i + 1].startswith("-") and not args[i + 1][1:].isdigit()))]
        assert bare, (message, args)
    elif m := re.fullmatch(r"(\S+(?: \S+)?): '(.*)' is not a valid (port|host)", text):
        value = _occurrence(m[1], args)
        assert value == m[2], (message, args)
        assert not (_is_port(value) if m[3] == "port" else _is_host(value)), message
    elif m := re.fullmatch(r"(.+) conflicts with port = (\d+); the port is written once: "
                           r"remove one of them", text):
        assert port is not None and int(m[2]) == port, (message, port)
        value = _occurrence(m[1], args)
        assert _is_port(value) and int(value) != port, (message, args)
    elif m := re.fullmatch(r"(.+) disagree; set port = \.\.\. once in the spec", text):
        assert port is None, message
        values = {int(_occurrence(shown, args)) for shown in m[1].split(" and ")}
        assert len(values) > 1, (message, args)
    else:
        raise AssertionError(f"a refusal of an unexpected kind: {message!r} for {args}")


@settings(max_examples=300, deadline=None)
@given(backend=st.sampled_from(BUILTIN), args=arg_lists(),
       port=st.one_of(st.none(), st.sampled_from([8000, 9000])))
def test_probed_port_is_the_socket_port_and_never_the_servers(backend, args, port):
    import json  # noqa: PLC0415

    extra = f"args = {json.dumps(args)}\n" + (f"port = {port}\n" if port else "")
    refused: list[str] | None
    try:
        inst = resolve_text(spec_text(backend, extra))
    except SpecError as exc:
        refused = [str(p) for p in exc.problems]
    else:
        refused = None
    if refused is not None:
        # a refusal is allowed, but it must be right and say why, like a compiler
        assert refused
        for message in refused:
            assert_refusal_is_justified(message, args, port)
        return
    files = {f.name: f.text for f in render_instance(inst, GOLDEN_CTX)}
    listen = _directive(files["p.socket"], "ListenStream")
    assert len(listen) == 1
    socket_port = int(listen[0].rsplit(":", 1)[1])
    probe = _directive(files["p.service"], "ExecStartPost")[0]
    assert re.search(rf"--target \S+:{socket_port}\b", probe)
    server = shlex.split(_directive(files["p-backend.service"], "ExecStart")[0])
    if "unitgen.inunit.confine" in server:
        # confined to its own privileged port: the one it is told to listen on
        cut = server.index("--")
        assert inst.private is not None and inst.private.kind == "tcp"
        assert server[server.index("--bind-port") + 1] == str(inst.private.port)
        server = server[cut + 1:]
    # the server is told exactly one listen address, the private one
    b = inst.backend
    ports = find_options(tuple(server), b.port_flags, b.syntax)
    hosts = find_options(tuple(server), b.host_flags + b.endpoint_flags, b.syntax)
    assert inst.private is not None
    if inst.private.kind == "tcp":
        assert [f.value for f in ports] == [str(inst.private.port)]
        assert [f.value for f in hosts] == ["127.0.0.1"]
    else:
        assert ports == []
        assert [f.value for f in hosts] == ["%t/unitgen-p/http.sock"]
