"""doctor: the GPUStack #2154 detector. Compares the port the socket owns and
the probe checks with what the instance's processes actually listen on, checks
that the probe's target answers, and says what to do about any mismatch.
Works on hand-written units too (``--unit foo.service --port N``)."""

from __future__ import annotations

import asyncio
import os
from dataclasses import asdict

import psutil

from unitgen.errors import EXIT_FAILURE, EXIT_OK, UnitgenError
from unitgen.inunit.probe import attempt
from unitgen.ops.findings import Finding, listening
from unitgen.ops.systemd.bindings import features
from unitgen.ops.systemd.manager import UnitInfo, connect
from unitgen.ops.systemd.session import Session
from unitgen.ops.systemd.status import restart_reason
from unitgen.result import Result
from unitgen.targets.systemd.installed import Installed, require, scan, unit_dir

__all__ = ["doctor", "doctor_unit"]


def _runtime_dir(scope: str) -> str:
    return os.environ.get("XDG_RUNTIME_DIR", "/run") if scope == "user" else "/run"


async def _unit_info(unit: str, scope: str) -> UnitInfo:
    async with connect(scope) as m:
        info = (await m.info([unit]))[unit]
    if info.load_state == "not-found":
        raise UnitgenError(f"unit {unit} is not known to the {scope} manager")
    return info


async def _main_pid(unit: str, scope: str) -> tuple[int, str]:
    info = await _unit_info(unit, scope)
    return info.main_pid, info.active_state


def _unit_cgroup(text: str) -> str:
    """The unit a process is in, from its /proc/PID/cgroup: systemd's own hierarchy
    (name=systemd, or the unified one). In a unit with Delegate=yes (a container's)
    podman run moves itself into a "runtime" leaf (--cgroups=split), also in other
    v1 controllers, and systemd puts ExecStartPost= processes into ".control"."""
    lines = text.split("\n")
    mine = [ln for ln in lines if ":name=systemd:" in ln] or [ln for ln in lines
                                                              if ln.startswith("0::")]
    path = mine[0].split(":", 2)[2] if mine else text
    return path.removesuffix("/runtime").removesuffix("/.control")


def _checkers(pid: int) -> list[int]:
    """Liveness checkers (unitgen.inunit.watch) in the same unit as ``pid``."""
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8") as fh:
            cgroup = _unit_cgroup(fh.read())
    except OSError:
        return []
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if "unitgen.inunit.watch" not in (proc.info["cmdline"] or []):
                continue
            with open(f"/proc/{proc.pid}/cgroup", encoding="utf-8") as fh:
                if _unit_cgroup(fh.read()) == cgroup:
                    found.append(proc.pid)
        except OSError:
            continue
    return found


def _liveness(findings: list[Finding], installed_text: str, info: UnitInfo, scope: str) -> None:
    watched = "unitgen.inunit.watch" in installed_text
    if info.main_pid and info.active_state == "active":
        checkers = _checkers(info.main_pid)
        if watched and checkers:
            findings.append(Finding(True, f"the liveness checker runs (pid {checkers[0]}): "
                                          "systemd restarts the server if it stops answering"))
        elif watched:
            findings.append(Finding(False, f"{info.name} has a liveness checker but none runs: "
                                           "a hang would not be noticed; restart the instance"))
    if info.n_restarts:
        reason = restart_reason(info.name, scope)
        times = "time" if info.n_restarts == 1 else "times"
        findings.append(Finding(True, f"{info.name} was restarted {info.n_restarts} {times} "
                                      f"since it was started" + (f"; last: {reason}" if reason
                                                                 else "")))


def _answer(findings: list[Finding], target: str, path: str) -> None:
    a = attempt(target, path, None, timeout=3)
    if a.outcome == "ready":
        findings.append(Finding(True, f"the health check target {target}{path} answers: {a.detail}"))
    elif a.detail.startswith("401") or a.detail.startswith("403"):
        findings.append(Finding(True, f"{target}{path} answers {a.detail.split(':')[0]} "
                                      "(the probe in the unit sends the key; this check does not)"))
    else:
        findings.append(Finding(False, f"the health check target {target}{path} does not answer: "
                                       f"{a.detail}"))


def _render(subject: str, findings: list[Finding], extra: dict[str, object]) -> Result:
    bad = [f for f in findings if not f.ok]
    lines = [f"{'ok  ' if f.ok else 'FAIL'} {f.text}" for f in findings]
    lines.append(f"{subject}: {'no problems found' if not bad else f'{len(bad)} problem(s)'}")
    return Result(data={"subject": subject, "ok": not bad, **extra,
                        "findings": [asdict(f) for f in findings]},
                  lines=tuple(lines), exit_code=EXIT_FAILURE if bad else EXIT_OK)


