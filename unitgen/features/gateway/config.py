"""A gateway's configuration as its members change, for every target: when an
instance that joins a gateway is deployed or removed, the gateway's HAProxy
files are rendered again (and HAProxy reloaded by the feature's hooks, its
socket kept: no request is refused or cut); every configuration is checked by
``haproxy -c`` before it is written; HAProxy's runtime API for what it does now.
Where the files are is the target's (:class:`GatewayBinding`)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol

from unitgen.errors import Problem, SpecError
from unitgen.features.base import InstalledLike
from unitgen.features.gateway.doctor import SocketState
from unitgen.features.gateway.files import SETTINGS, read_settings
from unitgen.features.gateway.keys import installed_key
from unitgen.features.gateway.plan import GatewayPlan, Member, member_key, member_of, route_keys
from unitgen.features.gateway.render import CONFIG, FILES, MEMBER_KEYS, GatewayPaths, render_gateway
from unitgen.inunit.gwkeys import MAPS, METRICS_KEYS, SALT, parse_keys
from unitgen.inunit.hareload import runtime_api
from unitgen.ops.pipeline import Planned
from unitgen.ops.trust import secret_file_problem
from unitgen.targets.base import RenderedFile

__all__ = ["GatewayBinding", "affected", "key_file_problems", "remote_members",
           "remove_gateway_files", "rerender", "runtime_api", "validate"]


class GatewayBinding(Protocol):
    """What a gateway needs from a target."""

    def directory(self, gateway: str) -> Path:
        """Where the gateway's HAProxy files are installed."""
        ...

    def admin_socket(self, gateway: str) -> Path:
        """Its HAProxy runtime API (the configuration's ``stats socket``)."""
        ...

    def discovery_file(self) -> Path:
        """The manager's Prometheus discovery file (:mod:`unitgen.features.gateway.discovery`)."""
        ...

    def files(self, gateway: str, plan: GatewayPlan,
              where: tuple[str, str]) -> list[RenderedFile]:
        """Its HAProxy files as this target renders them (config files, and the
        member keys as a secret file); SpecError naming ``where`` (file, key)."""
        ...

    @property
    def root_only(self) -> bool:
        """Keys files must be root's alone (root runs the gateway's set-up)."""
        ...

    def secret(self, instance: str, variable: str) -> str | None:
        """An installed instance's secret (its key), from its root-only file."""
        ...

    def path(self, f: RenderedFile) -> Path:
        """Where one of those files is installed (a secret one with the
        target's secrets)."""
        ...

    def reload(self, gateway: str) -> str | None:
        """Reload a running gateway (new workers on the same socket); its
        outcome, None when the gateway is not running."""
        ...

    def before_signal(self, gateway: str) -> None:
        """The target is about to reload a running gateway by a signal of its
        own: make its keys maps again first, and wait until its master takes
        the signal (a target whose reload command does that, systemd's
        ``ExecReload=``, does nothing here)."""
        ...

    def after_signal(self, gateway: str) -> None:
        """The signal was sent: return once a new worker serves (UnitgenError
        when none does; a target whose reload command waits does nothing)."""
        ...

    def socket_states(self, names: list[str]) -> dict[str, SocketState]:
        """Instance -> what holds its public socket and its state."""
        ...


def key_file_problems(planned: Iterable[Planned], root: bool) -> list[Problem]:
    """Gateways whose keys files (``api_keys_file``, ``metrics_keys_file``,
    upstreams' ``api_key_file``) are not root's alone where root runs the gateway
    (the door to every route, to the exporter), or are readable by others."""
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
            why = path and secret_file_problem(Path(path), root=root)
            if why:
                out.append(Problem(str(p.path), key, f"{why}: make the file root's alone "
                                   f"(chown root:root {path}; chmod 600 {path})"
                                   if root else f"{why}: chmod 600 {path}"))
            elif path and key in ("api_keys_file", "metrics_keys_file"):
                out += [Problem(str(p.path), key, f"{path}: {said}")
                        for said in _key_lines(path)]
    return out


