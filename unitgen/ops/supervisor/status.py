"""status, logs and doctor for the supervisor target. RUNNING in supervisord
only means "alive for startsecs": an instance is ``ready`` only when its public
port answers the health path (a live probe, the same code deploy waits with).
What the features bound here say (gateways and their routes) follows."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import psutil

from unitgen.errors import EXIT_FAILURE, EXIT_OK
from unitgen.inunit.envfile import read_env_file
from unitgen.inunit.probe import attempt
from unitgen.ops.findings import Finding, listening
from unitgen.ops.supervisor.bindings import features
from unitgen.ops.supervisor.rpc import SupervisorRPC
from unitgen.ops.supervisor.site import Site
from unitgen.result import Result, table
from unitgen.targets.supervisor.installed import InstalledConf, require, scan
from unitgen.targets.supervisor.render import secret_name

__all__ = ["doctor", "list_instances", "logs", "status"]


@dataclass(frozen=True)
class Row:
    """One instance as status reports it."""

    name: str
    state: str  # ready, starting, failed, stopped, stopping
    public: str
    pid: int | None
    uptime: float | None
    detail: str
    programs: dict[str, str]  # namespec -> supervisord state


def _states(rpc: SupervisorRPC) -> dict[str, dict[str, Any]]:
    return {str(p["name"]) if p["group"] == p["name"] else f"{p['group']}:{p['name']}": p
            for p in rpc.processes()}


def _key(target: Site, conf: InstalledConf) -> str | None:
    if not conf.key_env:
        return None
    try:
        return read_env_file(str(target.secrets_dir / secret_name(conf.name))).get(conf.key_env)
    except OSError:
        return None


def _row(target: Site, conf: InstalledConf, states: dict[str, dict[str, Any]]) -> Row:
    programs = {g: str(states[g]["statename"]) if g in states else "NOT-LOADED"
                for g in conf.groups}
    server = states.get(conf.server)
    if server is None:
        return Row(conf.name, "stopped", conf.public, None, None,
                   "not loaded in supervisord (run deploy again)", programs)
    pid = int(server["pid"]) or None
    uptime = (time.time() - float(server["start"])) if pid else None
    sname = str(server["statename"])
    if sname == "FATAL":
        return Row(conf.name, "failed", conf.public, None, None,
                   f"supervisord gave up: {server.get('spawnerr') or server['description']}",
                   programs)
    if sname == "EXITED":
        code = int(server.get("exitstatus", 0))
        return Row(conf.name, "failed" if code else "stopped", conf.public, None, None,
                   f"exited with status {code} and was not restarted", programs)
    if sname == "STOPPED":
        return Row(conf.name, "stopped", conf.public, None, None, "stopped", programs)
    if sname == "STOPPING":
        return Row(conf.name, "stopping", conf.public, pid, uptime, "stopping", programs)
    if sname == "BACKOFF":
        return Row(conf.name, "starting", conf.public, None, None,
                   f"restarting after an exit: {server.get('spawnerr') or 'backing off'}",
                   programs)
    public = states.get(conf.name)
    pstate = str(public["statename"]) if public else "NOT-LOADED"
    if pstate in ("FATAL", "STOPPED", "EXITED", "NOT-LOADED"):
        # the server runs, but nothing holds the public socket: clients are refused
        return Row(conf.name, "failed" if pstate == "FATAL" else "stopped", conf.public, pid,
                   uptime, f"the public socket's program {conf.name} is {pstate}; the port "
                           "is closed", programs)
    probe = attempt(conf.probe_target(), conf.health_path, _key(target, conf), timeout=3.0)
    if probe.outcome == "ready":
        return Row(conf.name, "ready", conf.public, pid, uptime, probe.detail, programs)
    if probe.outcome == "fatal":
        return Row(conf.name, "failed", conf.public, pid, uptime, probe.detail, programs)
    return Row(conf.name, "starting", conf.public, pid, uptime,
               f"{sname.lower()}; public port: {probe.detail}", programs)


def status(names: list[str], target: Site, detail: frozenset[str] = frozenset()) -> Result:
    """Every (or the named) instance: state from supervisord plus a live probe."""
    confs = (require(target.conf_dir, names, target.ctx.run_dir) if names
             else scan(target.conf_dir, target.ctx.run_dir))
    rpc = target.rpc()
    states = _states(rpc) if confs else {}
    rows = [_row(target, conf, states) for conf in confs.values()]
    data: dict[str, object] = {"target": "supervisor", "instances": [asdict(r) for r in rows]}
    more: tuple[str, ...] = ()
    for feat in features(target, rpc):
        said, feat_lines = feat.status(scan(target.conf_dir, target.ctx.run_dir),
                                       {r.name: r.state for r in rows}, detail)
        data.update(said)
        more += feat_lines
    lines = [f"{'NAME':<20} {'STATE':<9} {'PUBLIC':<22} {'PID':>7} {'UPTIME':>8}  DETAIL"]
    for r in rows:
        up = f"{r.uptime:.0f}s" if r.uptime is not None else "-"
        lines.append(f"{r.name:<20} {r.state:<9} {r.public:<22} {r.pid or '-':>7} {up:>8}  "
                     f"{r.detail}")
    if not rows:
        lines = [f"no unitgen instances in {target.conf_dir}"]
    failed = any(r.state == "failed" for r in rows)
    return Result(data=data, lines=(*lines, *more),
                  exit_code=EXIT_FAILURE if failed else EXIT_OK)


def list_instances(site: Site) -> Result:
    """Installed instances, from the conf files alone (supervisord not asked)."""
    confs = scan(site.conf_dir, site.ctx.run_dir)
    rows = [{"name": c.name, "backend": c.backend, "address": c.public,
             "activation": "eager", "units": c.groups} for c in confs.values()]
    lines = table(("NAME", "BACKEND", "ADDRESS", "ACTIVATION"),
                  [(str(r["name"]), str(r["backend"]), str(r["address"]), "eager")
                   for r in rows]) if rows else ("no instances",)
    return Result(data={"target": "supervisor", "instances": rows}, lines=lines)


def logs(name: str, target: Site, *, lines: int = 100, follow: bool = False,
         write: Callable[[str], None] | None = None, poll: float = 0.5,
         until: Callable[[], bool] | None = None) -> int:
    """Print the server's log (supervisord's log file of the server program,
    read over XML-RPC); with ``follow``, keep printing new output."""
    out = write or _stdout
    conf = require(target.conf_dir, [name], target.ctx.run_dir)[name]
    rpc = target.rpc()
    text, offset, _ = rpc.tail(conf.server, 0, 256 * 1024)
    tail = text.splitlines(keepends=True)[-lines:] if lines > 0 else []
    out("".join(tail))
    while follow and not (until and until()):
        time.sleep(poll)
        text, offset, _ = rpc.tail(conf.server, offset, 256 * 1024)
        if text:
            out(text)
    return EXIT_OK


def _stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def doctor(name: str, target: Site) -> Result:
    """Does the server listen where the proxy forwards and the probe checks?"""
    conf = require(target.conf_dir, [name], target.ctx.run_dir)[name]
    rpc = target.rpc()
    states = _states(rpc)
    findings: list[Finding] = []
    for group in conf.groups:
        info = states.get(group)
        if info is None:
            findings.append(Finding(False, f"{group} is not loaded in supervisord: run deploy "
                                           "again (it runs reloadConfig and adds the group)"))
        elif info["statename"] == "STARTING" and info.get("pid"):
            # supervisord says RUNNING only after startsecs; the health probe below
            # says whether it answers, which is what counts
            findings.append(Finding(True, f"{group} is STARTING (pid {info['pid']}; RUNNING "
                                          "after startsecs)"))
        elif info["statename"] != "RUNNING":
            findings.append(Finding(False, f"{group} is {info['statename']}: "
                                           f"{info.get('spawnerr') or info['description']}"))
        else:
            findings.append(Finding(True, f"{group} is RUNNING (pid {info['pid']})"))
    public_port = conf.public_port
    holder = next((c.pid for c in psutil.net_connections(kind="inet")
                   if c.status == psutil.CONN_LISTEN and c.laddr
                   and c.laddr.port == public_port), None)
    supervisord_pid = int(rpc.call("getPID"))
    if holder is None:
        findings.append(Finding(False, f"nothing listens on the public port {public_port}: "
                                       "supervisord opens it only while the fcgi-program runs"))
    else:
        family = {supervisord_pid}
        for group in conf.groups:
            info = states.get(group)
            if info and info["pid"]:
                family.add(int(info["pid"]))
        ok = holder in family or _child_of(holder, supervisord_pid)
        findings.append(Finding(ok, f"public port {public_port} is held by pid {holder}" + (
            " (supervisord's socket)" if ok else
            ": not supervisord's socket; another process took the port")))
    server = states.get(conf.server)
    feats = features(target, rpc)
    running = bool(server and server["statename"] == "RUNNING")
    said = [f for feat in feats for f in feat.doctor(scan(target.conf_dir, target.ctx.run_dir),
                                                     name, running)]
    if server and server["pid"] and not any(feat.owns_processes(conf) for feat in feats):
        ports, paths = listening(int(server["pid"]))
        private_port = conf.private_port
        # its own ports: the public one and the others its record names (an exporter's)
        extra = sorted(p for p in ports if p not in (private_port, public_port, *conf.rec.ports))
        if extra:
            findings.append(Finding(False, f"the server also listens on {', '.join(map(str, extra))}"
                                           f"; clients and the probe use {conf.public}: remove "
                                           "the port option from the server's args (unitgen "
                                           "sets the endpoint)"))
        if conf.uses_proxy and private_port is None and not paths:
            findings.append(Finding(False, f"the server listens on no Unix socket; the proxy "
                                           f"forwards to {conf.private}"))
    findings += said
    probe = attempt(conf.probe_target(), conf.health_path, _key(target, conf), timeout=3.0)
    findings.append(Finding(probe.outcome == "ready",
                            f"public {conf.probe_target()}{conf.health_path}: {probe.detail}"))
    bad = [f for f in findings if not f.ok]
    lines = tuple(("ok: " if f.ok else "problem: ") + f.text for f in findings)
    return Result(data={"name": name, "target": "supervisor",
                        "findings": [asdict(f) for f in findings], "ok": not bad},
                  lines=lines, exit_code=EXIT_FAILURE if bad else EXIT_OK)


def _child_of(pid: int, parent: int) -> bool:
    try:
        return any(p.pid == parent for p in psutil.Process(pid).parents())
    except psutil.Error:
        return False
