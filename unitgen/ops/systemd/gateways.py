"""Gateways and their members under the systemd target: when an instance that
joins a gateway is deployed or removed, the gateway's HAProxy files are
rendered again and HAProxy reloaded (its socket stays; no request is refused
or cut); every configuration is checked by ``haproxy -c`` before it is
written."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

from unitgen.errors import Problem, SpecError
from unitgen.ops.files import read_key_file
from unitgen.ops.pipeline import Planned
from unitgen.ops.trust import secret_file_problem
from unitgen.plan.gateway import (
    GatewayPlan,
    GatewaySettings,
    Member,
    member_key,
    member_of,
    route_keys,
)
from unitgen.targets.base import RenderedFile
from unitgen.targets.haproxy.render import (
    CONFIG,
    FILES,
    MEMBER_KEYS,
    GatewayPaths,
    render_gateway,
)
from unitgen.targets.systemd.escape import env_file_value
from unitgen.targets.systemd.gateway import (
    SETTINGS,
    config_root,
    gateway_dir,
    gateway_files,
    runtime_root,
)
from unitgen.targets.systemd.installed import Installed, secrets_dir

__all__ = ["admin_socket", "affected", "config_path", "installed_key", "key_file_problems",
           "remote_members", "remove_gateway_files", "rerender", "runtime_api", "validate"]


def config_path(scope: str, f: RenderedFile) -> Path:
    """Where a gateway's file is installed: a config file below the manager's
    configuration directory, its secret file (the member keys) with the others."""
    return (secrets_dir(scope) if f.secret else config_root(scope)) / f.name


def key_file_problems(planned: Iterable[Planned], scope: str) -> list[Problem]:
    """Gateways whose keys files (``api_keys_file``, ``metrics_keys_file``) are not
    root's alone at system scope (the door to every route, to the exporter), or
    are readable by others (any scope)."""
    out: list[Problem] = []
    for p in planned:
        plan = p.instance.gateway
        if plan is None:
            continue
        files = [("api_keys_file", plan.settings.api_keys_file),
                 ("metrics_keys_file", plan.settings.metrics_keys_file)]
        files += [(f"upstreams[{i}].api_key_file", m.key_file)
                  for i, m in enumerate(m for m in plan.members if m.remote)]
        for key, path in files:
            why = path and secret_file_problem(Path(path), root=scope == "system")
            if why:
                out.append(Problem(str(p.path), key, f"{why}: make the file root's alone "
                                   f"(chown root:root {path}; chmod 600 {path})"
                                   if scope == "system" else f"{why}: chmod 600 {path}"))
    return out


def installed_key(scope: str, m: Member) -> str | None:
    """A member's own API key: an installed instance's from its secret file
    (root's, 0600), an upstream's from its ``api_key_file`` (its first line);
    None when it has none or the file cannot be read or does not say it."""
    if m.key_file:
        return read_key_file(m.key_file)
    if m.key_env is None:
        return None
    try:
        text = (secrets_dir(scope) / f"{m.instance}.env").read_text(encoding="utf-8")
    except OSError:
        return None
    return env_file_value(text, m.key_env)


def _settings(scope: str, name: str) -> GatewayPlan | None:
    """An installed gateway's settings and its members on other hosts."""
    try:
        data = json.loads((gateway_dir(scope, name) / SETTINGS).read_text(encoding="utf-8"))
        metrics = data.get("metrics")
        ups = tuple(Member(**{**m, "names": tuple(m["names"])})
                    for m in data.get("upstreams", []))
        return GatewayPlan(GatewaySettings(**data["settings"]), ups,
                           tuple(metrics) if metrics else None)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def admin_socket(scope: str, gateway: str) -> Path:
    """The gateway's HAProxy runtime API (its configuration's ``stats socket``)."""
    return runtime_root(scope) / f"unitgen-{gateway}" / "admin.sock"


def runtime_api(sock: Path, command: str, timeout: float = 2.0) -> str:
    """One command to HAProxy's runtime API and its whole answer (OSError when
    the socket does not answer)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(sock))
        s.sendall(command.encode() + b"\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.decode("utf-8", "replace")


def remote_members(scope: str, gateway: str) -> list[tuple[Member, str]]:
    """An installed gateway's members on other hosts, each with its state as the
    running HAProxy sees it (``UP``, ``DOWN``, ``DRAIN``, ``no check``; ``not
    shown`` when the runtime API does not answer)."""
    found = _settings(scope, gateway)
    if found is None or not found.members:
        return []
    states: dict[str, str] = {}
    try:
        lines = runtime_api(admin_socket(scope, gateway), "show stat").splitlines()
        names = lines[0].lstrip("# ").split(",") if lines else []
        for line in lines[1:]:
            row = dict(zip(names, line.split(","), strict=False))
            states.setdefault(row.get("svname", ""), row.get("status", ""))
    except OSError:
        pass
    return [(m, states.get(m.instance) or "not shown") for m in found.members]


def affected(installed: dict[str, Installed], planned: Iterable[Planned],
             removed: Iterable[str] = ()) -> set[str]:
    """Installed gateways whose members change with this run (not in the run)."""
    run = {p.instance.name: p for p in planned}
    names: set[str] = set()
    for p in run.values():
        if p.instance.spec.gateway:
            names.add(p.instance.spec.gateway)
    for name in [*run, *removed]:
        old = installed.get(name)
        if old is not None and old.member is not None:
            names.add(old.member.gateway)
    return {g for g in names if g in installed and installed[g].is_gateway and g not in run}


def rerender(scope: str, gateway: str, installed: dict[str, Installed],
             planned: Iterable[Planned], removed: Iterable[str] = ()) -> list[RenderedFile]:
    """An installed gateway's config files with its members as they will be."""
    found = _settings(scope, gateway)
    if found is None:
        return []
    run = {p.instance.name: p for p in planned}
    gone = set(removed) | set(run)
    members: list[Member] = [i.member for n, i in installed.items()
                             if i.member is not None and i.member.gateway == gateway
                             and n not in gone]
    keys = [(m.instance, k) for m in (*found.members, *members)
            if (k := installed_key(scope, m)) is not None]
    joining = [p for p in run.values() if (m := member_of(p.instance)) is not None
               and m.gateway == gateway]
    members += [m for p in joining if (m := member_of(p.instance)) is not None]
    keys += [(p.instance.name, k) for p in joining if (k := member_key(p.instance)) is not None]
    plan = GatewayPlan(found.settings, (*found.members, *members), found.metrics, tuple(keys))
    where = (str(joining[0].path), "gateway") if joining else (f"gateway {gateway}", "")
    return gateway_files(gateway, plan, scope, where)


def validate(source: str, plan: GatewayPlan) -> None:
    """``haproxy -c`` of the configuration as it would be, in a scratch directory
    (a socket on fd 3, and fd 4 for the exporter: the config binds them).
    SpecError naming the file with HAProxy's own words when it refuses."""
    haproxy = shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/sbin/haproxy") if Path(p).exists()), None)
    if haproxy is None:
        raise SpecError(problems=[Problem(source, "kind", "a gateway runs HAProxy, which is "
                                          "not installed here (Debian: apt-get install haproxy)")])
    with tempfile.TemporaryDirectory(prefix="unitgen-gw-") as tmp:
        paths = GatewayPaths(tmp, tmp, plan.settings.api_keys_file,
                             plan.settings.metrics_keys_file)
        keyed = set(route_keys(plan)[0])
        for f in render_gateway(plan.settings, plan.routes, paths, keyed=keyed):
            (Path(tmp) / f.name).write_text(f.text, encoding="utf-8")
        (Path(tmp) / MEMBER_KEYS).write_text("", encoding="utf-8")  # HAProxy reads it at start
        socks = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
        try:
            done = subprocess.run(
                [haproxy, "-c", "-f", str(Path(tmp) / CONFIG)], capture_output=True,
                text=True, timeout=30, check=False,
                # fds not passed are closed after the dup2s of preexec_fn
                pass_fds=tuple({3, 4, *(s.fileno() for s in socks)}),
                preexec_fn=lambda: _fds_3_4([s.fileno() for s in socks]))
        finally:
            for s in socks:
                s.close()
    if done.returncode != 0:
        said = " ".join((done.stderr + done.stdout).split())[:600]
        raise SpecError(problems=[Problem(source, "", f"HAProxy refuses the gateway's "
                                          f"configuration: {said}")])


def _fds_3_4(fds: list[int]) -> None:
    import os  # noqa: PLC0415 - in the child, before exec

    for target, fd in zip((3, 4), fds, strict=True):
        if fd != target:
            os.dup2(fd, target)


def remove_gateway_files(scope: str, name: str) -> list[Path]:
    """Delete the files unitgen wrote for gateway ``name`` (and its directory when
    nothing else is left in it); the deleted paths."""
    directory = gateway_dir(scope, name)
    cfg = directory / CONFIG
    try:
        ours = f"# unitgen-gateway: {name}\n" in cfg.read_text(encoding="utf-8")[:300]
    except OSError:
        return []
    if not ours:
        return []
    gone = []
    for fname in (CONFIG, SETTINGS, *FILES.values()):
        path = directory / fname
        if path.exists():
            path.unlink()
            gone.append(path)
    with contextlib.suppress(OSError):
        directory.rmdir()
    return gone
