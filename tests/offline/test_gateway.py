"""The gateway's plan and HAProxy configuration, offline: routes grouped by
replica set, every file HAProxy names, ``haproxy -c`` accepting what is
rendered (a socket on fd 3 and fd 4, as the socket unit passes them), and
gateway specs refused with file and key."""

from __future__ import annotations

import shutil

import pytest

from tests.helpers import GOLDEN_CTX, write_spec
from unitgen.errors import SpecError
from unitgen.ops.systemd.gateways import validate
from unitgen.ops.systemd.specs import render_spec
from unitgen.plan.gateway import GatewayPlan, GatewaySettings, Member, routes
from unitgen.plan.instance import resolve
from unitgen.spec.model import load_spec
from unitgen.targets.haproxy.render import FILES, GatewayPaths, render_gateway

needs_haproxy = pytest.mark.skipif(shutil.which("haproxy") is None and
                                   not shutil.os.path.exists("/usr/sbin/haproxy"),  # type: ignore[attr-defined]
                                   reason="HAProxy is not installed (./setup installs it)")

MEMBERS = (Member("qa", "127.0.0.1:31001", ("qa", "qwen"), max_concurrent=2, wait=60),
           Member("qb", "127.0.0.1:31002", ("qb", "qwen"), wait=90),
           Member("ll", "[::1]:31003", ("meta-llama/Llama-3-8B",)))


def test_names_that_reach_the_same_instances_share_a_backend():
    found = {r.names: [m.instance for m in r.members] for r in routes(MEMBERS)}
    assert found == {("meta-llama/Llama-3-8B",): ["ll"], ("qa",): ["qa"], ("qb",): ["qb"],
                     ("qwen",): ["qa", "qb"]}
    both = routes([Member("x", "127.0.0.1:1", ("x", "alias"))])
    assert [r.names for r in both] == [("alias", "x")]  # one backend, one bound


def test_the_configuration_names_every_file_it_is_rendered_with():
    files = {f.name: f.text for f in render_gateway(
        GatewaySettings("gw", api_keys_file="/k", metrics="127.0.0.1:9"), routes(MEMBERS),
        GatewayPaths("/etc/unitgen/gateways/gw", "/run/unitgen-gw", "/k"))}
    cfg = files["haproxy.cfg"]
    for name in FILES.values():
        assert name in files and f"/etc/unitgen/gateways/gw/{name}" in cfg
    assert "bind fd@3" in cfg and "bind fd@4" in cfg and "balance leastconn" in cfg
    assert "server ll [::1]:31003" in cfg and "maxconn 2" in cfg
    assert "-f '/k'" in cfg  # the keys
    assert files["routes.map"].splitlines() == ["meta-llama/Llama-3-8B r1", "qa r2", "qb r3",
                                                "qwen r4"]
    assert files["429.http"].startswith("HTTP/1.1 429 ")


@needs_haproxy
def test_haproxy_accepts_what_is_rendered_and_its_refusal_is_a_spec_problem():
    validate("gw.toml", GatewayPlan(GatewaySettings("gw", metrics="127.0.0.1:9"), MEMBERS,
                                    ("127.0.0.1", 9)))
    bad = GatewayPlan(GatewaySettings("gw", api_keys_file="/nonexistent/keys"), MEMBERS)
    with pytest.raises(SpecError) as info:
        validate("gw.toml", bad)
    assert "gw.toml" in str(info.value) and "HAProxy refuses" in str(info.value)


def test_a_gateway_spec_is_checked_with_file_and_key(tmp_path):
    spec = write_spec(tmp_path, "g", 'kind = "gateway"\nname = "G!"\nport = 99999\n'
                                     'metrics = "nowhere"\nbogus = 1\n')
    with pytest.raises(SpecError) as info:
        render_spec(spec, GOLDEN_CTX)
    said = [(p.key, p.message) for p in info.value.problems]
    keys = {k for k, _ in said}
    assert {"name", "port", "metrics", "bogus"} <= keys, said
    assert all(p.file == str(spec) for p in info.value.problems)


def test_an_instance_alias_must_be_one_word(tmp_path):
    spec = write_spec(tmp_path, "a", 'name = "a"\nbackend = "vllm"\nmodel = "m"\n'
                                     'gateway = "gw"\naliases = ["two words"]\n')
    with pytest.raises(SpecError) as info:
        render_spec(spec, GOLDEN_CTX)
    assert any(p.key == "aliases[0]" for p in info.value.problems)


def _argv(tmp_path, backend: str, extra: str) -> tuple[str, ...]:
    path = write_spec(tmp_path, "q", f'name = "q"\nbackend = "{backend}"\n'
                                     f'model = "Qwen/Qwen2-7B"\n{extra}')
    return resolve(load_spec(path), port=8000, private_port=900).argv


def test_vllm_is_told_every_name_the_gateway_reaches_it_by(tmp_path):
    argv = _argv(tmp_path, "vllm", 'gateway = "gw"\naliases = ["qwen", "Qwen/Qwen2-7B"]\n')
    at = argv.index("--served-model-name")
    # its name first (what it reports), the aliases, its model's own name once
    assert argv[at + 1:] == ("q", "qwen", "Qwen/Qwen2-7B")
    argv = _argv(tmp_path, "vllm", 'gateway = "gw"\n')
    assert argv[argv.index("--served-model-name") + 1:] == ("q", "Qwen/Qwen2-7B")


@pytest.mark.parametrize("extra", [
    'aliases = ["qwen"]\n',  # joins no gateway: vLLM's default name is kept
    'gateway = "gw"\nargs = ["--served_model_name", "mine"]\n',  # vLLM reads _ as -
    'gateway = "gw"\nargs = ["--served-model-name=mine"]\n',
])
def test_served_names_are_left_alone_without_a_gateway_or_when_args_say_them(tmp_path, extra):
    argv = _argv(tmp_path, "vllm", extra)
    assert argv.count("--served-model-name") + argv.count("--served_model_name") <= 1
    assert "q" not in argv[argv.index("Qwen/Qwen2-7B") + 1:]


@pytest.mark.parametrize("backend", ["llama-server", "llama-box", "sglang", "vox-box"])
def test_servers_that_answer_any_name_get_none(tmp_path, backend):
    argv = _argv(tmp_path, backend, 'gateway = "gw"\naliases = ["qwen"]\n')
    assert not [w for w in argv if "served" in w], argv