def doctor(name: str, scope: str) -> Result:
    """Check a unitgen instance: one port, served where the proxy forwards, probed there."""
    installed = require(scope, [name], "; for another unit use --unit UNIT --port PORT")[name]
    findings: list[Finding] = []
    public = installed.public_port
    probe_port = installed.probe_target.rpartition(":")[2]
    if probe_port == str(public):
        findings.append(Finding(True, f"the socket owns port {public} and the readiness probe "
                                      f"checks that same port"))
    else:
        findings.append(Finding(False, f"the socket owns port {public} but the probe checks "
                                       f"{installed.probe_target}: re-render the instance"))
    server_unit = installed.server_unit
    info = asyncio.run(_unit_info(server_unit, scope))
    pid, state = info.main_pid, info.active_state
    try:
        server_text = installed.files[server_unit].read_text(encoding="utf-8", errors="replace")
    except OSError:
        server_text = ""
    _liveness(findings, server_text, info, scope)
    session = Session(scope)
    try:
        feats = features(session)
        everything = scan(unit_dir(scope))
        said = [f for feat in feats for f in feat.doctor(everything, name, state == "active")]
        # a feature that runs the server's processes (a container: conmon's children,
        # other namespaces) says what runs; the health check below says what answers
        owned = any(feat.owns_processes(installed) for feat in feats)
    finally:
        session.close()
    _processes(findings, installed, pid, server_unit, state, scope, owned=owned)
    findings += said
    _answer(findings, installed.probe_target, installed.probe_path)
    return _render(name, findings, {"public_port": public, "probe_target": installed.probe_target})


def _processes(findings: list[Finding], installed: Installed, pid: int, server_unit: str,
               state: str, scope: str, *, owned: bool) -> None:
    """Where the server's process tree listens, against where the proxy forwards."""
    public = installed.public_port
    if owned:
        return
    if not pid:
        findings.append(Finding(True, f"{server_unit} is {state}: no server process to inspect "
                                      "(on-demand instances start on the first connection)"))
    else:
        ports, paths = listening(pid)
        if installed.private_unix:
            expected = installed.private_unix.replace("%t", _runtime_dir(scope))
            if expected in paths:
                findings.append(Finding(True, f"the server (pid {pid}) listens on {expected}, "
                                              "where the proxy forwards"))
            else:
                findings.append(Finding(False, f"the server (pid {pid}) does not listen on "
                                               f"{expected}, where the proxy forwards"))
        elif installed.private_port:
            if installed.private_port in ports:
                findings.append(Finding(True, f"the server (pid {pid}) listens on "
                                              f"127.0.0.1:{installed.private_port}, where the "
                                              "proxy forwards"))
            else:
                findings.append(Finding(False, f"the server (pid {pid}) does not listen on "
                                               f"{installed.private_port}, where the proxy "
                                               "forwards"))
        stray = sorted(ports - {installed.private_port, public, *installed.socket_ports})
        if stray:
            findings.append(Finding(False, f"the server also listens on port(s) "
                                           f"{', '.join(map(str, stray))}, which nothing probes or "
                                           "forwards to: a --port in its arguments or config? "
                                           "Remove it; the public port is the socket's"))
async def _infos(units: list[str], scope: str) -> dict[str, UnitInfo]:
    async with connect(scope) as m:
        return await m.info(units)


def doctor_unit(unit: str, port: int, scope: str, *, host: str = "127.0.0.1",
                path: str = "/health") -> Result:
    """Check any unit: does its process tree listen on the port its health check probes?"""
    findings: list[Finding] = []
    pid, state = asyncio.run(_main_pid(unit, scope))
    if not pid:
        findings.append(Finding(False, f"{unit} is {state} and has no main process to inspect"))
        return _render(unit, findings, {"port": port})
    ports, _ = listening(pid)
    if port in ports:
        findings.append(Finding(True, f"{unit} (pid {pid}) listens on port {port}, the port "
                                      "its health check probes"))
    elif ports:
        listed = ", ".join(map(str, sorted(ports)))
        findings.append(Finding(False, f"{unit} (pid {pid}) listens on {listed}, but the health "
                                       f"check probes {port}: it will look 'starting' for ever "
                                       "(GPUStack #2154). Make them one port: remove the --port "
                                       "from the server's arguments, or probe the port it uses; "
                                       "with unitgen the socket owns the port and both follow it"))
    else:
        findings.append(Finding(False, f"{unit} (pid {pid}) listens on no TCP port; the health "
                                       f"check probes {port}"))
    _answer(findings, f"{host}:{port}", path)
    return _render(unit, findings, {"port": port, "listening": sorted(ports)})
