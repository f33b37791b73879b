"""The gateway's plan and HAProxy configuration, offline: routes grouped by
replica set, every file HAProxy names, ``haproxy -c`` accepting what is
rendered (a socket on fd 3 and fd 4, as the socket unit passes them), and
gateway specs refused with file and key."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest

from tests.helpers import GOLDEN_CTX, write_spec
from unitgen.errors import SpecError
from unitgen.features.gateway.config import validate
from unitgen.features.gateway.plan import (
    GatewayPlan,
    GatewaySettings,
    Member,
    route_keys,
    routes,
    settings_of,
    upstream_members,
)
from unitgen.features.gateway.render import FILES, GatewayPaths, render_gateway
from unitgen.features.gateway.spec import GatewaySpec
from unitgen.inunit import keycopy
from unitgen.ops.pipeline import plan_paths
from unitgen.ops.systemd.specs import planner, render_spec
from unitgen.plan.instance import resolve
from unitgen.plan.record import parse_record
from unitgen.spec.model import load_any, load_spec
from unitgen.targets.systemd.escape import env_file_line, env_file_value

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
        GatewayPaths("/etc/unitgen/gateways/gw", "/run/unitgen-gw"))}
    cfg = files["haproxy.cfg"]
    for name in FILES.values():
        assert name in files and f"/etc/unitgen/gateways/gw/{name}" in cfg
    assert "bind fd@3" in cfg and "bind fd@4" in cfg and "balance leastconn" in cfg
    assert "server ll [::1]:31003" in cfg and "maxconn 2" in cfg
    # the keys, as maps in its runtime directory (unitgen.inunit.gwkeys makes them)
    assert "map('/run/unitgen-gw/keys.map')" in cfg and "'/k'" not in cfg
    assert files["routes.map"].splitlines() == ["meta-llama/Llama-3-8B r1", "qa r2", "qb r3",
                                                "qwen r4"]
    assert files["429.http"].startswith("HTTP/1.1 429 ")


@needs_haproxy
def test_haproxy_accepts_what_is_rendered_and_its_refusal_is_a_spec_problem():
    validate("gw.toml", GatewayPlan(GatewaySettings("gw", metrics="127.0.0.1:9"), MEMBERS,
                                    ("127.0.0.1", 9)))
    # an address the renderer lets through and HAProxy cannot use
    bad = GatewayPlan(GatewaySettings("gw"), (Member("x", "999.1.1.1:80", ("x",)),))
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


@pytest.mark.parametrize("extra", ['aliases = ["qwen"]\n', 'aliases = ["qwen"]\nhost = "0.0.0.0"\n'])
def test_vllm_is_told_its_route_names_wherever_the_gateway_runs(tmp_path, extra):
    """A fleet's gateway on another host routes by the name and aliases of an
    instance that has no ``gateway`` key: vLLM must serve them there too
    (before, it served only its model path and answered every route 404)."""
    argv = _argv(tmp_path, "vllm", extra)
    assert argv[argv.index("--served-model-name") + 1:] == ("q", "qwen", "Qwen/Qwen2-7B")


@pytest.mark.parametrize("extra", [
    'gateway = "gw"\nargs = ["--served_model_name", "mine"]\n',  # vLLM reads _ as -
    'gateway = "gw"\nargs = ["--served-model-name=mine"]\n',
    'args = ["--served-model-name", "mine", "other"]\n',
])
def test_served_names_are_left_alone_when_args_say_them(tmp_path, extra):
    argv = _argv(tmp_path, "vllm", extra)
    assert argv.count("--served-model-name") + argv.count("--served_model_name") <= 1
    assert "q" not in argv[argv.index("Qwen/Qwen2-7B") + 1:]


@pytest.mark.parametrize("backend", ["llama-server", "llama-box", "sglang", "vox-box"])
def test_servers_that_answer_any_name_get_none(tmp_path, backend):
    argv = _argv(tmp_path, backend, 'gateway = "gw"\naliases = ["qwen"]\n')
    assert not [w for w in argv if "served" in w], argv


UPSTREAMS = '''kind = "gateway"
name = "gw"
port = 8080
[[upstreams]]
node = "h1"
name = "qwen"
address = "127.0.0.2:8001"
aliases = ["Qwen/Qwen2-7B"]
max_concurrent = 4
[[upstreams]]
node = "h2"
name = "qwen"
address = "127.0.0.3:8001"
aliases = ["Qwen/Qwen2-7B"]
[[upstreams]]
node = "h2"
name = "emb"
address = "127.0.0.3:8002"
on_demand = true
'''


def test_upstreams_on_other_hosts_are_replicas_and_only_always_on_ones_are_checked(tmp_path):
    g = load_any(write_spec(tmp_path, "gw", UPSTREAMS))
    assert isinstance(g, GatewaySpec)
    members = upstream_members(g)
    found = {r.names: [m.instance for m in r.members] for r in routes(members)}
    assert found == {("Qwen/Qwen2-7B", "qwen"): ["h1_qwen", "h2_qwen"], ("emb",): ["h2_emb"]}
    cfg = render_gateway(settings_of(g), routes(members), GatewayPaths("/d", "/r"))[0].text
    lines = {ln.split()[1]: ln for ln in cfg.splitlines() if ln.strip().startswith("server ")}
    assert "maxconn 4 check inter 2s" in lines["h1_qwen"]
    assert "on-error mark-down" in lines["h2_qwen"]
    assert lines["h2_emb"].split() == ["server", "h2_emb", "127.0.0.3:8002"]  # never woken


@needs_haproxy
def test_haproxy_accepts_upstreams(tmp_path):
    g = load_any(write_spec(tmp_path, "gw", UPSTREAMS))
    assert isinstance(g, GatewaySpec)
    validate("gw.toml", GatewayPlan(settings_of(g), tuple(upstream_members(g))))


def test_bad_upstreams_are_named_by_file_index_and_key(tmp_path):
    spec = write_spec(tmp_path, "gw", 'kind = "gateway"\nname = "gw"\nport = 8080\n'
                      '[[upstreams]]\nnode = "h_1"\nname = "x"\naddress = "h1:80"\nbogus = 1\n'
                      '[[upstreams]]\nname = "y"\naddress = "127.0.0.1:1"\n'
                      '[[upstreams]]\nnode = "h"\nname = "z"\naddress = "127.0.0.1:1"\n'
                      '[[upstreams]]\nnode = "h"\nname = "z"\naddress = "127.0.0.1:2"\n')
    with pytest.raises(SpecError) as info:
        render_spec(spec, GOLDEN_CTX)
    keys = {p.key for p in info.value.problems}
    assert {"upstreams[0].node", "upstreams[0].address", "upstreams[0].bogus",
            "upstreams[1].node", "upstreams[3]"} <= keys, info.value.problems
    assert all(p.file == str(spec) for p in info.value.problems)
    bad = write_spec(tmp_path, "gw2", 'kind = "gateway"\nname = "gw"\nport = 8080\n'
                     'upstreams = "h1"\n')
    with pytest.raises(SpecError) as info:
        render_spec(bad, GOLDEN_CTX)
    assert [p.key for p in info.value.problems] == ["upstreams"]


def test_a_file_with_crlf_reads_back_as_written(tmp_path):
    # 429.http is an HTTP response (\r\n): read as text it became \n, and every
    # deploy of an unchanged gateway rewrote it and reported "updated"
    from unitgen.ops.files import apply_changes, read_exact  # noqa: PLC0415

    text = next(f.text for f in render_gateway(GatewaySettings("gw"), routes(MEMBERS),
                                               GatewayPaths("/d", "/r")) if f.name == "429.http")
    path = tmp_path / "429.http"
    apply_changes([(path, text)])
    assert "\r\n" in text and read_exact(path) == text


@pytest.mark.parametrize("address", ["::1:80", "[fe80::1%eth0]:80", "127.0.0.1:\uff18\uff10", "[[::1]]:80",
                                     "[127.0.0.1]:80", "127.0.0.1", "host.example:80"])
def test_an_upstream_address_is_refused_unless_haproxy_reads_it_one_way(tmp_path, address):
    text = (f'kind = "gateway"\nname = "gw"\nport = 8080\n[[upstreams]]\nnode = "h1"\n'
            f'name = "qwen"\naddress = "{address}"\n')
    with pytest.raises(SpecError) as info:
        load_any(write_spec(tmp_path, "gw", text))
    assert [p.key for p in info.value.problems] == ["upstreams[0].address"], info.value.problems


def _keyed(name: str, names: tuple[str, ...], key_env: str | None = "K") -> Member:
    return Member(name, "127.0.0.1:1", names, key_env=key_env)


def test_replicas_share_one_key_or_are_refused():
    # HAProxy sets the header before it picks a server: one key a set of replicas
    plan = GatewayPlan(GatewaySettings("gw"), (_keyed("a", ("a", "q")), _keyed("b", ("b", "q")),
                                                _keyed("c", ("c",), None)),
                       keys=(("a", "sk-1"), ("b", "sk-1")))
    sent, problems = route_keys(plan)
    backend = {r.names: r.backend for r in plan.routes}
    assert sent == {backend[("a",)]: "sk-1", backend[("b",)]: "sk-1", backend[("q",)]: "sk-1"}
    assert not problems
    _, problems = route_keys(replace(plan, keys=(("a", "sk-1"), ("b", "sk-2"))))
    assert problems == [problems[0]] and "route q" in problems[0], problems
    _, problems = route_keys(replace(plan, keys=(("a", "sk-1"),)))  # b's file unreadable
    assert problems == ["the API key of b cannot be read from its secret file: deploy it again"]
    mixed = GatewayPlan(GatewaySettings("gw"), (_keyed("a", ("q",)), _keyed("c", ("q",), None)),
                        keys=(("a", "sk-1"),))
    problems = route_keys(mixed)[1]
    assert problems and "a key and none" in problems[0], problems
    assert "sk-1" not in repr(plan) and "sk-1" not in " ".join(problems)


def test_the_keys_a_gateway_sends_are_its_secret_and_refused_replicas_name_the_file(tmp_path):
    key = "sk-mem$ber\"\\1"
    members = [write_spec(tmp_path, n, f'name = "{n}"\nbackend = "vllm"\nmodel = "m"\n'
                          f'gateway = "gw"\naliases = ["q"]\nargs = ["--api-key", {json.dumps(k)}]\n')
               for n, k in (("a", key), ("b", key))]
    gw = write_spec(tmp_path, "gw", 'kind = "gateway"\nname = "gw"\nport = 8080\n')
    target, alloc = planner(GOLDEN_CTX, None)
    planned = plan_paths([*members, gw], target, alloc)
    files = {f.name: f for f in planned[-1].files}
    assert files["gw.env"].secret and f"Bearer {key}" in files["gw.env"].text
    assert all(key not in f.text for f in planned[-1].files if not f.secret)
    unit = next(f.text for p in planned for f in p.files if f.name == "a.service")
    read_back = parse_record(unit)
    assert read_back is not None and read_back.member is not None
    assert (read_back.member.gateway, read_back.member.key_env) == ("gw", "VLLM_API_KEY")
    other = write_spec(tmp_path, "b", members[1].read_text().replace(json.dumps(key), '"sk-2"'))
    with pytest.raises(SpecError) as info:
        plan_paths([members[0], other, gw], target, alloc)
    assert [p.file for p in info.value.problems] == [str(gw)], info.value.problems
    assert key not in str(info.value) and "same key" in str(info.value)


@pytest.mark.parametrize("value", ["plain", 'q"uote', "back\\slash\\", "$dollar`tick", "a b"])
def test_a_secret_reads_back_as_written(value):
    line = env_file_line("K", value)
    assert env_file_value(f"# x\nOTHER=\"1\"\n{line}\n", "K") == value
    assert env_file_value(line, "NOPE") is None


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="hands a root file to another uid")


@needs_root
def test_keycopy_gives_the_runtime_directorys_owner_a_copy_and_nobody_else(tmp_path):
    src, run = tmp_path / "gw.env", tmp_path / "run"
    src.write_text("r1 Bearer sk-1\n")
    src.chmod(0o600)
    run.mkdir(mode=0o700)
    os.chown(run, 65534, 65534)
    (run / "member-keys.map").symlink_to(tmp_path / "victim")  # replaced, never followed
    assert keycopy.main([str(src), str(run / "member-keys.map")]) == 0
    st = (run / "member-keys.map").lstat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 65534, 0o400)
    assert (run / "member-keys.map").read_text() == "r1 Bearer sk-1\n"
    assert not (tmp_path / "victim").exists() and os.listdir(run) == ["member-keys.map"]
    src.unlink()
    assert keycopy.main([str(src), str(run / "member-keys.map")]) == 0  # nothing to send
    assert (run / "member-keys.map").read_text() == ""


@needs_root
@pytest.mark.parametrize("how", ["readable", "not-roots"])
def test_keycopy_refuses_a_file_that_is_not_roots_alone(tmp_path, how, capsys):
    src = tmp_path / "gw.env"
    src.write_text("r1 Bearer sk-1\n")
    src.chmod(0o644 if how == "readable" else 0o600)
    if how == "not-roots":
        os.chown(src, 65534, 65534)
    assert keycopy.main([str(src), str(tmp_path / "out.map")]) == 1
    said = capsys.readouterr().err
    assert str(src) in said and "sk-1" not in said and not (tmp_path / "out.map").exists()


def _unitgen(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "unitgen", *args], capture_output=True,
                          text=True, check=False)


@needs_root
def test_a_keys_file_another_user_owns_or_can_read_is_refused_at_system_scope(tmp_path):
    # issue 25, item 7: a 0644 keys file of another user passed check at system scope
    home = Path(tempfile.mkdtemp(prefix="unitgen-keys-", dir="/tmp"))  # theirs, reachable
    try:
        _refuse_foreign_keys(tmp_path, home)
    finally:
        shutil.rmtree(home)


def _refuse_foreign_keys(tmp_path: Path, home: Path) -> None:
    home.chmod(0o755)
    os.chown(home, 65534, 65534)
    keys = home / "llm.keys"
    # the other user writes it (and could again: a key to every route of its own)
    subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c",
                    f"umask 022; echo sk-theirs > {keys}"], check=True)
    spec = write_spec(tmp_path, "gw", 'kind = "gateway"\nname = "gw"\nport = 8080\n'
                                      f'api_keys_file = "{keys}"\n')
    for args in (("check", "--no-verify", str(spec)), ("deploy", "--dry-run", str(spec))):
        done = _unitgen(*args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert f"{spec}: api_keys_file: {keys} is readable" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    keys.chmod(0o600)
    done = _unitgen("check", "--no-verify", str(spec))
    assert done.returncode == 2 and f"{keys} is owned by uid 65534, not root" in done.stderr
    os.chown(keys, 0, 0)  # root's now, but in a directory another user can change
    done = _unitgen("check", "--no-verify", str(spec))
    assert done.returncode == 2 and f"{home} is owned by uid 65534" in done.stderr, done.stderr
    os.chown(home, 0, 0)
    done = _unitgen("check", "--no-verify", str(spec))
    assert done.returncode == 0, done.stderr
    keys.chmod(0o640)  # at user scope too: nobody else reads them
    done = _unitgen("check", "--no-verify", "--user", str(spec))
    assert done.returncode == 2 and "chmod 600" in done.stderr, done.stderr


@pytest.mark.parametrize(("metrics", "keys", "refused"), [
    ("0.0.0.0:9101", "", True), ("[::]:9101", "", True), ("10.0.0.2:9101", "", True),
    ("0.0.0.0:9101", 'metrics_keys_file = "/etc/unitgen/prom.keys"\n', False),
    ("127.0.0.1:9101", "", False), ("127.0.0.2:9101", "", False), ("[::1]:9101", "", False),
])
def test_the_exporter_listens_beyond_loopback_only_with_keys(tmp_path, metrics, keys, refused):
    # issue 25, item 9: anyone who reached it saw HAProxy's version, routes and servers
    spec = write_spec(tmp_path, "gw", f'kind = "gateway"\nname = "gw"\nport = 8080\n'
                                      f'metrics = "{metrics}"\n{keys}')
    if not refused:
        done = render_spec(spec, GOLDEN_CTX)
        unit = next(f.text for f in done.files if f.name == "gw.service")
        # made into a pattern file for HAProxy at each start and reload
        assert ("--metrics-keys /etc/unitgen/prom.keys" in unit) == bool(keys)
        return
    with pytest.raises(SpecError) as info:
        render_spec(spec, GOLDEN_CTX)
    assert [p.key for p in info.value.problems] == ["metrics"], info.value.problems
    assert "metrics_keys_file" in str(info.value) and "127.0.0.1:9101" in str(info.value)


def test_an_upstreams_key_file_is_read_at_deploy_and_checked_like_the_gateways(tmp_path):
    own = tmp_path / "h1.key"
    own.write_text("sk-upstream\n")
    own.chmod(0o644)  # readable by others: refused at system scope
    spec = write_spec(tmp_path, "gw", 'kind = "gateway"\nname = "gw"\nport = 8080\n'
                      '[[upstreams]]\nnode = "h1"\nname = "q"\naddress = "10.0.0.1:80"\n'
                      f'api_key_file = "{own}"\n')
    done = render_spec(spec, GOLDEN_CTX)
    files = {f.name: f for f in done.files}
    assert "Bearer sk-upstream" in files["gw.env"].text
    assert all("sk-upstream" not in f.text for f in done.files if not f.secret)
    checked = _unitgen("check", "--no-verify", str(spec))
    assert checked.returncode == 2, checked.stdout
    assert f"{spec}: upstreams[0].api_key_file: {own} is readable" in checked.stderr
    own.unlink()  # a key that cannot be read is no key to send
    with pytest.raises(SpecError) as info:
        render_spec(spec, GOLDEN_CTX)
    assert "h1_q cannot be read" in str(info.value)
