"""Every refusal of the port rules, word for word: the file, the key (args,
command, env.NAME, host) and both values, like a compiler (house style). The
property test in test_ports.py checks the same shapes over generated args."""

from __future__ import annotations

import pytest

from unitgen.errors import SpecError
from unitgen.plan.instance import Instance, resolve
from unitgen.spec.backends import _TLS_WHY
from unitgen.spec.model import parse_spec
from unitgen.spec.ports import probe_host

CUSTOM_FIX = ("fixes the server's own listen address; use {host}/{port} or {unix} so it listens "
              "where the proxy forwards, and set the public port with port = ...")
ENDPOINT = ("is not allowed: the server's own endpoint belongs to unitgen (it listens privately "
            "and the socket owns the public port)")
HOST_ENDPOINT = ("is not allowed: the server's own endpoint belongs to unitgen (it listens on a "
                 "private socket; the public one is host/port)")


def resolved(text: str) -> Instance:
    return resolve(parse_spec(text, "p.toml"))


def refusals(text: str) -> list[str]:
    with pytest.raises(SpecError) as info:
        resolved(text)
    return [str(p) for p in info.value.problems]


def builtin(backend: str, extra: str) -> str:
    return f'name = "p"\nbackend = "{backend}"\nmodel = "m"\n{extra}\n'


@pytest.mark.parametrize(("text", "expected"), [
    ('name = "c"\nbackend = "custom"\ncommand = ["/x", "--port", "9000"]\n',
     [f"p.toml: command: --port 9000 {CUSTOM_FIX}",
      "p.toml: command: must say where the server listens: put {port} (and {host}) or {unix} "
      "in it, or set socket_activation = true"]),
    # every literal listen option is named, not only the first
    ('name = "c"\nbackend = "custom"\ncommand = ["/x", "--port={port}"]\n'
     'args = ["--host", "0.0.0.0", "--port", "7"]\n',
     [f"p.toml: args: --host 0.0.0.0 {CUSTOM_FIX}", f"p.toml: args: --port 7 {CUSTOM_FIX}"]),
    ('name = "c"\nbackend = "custom"\ncommand = ["/x", "--host={host}", "--host", "0.0.0.0", '
     '"--port={port}"]\n',
     [f"p.toml: command: --host 0.0.0.0 {CUSTOM_FIX}"]),
    (builtin("vllm", 'args = ["--ud", "/tmp/x.sock"]'), [f"p.toml: args: --ud /tmp/x.sock {ENDPOINT}"]),
    (builtin("vllm", 'args = ["--ssl-key", "k.pem"]'),
     [f"p.toml: args: --ssl-key k.pem is not supported: {_TLS_WHY}"]),
    (builtin("vllm", 'args = ["--port", "abc", "--port=xyz"]'),
     ["p.toml: args: --port abc: 'abc' is not a valid port",
      "p.toml: args: --port=xyz: 'xyz' is not a valid port"]),
    (builtin("vllm", 'args = ["--port", "65536"]'),
     ["p.toml: args: --port 65536: '65536' is not a valid port"]),
    (builtin("vllm", 'args = ["--port", "0"]'), ["p.toml: args: --port 0: '0' is not a valid port"]),
    (builtin("vllm", 'args = ["--host", "--port", "1"]'),
     ["p.toml: args: --host (without a value): the option needs a value; the host is set once, "
      "with host = ... in the spec"]),
    (builtin("llama-server", 'env = { LLAMA_ARG_HOST = "/tmp/x.sock" }'),
     [f"p.toml: env.LLAMA_ARG_HOST: LLAMA_ARG_HOST=/tmp/x.sock {HOST_ENDPOINT}"]),
    (builtin("llama-box", 'args = ["--host", "a.sock"]'),
     [f"p.toml: args: --host a.sock {HOST_ENDPOINT}"]),
    (builtin("llama-server", 'host = "0.0.0.0"\nenv = { LLAMA_ARG_HOST = "::" }'),
     ['p.toml: env.LLAMA_ARG_HOST: LLAMA_ARG_HOST=:: conflicts with host = "0.0.0.0"; the host '
      "is written once: remove one of them"]),
    (builtin("llama-server", 'env = { LLAMA_ARG_PORT = "1", LLAMA_ARG_HOST = "x" }'),
     ["p.toml: env.LLAMA_ARG_HOST: LLAMA_ARG_HOST=x: 'x' is not a valid host"]),
    (builtin("vllm", 'args = ["--port", "1", "--port=2"]'),
     ["p.toml: args: --port 1 and --port=2 disagree; set port = ... once in the spec"]),
])
def test_refusal_messages(text, expected):
    assert refusals(text) == expected


def test_a_name_for_host_is_refused_with_the_reason():
    (message,) = refusals(builtin("vllm", 'host = "localhost"'))
    assert message.startswith("p.toml: host: 'localhost' must be an IP address")


def test_port_bounds_and_host_spellings():
    inst = resolved(builtin("vllm", 'args = ["--host", "[::1]", "--port", "65535"]'))
    assert (inst.public.host, inst.public.port, inst.port_from_spec) == ("::1", 65535, True)
    inst = resolved(builtin("vllm", 'args = ["--host", "0:0:0:0:0:0:0:1", "--port=1"]'))
    assert (inst.public.host, inst.public.port) == ("::1", 1)  # the address, normalised
    assert resolved(builtin("vllm", "port = 1")).port_from_spec is True


def test_custom_command_options_are_not_abbreviated():
    # a custom program's parser is unknown: only exact option names count there
    inst = resolved('name = "c"\nbackend = "custom"\ncommand = ["/x", "--port={port}", "--po", "1"]\n')
    assert "--po" in inst.argv


@pytest.mark.parametrize(("host", "probe"), [
    ("0.0.0.0", "127.0.0.1"), ("::", "::1"), ("::1", "::1"), ("10.1.2.3", "10.1.2.3"),
    ("127.0.0.2", "127.0.0.2"),
])
def test_probe_host(host, probe):
    assert probe_host(host) == probe


def test_every_bare_option_is_named():
    assert refusals(builtin("vllm", 'args = ["--port", "--port"]')) == [
        "p.toml: args: --port (without a value): the option needs a value; the port is set once, "
        "with port = ... in the spec"] * 2


def test_a_host_path_is_an_endpoint_and_only_that():
    assert refusals(builtin("llama-server", 'args = ["--host", "/run/srv"]')) == [
        f"p.toml: args: --host /run/srv {HOST_ENDPOINT}"]


def test_host_options_take_argparse_prefixes_and_are_normalised():
    inst = resolved(builtin("vllm", 'args = ["--hos", "0.0.0.0"]'))
    assert inst.public.host == "0.0.0.0" and "--hos" not in inst.argv
    assert resolved(builtin("vllm", 'host = "0:0:0:0:0:0:0:1"')).public.host == "::1"


def test_notices_word_for_word():
    inst = resolved(builtin("vllm", 'port = 9000\nargs = ["--port", "9000"]'))
    assert inst.notices == ("args: --port 9000 repeats port = 9000; removed from the server's "
                            "options (the socket owns it)",)
    inst = resolved(builtin("vllm", 'args = ["--port=9001"]'))
    assert inst.notices == ("args: --port=9001 taken as the public port; the socket owns it and "
                            "the server listens on a private endpoint behind it",)