def _key_lines(path: str) -> list[str]:
    """What is wrong in a keys file (its format: :mod:`unitgen.inunit.gwkeys`);
    nothing when this process may not read it (the unit's start says then)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return ["no such file: the gateway would not start (it reads its keys at each start "
                "and reload)"]
    except (OSError, UnicodeDecodeError):
        return []
    return parse_keys(text)[1]


def remote_members(binding: GatewayBinding, gateway: str) -> list[tuple[Member, str]]:
    """An installed gateway's members on other hosts, each with its state as the
    running HAProxy sees it (``UP``, ``DOWN``, ``DRAIN``, ``no check``; ``not
    shown`` when the runtime API does not answer)."""
    found = read_settings(binding.directory(gateway))
    if found is None or not found.members:
        return []
    states: dict[str, str] = {}
    try:
        lines = runtime_api(binding.admin_socket(gateway), "show stat").splitlines()
        names = lines[0].lstrip("# ").split(",") if lines else []
        for line in lines[1:]:
            row = dict(zip(names, line.split(","), strict=False))
            states.setdefault(row.get("svname", ""), row.get("status", ""))
    except OSError:
        pass
    return [(m, states.get(m.instance) or "not shown") for m in found.members]


def affected(installed: Mapping[str, InstalledLike], planned: Iterable[Planned],
             removed: Iterable[str] = ()) -> set[str]:
    """Installed gateways whose members change with this run (not in the run)."""
    run = {p.instance.name: p for p in planned}
    names: set[str] = set()
    for p in run.values():
        if p.instance.spec.gateway:
            names.add(p.instance.spec.gateway)
    for name in [*run, *removed]:
        old = installed.get(name)
        if old is not None and old.rec.member is not None:
            names.add(old.rec.member.gateway)
    return {g for g in names if g in installed and installed[g].rec.is_gateway and g not in run}


def rerender(binding: GatewayBinding, gateway: str, installed: Mapping[str, InstalledLike],
             planned: Iterable[Planned], removed: Iterable[str] = ()) -> list[RenderedFile]:
    """An installed gateway's config files with its members as they will be."""
    found = read_settings(binding.directory(gateway))
    if found is None:
        return []
    run = {p.instance.name: p for p in planned}
    gone = set(removed) | set(run)
    members: list[Member] = [m for n, i in installed.items()
                             if (m := i.rec.member) is not None and m.gateway == gateway
                             and n not in gone]
    joining = [p for p in run.values() if (m := member_of(p.instance)) is not None
               and m.gateway == gateway]
    keys = [(m.instance, k) for m in (*found.members, *members)
            if (k := installed_key(m, binding.secret)) is not None]
    members += [m for p in joining if (m := member_of(p.instance)) is not None]
    keys += [(p.instance.name, k) for p in joining if (k := member_key(p.instance)) is not None]
    plan = GatewayPlan(found.settings, (*found.members, *members), found.metrics, tuple(keys))
    where = (str(joining[0].path), "gateway") if joining else (f"gateway {gateway}", "")
    return binding.files(gateway, plan, where)


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
        paths = GatewayPaths(tmp, tmp)
        keyed = set(route_keys(plan)[0])
        for f in render_gateway(plan.settings, plan.routes, paths, keyed=keyed):
            (Path(tmp) / f.name).write_text(f.text, encoding="utf-8")
        # the files HAProxy reads at start from its runtime directory (the keys as maps)
        for name in (MEMBER_KEYS, *MAPS.values(), METRICS_KEYS):
            (Path(tmp) / name).write_text("", encoding="utf-8")
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


def remove_gateway_files(binding: GatewayBinding, name: str) -> list[Path]:
    """Delete the files unitgen wrote for gateway ``name`` (and its directory when
    nothing else is left in it); the deleted paths."""
    directory = binding.directory(name)
    cfg = directory / CONFIG
    try:
        ours = f"# unitgen-gateway: {name}\n" in cfg.read_text(encoding="utf-8")[:300]
    except OSError:
        return []
    if not ours:
        return []
    gone = []
    for fname in (CONFIG, SETTINGS, SALT, *FILES.values()):
        path = directory / fname
        if path.exists():
            path.unlink()
            gone.append(path)
    with contextlib.suppress(OSError):
        directory.rmdir()
    return gone
