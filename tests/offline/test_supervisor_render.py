"""The supervisor target's conf files: what supervisord cannot do is refused
with file and key; what it can do reads back, through supervisor's own parser,
as exactly the argv and environment the plan resolved."""

from __future__ import annotations

import ast
import tempfile
from pathlib import Path

import jinja2
import jinja2.nodes
import pytest

from tests.helpers import write_spec
from tests.nvml import eight_gpus, fake_nvml, uuid
from tests.supervisor_readback import read_back
from unitgen.errors import SpecError
from unitgen.inunit.envfile import env_digest, parse_env_text
from unitgen.ops.files import is_ours
from unitgen.ops.pipeline import placement_for
from unitgen.plan.instance import RUNTIME_DIR, resolve
from unitgen.plan.record import parse_record
from unitgen.spec.model import load_spec
from unitgen.targets.base import templates_dir
from unitgen.targets.supervisor import escape
from unitgen.targets.supervisor.render import (
    SupervisorContext,
    make_environment,
    render_instance,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CTX = SupervisorContext(python="/usr/bin/python3", proxyd="/usr/lib/systemd/systemd-socket-proxyd",
                        run_dir="/run/unitgen", log_dir=tempfile.gettempdir(),  # supervisor checks it exists
                        secrets_dir="/etc/unitgen/secrets")
__all__ = ["fake_nvml"]  # the fixture, re-exported for pytest
SUPPORTED = ["qwen2-vllm", "custom-socket-activated", "custom-tcp", "demo", "llama-box",
             "llama-server-1gpu", "vllm-2gpu"]


def _render(path: Path):
    inst = resolve(load_spec(path))
    return inst, render_instance(inst, CTX)


def _env_file(files) -> dict[str, str]:
    """What the wrapper reads from the instance's env file ({} without one)."""
    [env] = [f for f in files if f.secret] or [None]
    return {} if env is None else parse_env_text(env.text)


@pytest.mark.parametrize("example", SUPPORTED)
def test_examples_read_back_as_resolved(example):
    inst, files = _render(EXAMPLES / f"{example}.toml")
    conf = files[0]
    assert conf.name == f"unitgen-{inst.name}.conf"
    programs = {p.group: p for p in read_back(conf.text)}
    assert set(programs) == {inst.name, f"{inst.name}-backend"}
    server = programs[f"{inst.name}-backend"]
    argv = server.argv[server.argv.index("--") + 1:] if "--" in server.argv else server.argv
    assert argv == [w.replace(RUNTIME_DIR, "/run/unitgen") for w in inst.argv]
    assert server.environment == {}  # never environment=: the env file has it all
    assert _env_file(files) == {**dict(inst.env), **dict(inst.secrets)}
    if inst.env or inst.secrets:
        assert server.argv[server.argv.index("--env-file") + 1] == f"/etc/unitgen/secrets/{inst.name}.env"
        # the digest the wrapper checks is the one of the file's plain variables
        assert server.argv[server.argv.index("--env-digest") + 1] == env_digest(list(inst.env))
    public = programs[inst.name]
    assert public.fcgi_socket == f"tcp://{inst.public.listen()}"
    if inst.uses_proxy:
        assert public.argv[-1] == inst.private.listen().replace(RUNTIME_DIR, "/run/unitgen")
        assert public.argv[-3].endswith("systemd-socket-proxyd")
    else:
        hold = public.argv[public.argv.index("--serve") + 1]
        assert server.argv[server.argv.index("--fd3-from") + 1] == hold


def test_marker_makes_files_ours(tmp_path):
    inst, files = _render(EXAMPLES / "demo.toml")
    path = tmp_path / files[0].name
    path.write_text(files[0].text)
    assert is_ours(path, inst.name)
    assert not is_ours(path, "other")


@pytest.mark.parametrize(("extra", "key", "words"), [
    ('activation = "on-demand"\n', "activation", "first connection"),
    ('activation = "on-demand"\nidle_stop = "5min"\n', "idle_stop", "when idle"),
    ('[systemd.service]\nNice = "5"\n', "systemd.service.Nice", "systemd directive"),
    ('group = "video"\n', "group", "no group setting"),
    ('host = "::1"\n', "host", "IPv4 only"),
])
def test_refused_with_file_and_key(tmp_path, extra, key, words):
    text = 'name = "x"\nbackend = "vllm"\nmodel = "m"\nport = 8000\n' + extra
    spec = write_spec(tmp_path, "x", text)
    with pytest.raises(SpecError) as err:
        _render(spec)
    hits = [p for p in err.value.problems if p.key == key]
    assert hits, err.value.problems
    assert hits[0].file == str(spec) and words in hits[0].message


# What supervisord's environment= cannot carry (each was refused before the env file)
HARD_ENV = {"A": "#hash", "B": "a ;b", "C": "%(here)s", "D": 'p"q', "E": '"quoted"',
            "F": "it's \"x\"", "G": "two\nlines\r\n", "H": "back\\n\\", "I": " = spaced= ",
            "J": "ünï 漢字", "K": "", "L": "\n[program:evil]\ncommand=/bin/sh", "M": "%(ENV_HOME)s",
            "N": "\u2028;\x85#", "O": "$HOME `id`"}


def _toml(value: str) -> str:
    return '"' + "".join(f"\\u{ord(c):04x}" if ord(c) < 0x20 or c in '"\\' else c
                         for c in value) + '"'


def test_env_values_environment_cannot_carry_reach_the_env_file_exactly(tmp_path):
    env = ", ".join(f"{k} = {_toml(v)}" for k, v in HARD_ENV.items())
    spec = write_spec(tmp_path, "x", f'name = "x"\nbackend = "vllm"\nmodel = "m"\nenv = {{ {env} }}\n')
    inst, files = _render(spec)
    assert dict(inst.env) == HARD_ENV
    conf, env_file = files
    assert env_file.secret and env_file.name == "x.env"
    assert _env_file(files) == HARD_ENV
    programs = {p.group: p for p in read_back(conf.text)}
    assert set(programs) == {"x", "x-backend"}  # nothing in a value made a section
    assert programs["x-backend"].environment == {}
    assert "\nenvironment=" not in conf.text


def test_plain_env_is_listed_in_the_conf_file_secrets_by_name_only(tmp_path):
    spec = write_spec(tmp_path, "x", 'name = "x"\nbackend = "vllm"\nmodel = "m"\n'
                                     'args = ["--api-key", "sk-secret-123"]\n'
                                     'env = { HF_HOME = "/m", NOTE = "two\\nlines" }\n')
    _, (conf, _) = _render(spec)
    assert "#   HF_HOME='/m'\n" in conf.text
    assert "#   NOTE='two\\nlines'\n" in conf.text  # shown escaped: one comment line
    assert "#   VLLM_API_KEY: a secret, not shown\n" in conf.text
    assert "sk-secret-123" not in conf.text


def test_an_argv_word_a_conf_file_cannot_carry_names_the_key(tmp_path):
    spec = write_spec(tmp_path, "x", 'name = "x"\nbackend = "vllm"\nmodel = "m"\n'
                                     'args = ["--x", "two\\nlines"]\nenv = { OK = "a\\nb" }\n')
    with pytest.raises(SpecError) as err:
        _render(spec)
    assert [(p.key, "line break" in p.message) for p in err.value.problems] == [("args", True)]


def test_api_key_stays_out_of_the_conf_file(tmp_path):
    spec = write_spec(tmp_path, "x", 'name = "x"\nbackend = "vllm"\nmodel = "m"\n'
                                     'args = ["--api-key", "sk-secret-123"]\n')
    _, files = _render(spec)
    conf, secret = files
    assert "sk-secret-123" not in conf.text
    assert secret.secret and _env_file(files) == {"VLLM_API_KEY": "sk-secret-123"}
    programs = {p.group: p for p in read_back(conf.text)}
    assert "--env-file" in programs["x-backend"].argv
    assert "sk-secret-123" not in " ".join(programs["x-backend"].argv)
    assert programs["x"].argv[programs["x"].argv.index("--key-env") + 1] == "VLLM_API_KEY"


def test_gpu_pinning_as_systemd(fake_nvml):
    """The placement's CUDA_VISIBLE_DEVICES (UUIDs) and defaults reach the server."""
    fake_nvml(eight_gpus())
    spec = load_spec(EXAMPLES / "vllm-2gpu.toml")
    placement = placement_for(spec)
    assert placement is not None
    inst = resolve(spec, placement=placement)
    files = render_instance(inst, CTX)
    [server] = [p for p in read_back(files[0].text) if p.group.endswith("-backend")]
    uuids = ",".join(placement.uuids)
    assert uuids == f"{uuid(0)},{uuid(1)}"
    assert _env_file(files)["CUDA_VISIBLE_DEVICES"] == uuids
    assert _env_file(files)["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    at = server.argv.index("--tensor-parallel-size")
    assert server.argv[at:at + 2] == ["--tensor-parallel-size", "2"]
    record = parse_record(render_instance(inst, CTX)[0].text)
    assert record is not None
    assert (record.gpus, record.gpu_share) == (tuple(placement.uuids), False)


# The escaping discipline: a value reaches a file only through a filter.

def test_a_bare_value_in_a_template_is_refused():
    env = make_environment()
    with pytest.raises(TypeError, match="without an escaping filter"):
        env.from_string("command={{ x }}\n").render(x="/bin/sh -c evil")
    with pytest.raises(TypeError, match="without an escaping filter"):
        env.from_string("{{ flag }}").render(flag=True)  # a bool is no number
    assert env.from_string("a={{ x | word }} b={{ n }}").render(x="w", n=3) == "a=w b=3"


def test_a_filter_refuses_at_render_time():
    env = make_environment()
    with pytest.raises(escape.UnrepresentableError):
        env.from_string("socket=tcp://{{ x | word }}").render(x="1.2.3.4:80 ;x")
    with pytest.raises(escape.UnrepresentableError):
        env.from_string("# {{ x | comment }}").render(x="a\r[program:evil]")


def _outputs(node: jinja2.nodes.Node):
    for out in node.find_all(jinja2.nodes.Output):
        yield from (n for n in out.nodes if not isinstance(n, jinja2.nodes.TemplateData))


@pytest.mark.parametrize("template", sorted(p.name for p in (templates_dir() / "supervisor").iterdir()))
def test_every_template_output_goes_through_a_filter(template):
    """Also in branches no example reaches: each {{ }} ends in one of the target's filters."""
    env = make_environment()
    tree = env.parse((templates_dir() / "supervisor" / template).read_text(encoding="utf-8"))
    outputs = list(_outputs(tree))
    assert outputs
    for node in outputs:
        assert isinstance(node, jinja2.nodes.Filter) and node.name in env.filters, node


def test_no_function_of_the_target_is_long():
    root = Path(__file__).resolve().parent.parent / "unitgen" / "targets" / "supervisor"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef):
                assert (node.end_lineno or 0) - node.lineno < 80, f"{path.name}: {node.name}"


def test_a_gateway_and_its_members_render_for_supervisord(tmp_path):
    # refused before (issue 26): HAProxy takes the port supervisord's holder keeps,
    # never as root; root hands it the exporter's socket and a copy of the keys
    from unitgen.ops.pipeline import CheckAllocator, plan_paths  # noqa: PLC0415
    from unitgen.targets.supervisor.render import SupervisorTarget  # noqa: PLC0415

    member = write_spec(tmp_path, "m", 'name = "m"\nbackend = "vllm"\nmodel = "x"\n'
                                       'port = 8001\ngateway = "gw"\naliases = ["q"]\n')
    gw = write_spec(tmp_path, "gw", 'kind = "gateway"\nname = "gw"\nport = 8080\n'
                                    'api_keys_file = "/etc/unitgen/gw.keys"\n'
                                    'metrics = "127.0.0.1:9101"\n')
    ctx = SupervisorContext(python="/usr/bin/python3", proxyd="/usr/lib/proxyd",
                            run_dir="/run/u", log_dir=tempfile.gettempdir(),
                            secrets_dir="/etc/u/secrets", config_dir="/srv/conf")
    planned = plan_paths([member, gw], SupervisorTarget(ctx), CheckAllocator(None))
    files = {f.name: f for f in planned[1].files}
    conf = files["unitgen-gw.conf"].text
    programs = {p.group: p for p in read_back(conf)}
    holder, haproxy = programs["gw"], programs["gw-backend"]
    assert holder.fcgi_socket == "tcp://127.0.0.1:8080"
    assert holder.argv[-4:] == ["--serve", "/run/u/unitgen-gw/listen.sock", "--user", "haproxy"]
    assert haproxy.argv[haproxy.argv.index("exec") + 1:] == [
        "--mkdir", "/run/u/unitgen-gw", "--fd3-from", "/run/u/unitgen-gw/listen.sock",
        "--listen-fd4", "127.0.0.1:9101", "--gw-member-keys", "/etc/u/secrets/gw.env",
        "--gw-keys", "/etc/unitgen/gw.keys",
        "--gw-models", "/srv/conf/unitgen/gateways/gw/models.json",
        "--user", "haproxy", "--", "haproxy", "-Ws", "-f",
        "/srv/conf/unitgen/gateways/gw/haproxy.cfg"]
    cfg = files["unitgen/gateways/gw/haproxy.cfg"]
    assert cfg.config and "stats socket '/run/u/unitgen-gw/admin.sock'" in cfg.text
    # the keys as maps root makes, not the root-only file
    assert "map('/run/u/unitgen-gw/keys.map')" in cfg.text and "gw.keys" not in cfg.text
    assert "server m 127.0.0.1:8001" in cfg.text
    assert files["unitgen/gateways/gw/routes.map"].text.split("\n")[:2] == ["m r1", "q r1"]
    # the member renders as any instance, its record names the gateway it joins
    record = parse_record(planned[0].files[0].text)
    assert record is not None and record.member is not None and record.member.gateway == "gw"


def test_a_supervisor_gateway_sends_a_member_its_own_key_from_a_secret_file(tmp_path):
    """Refused before ("cannot send a member its own key yet"): the key goes in
    the gateway's secret file (the instances' secrets, 0600), HAProxy reads the
    copy root makes in its runtime directory, no other file holds it."""
    from unitgen.features.gateway.plan import GatewayPlan, GatewaySettings, Member  # noqa: PLC0415
    from unitgen.targets.supervisor.gateway import render_gateway_files  # noqa: PLC0415

    keyed = Member("m", "127.0.0.1:9", ("m",), gateway="g", key_env="M_KEY")
    plan = GatewayPlan(GatewaySettings(name="g", api_keys_file="/etc/g.keys"), (keyed,),
                       keys=(("m", "sk-m-4f0a"),))
    files = render_gateway_files("g", plan, str(tmp_path), "/run/x", ("g.toml", ""))
    secret = [f for f in files if f.secret]
    assert [f.name for f in secret] == ["g.env"] and "Bearer sk-m-4f0a" in secret[0].text
    cfg = next(f for f in files if f.name.endswith("haproxy.cfg")).text
    assert "map('/run/x/unitgen-g/member-keys.map')" in cfg
    assert not any("sk-m-4f0a" in f.text for f in files if not f.secret)
