"""deploy and remove for the systemd target: the adapter the one deploy
transaction (:mod:`unitgen.ops.transaction`) runs on; systemd over D-Bus does
the reload, enable, start and the readiness wait (the units' own probes
decide readiness; a start job ends when they do)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from pathlib import Path

from unitgen.errors import OwnershipError, SpecError, UnitgenError
from unitgen.features.base import Feature
from unitgen.ops.allocate import HostAllocator, deploy_lock, listeners
from unitgen.ops.executables import SYSTEM_MANAGER_PATH, missing_program
from unitgen.ops.files import check_ours, is_ours, read_exact
from unitgen.ops.interface import DeployOptions, Say
from unitgen.ops.pipeline import Planned, plan_paths
from unitgen.ops.systemd.bindings import features
from unitgen.ops.systemd.journal import last_lines
from unitgen.ops.systemd.manager import Manager
from unitgen.ops.systemd.session import Session
from unitgen.ops.transaction import Change, Ready
from unitgen.ops.wait import wait_until
from unitgen.result import Result
from unitgen.spec.model import InstanceSpec
from unitgen.targets.base import RenderedFile
from unitgen.targets.systemd.installed import (
    Installed,
    config_dir,
    installed_secret,
    scan,
    secrets_dir,
    unit_dir,
)
from unitgen.targets.systemd.render import RenderContext, SystemdTarget, server_unit

__all__ = ["SystemdDeploy", "remove", "stop_instance"]
# A start job may take the probe's deadline and then some: the units' own
# TimeoutStartSec= is the probe's deadline plus a margin; this is past both.
JOB_MARGIN = 120.0


def _path(f: RenderedFile, scope: str) -> Path:
    if f.config:
        return config_dir(scope) / f.name
    return (secrets_dir(scope) if f.secret else unit_dir(scope)) / f.name


def _entry(inst_spec: InstanceSpec) -> str:
    """What to start: the service (eager) or the socket (on-demand)."""
    kind = "service" if inst_spec.activation == "eager" else "socket"
    return f"{inst_spec.name}.{kind}"


async def stop_instance(m: Manager, name: str, units: list[str], *,
                        keep_socket: bool = False) -> None:
    """Stop an instance's units, the server side first and its socket last (so the
    public port is never free while a big model takes a minute to exit), or not
    at all with ``keep_socket``: clients then wait in it for the new version."""
    order = [f"{name}.service", f"{name}-backend.service"] + ([] if keep_socket
                                                              else [f"{name}.socket"])
    for unit in order:
        if unit in units:
            await m.job("StopUnit", unit, timeout=120)
            await m.reset_failed(unit)


class SystemdDeploy:
    """The systemd target's steps of the deploy transaction, for one manager.
    D-Bus calls run on one event loop for the whole deploy (one connection)."""

    name = "systemd"

    def __init__(self, scope: str, ctx: RenderContext) -> None:
        self.scope = scope
        self.ctx = ctx
        self.python = ctx.python
        # root runs the units' probes and GPU waits: the trust check is owed
        self.root_runs_code = scope == "system"
        self.session = Session(scope)
        self.features: list[Feature] = features(self.session, ctx)
        self.installed: dict[str, Installed] = {}
        self._jobs: dict[str, tuple[str, float]] = {}  # name -> (job path, started)

    @property
    def m(self) -> Manager:
        """The connected manager (connected on first use, subscribed to jobs)."""
        return self.session.m

    def close(self) -> None:
        """Disconnect and close the event loop."""
        self.session.close()

    def lock(self, say: Say) -> contextlib.AbstractContextManager[None]:
        """Deploys to one manager wait for each other (see deploy_lock)."""
        return deploy_lock(self.scope, say)

    def plan(self, paths: Sequence[Path], opts: DeployOptions) -> list[Planned]:
        """Ports from the installed units and the host's listeners, GPUs from NVML
        (the features say whose claims are no conflict)."""
        installed = self.installed = scan(unit_dir(self.scope))
        seen: list[InstanceSpec] = []

        def mates(spec: InstanceSpec) -> frozenset[str]:
            seen.append(spec)  # instances deployed together count as installed
            return frozenset().union(*(f.cohabitants(installed, spec, seen)
                                       for f in self.features))

        alloc = HostAllocator(self.scope, installed, listeners(), opts.port_range, mates=mates,
                              secret=lambda name, var: installed_secret(self.scope, name, var))
        return plan_paths(paths, SystemdTarget(self.ctx), alloc, unplaceable=alloc.unplaceable)

    def change(self, planned: Planned) -> Change:
        """Refuse unit files or units unitgen does not own; read what is installed."""
        spec = planned.instance.spec
        units = [f.name for f in planned.files if not f.secret and not f.config]
        loaded = self.session.info(units)
        paths: dict[str, Path] = {}
        old: dict[str, str | None] = {}
        for f in planned.files:
            path = paths[f.name] = _path(f, self.scope)
            if not f.secret and not f.config:
                check_ours(path, spec.name, f"{spec.source}: ")
                info = loaded[f.name]
                if info.load_state != "not-found" and info.fragment_path not in ("", str(path)):
                    raise OwnershipError(f"{spec.source}: name: unit {f.name} already exists "
                                         f"({info.fragment_path}); choose another instance name")
            try:
                old[f.name] = read_exact(path) if path.exists() else None
            except OSError as exc:
                raise UnitgenError(f"cannot read {path}: {exc.strerror}") from None
        mine = self.installed.get(spec.name)
        stale: list[Path] = []
        if mine and mine.files:
            stale = [p for n, p in mine.files.items() if n not in old and p.parent == unit_dir(self.scope)]
        secret = secrets_dir(self.scope) / f"{spec.name}.env"
        if f"{spec.name}.env" not in old and is_ours(secret, spec.name):
            stale.append(secret)  # the key left the spec: its secret file goes too
        return Change(planned, paths, old, {p: read_exact(p) for p in stale},
                      was_installed=mine is not None and bool(mine.files), units=units,
                      notices=list(planned.instance.notices))

    def preflight(self, changes: list[Change]) -> list[tuple[Path, str | None]]:
        """Every server program must be where the manager looks (its own PATH)."""
        path = self.session.run(self.m.environment()).get("PATH") or SYSTEM_MANAGER_PATH
        missing = [found for c in changes if (found := missing_program(c.inst, path))]
        if missing:
            raise SpecError(problems=missing)
        return []

    def reload(self, written: list[Change]) -> None:
        """daemon-reload, enable what starts at boot (the socket; an eager service)."""
        async def go() -> None:
            await self.m.reload()
            for c in written:
                eager = c.inst.spec.activation == "eager"
                await self.m.enable([f"{c.name}.socket"] + ([f"{c.name}.service"] if eager else []))
                if not eager:
                    await self.m.disable([f"{c.name}.service"])
            if written:
                await self.m.reload()
        self.session.run(go())

    def running(self, change: Change) -> Ready | None:
        """Unchanged: its entry unit active (or on its way) needs nothing."""
        entry = _entry(change.inst.spec)
        info = self.session.info([entry])[entry]
        if info.active_state not in ("active", "activating", "reloading"):
            return None
        return Ready(info.active_state == "active", listening=entry.endswith(".socket"))

    def start(self, change: Change, opts: DeployOptions) -> None:
        """Stop a changed instance (keeping its socket unless that changed), queue the start."""
        entry = _entry(change.inst.spec)
        started = time.time()
        if change.reload_only:
            # only files a feature owns changed: new workers on the same socket,
            # the old ones finish what they serve
            verb = "ReloadUnit" if self.session.active(entry) else "StartUnit"
            self._jobs[change.name] = (self.session.run(self.m.queue(verb, entry)), started)
            return
        if change.changed and change.was_installed:
            socket_changed = any(f.name == f"{change.name}.socket" for f in change.changed_files)
            self.session.run(stop_instance(self.m, change.name, change.units,
                                           keep_socket=not socket_changed))
        if opts.wait:
            opts.say(f"{change.name}: starting {entry} (public {change.inst.public.listen()})")
        self._jobs[change.name] = (self.session.run(self.m.queue("StartUnit", entry)), started)

    def wait(self, change: Change, opts: DeployOptions) -> Ready:
        """Until the start job ends (the units' probes decide), with a live line."""
        job, started = self._jobs.pop(change.name)
        entry = _entry(change.inst.spec)
        server = server_unit(change.inst)
        last_plain = [0.0]
        t0 = time.monotonic()

        def progress(elapsed: float) -> None:
            info = self.session.info([server])[server]
            line = f"{change.name}: starting, {elapsed:.0f} s, {info.active_state}/{info.sub_state}"
            if info.status_text:
                line += f": {info.status_text}"
            if opts.tty:
                opts.live(line[:200])
            elif elapsed - last_plain[0] >= 5:
                last_plain[0] = elapsed
                opts.say(line)

        result = wait_until(lambda: self.session.run(self.m.finish(job, 0.5)),
                            timeout=change.inst.health_timeout + JOB_MARGIN, every=0.5,
                            progress=progress, progress_every=0.5)
        if result is None:
            self.m.forget(job)
            result = "timeout"
        if opts.tty:
            opts.live("")
        seconds = time.monotonic() - t0
        if result == "done":
            return Ready(True, seconds, listening=entry.endswith(".socket"))
        return Ready(False, seconds,
                     self.session.run(self._why(change, entry, result, seconds, started)))

    async def _why(self, c: Change, entry: str, result: str, seconds: float, since: float) -> str:
        infos = await self.m.info(c.units)
        parts = [f"{entry} start job ended '{result}' after {seconds:.1f} s"]
        for name in c.units:
            info = infos[name]
            if info.active_state == "failed" or info.result not in ("", "success"):
                detail = f"{name} {info.active_state} (Result: {info.result})"
                if info.status_text:
                    detail += f": {info.status_text}"
                parts.append(detail)
        backend = server_unit(c.inst)
        lines = last_lines(backend, self.scope, 8, since=since)
        text = "; ".join(parts)
        if lines:
            text += ("\n  last journal lines of " + backend + " (this attempt):\n    "
                     + "\n    ".join(lines))
        return text

    def restore(self, change: Change, opts: DeployOptions) -> str:
        """The previous version running again, or a new instance's units gone."""
        return self.session.run(self._restore(change))

    async def _restore(self, c: Change) -> str:
        with contextlib.suppress(UnitgenError):
            await stop_instance(self.m, c.name, c.units)
        await self.m.reload()
        if c.was_installed:
            try:
                back = await self.m.job("StartUnit", _entry(c.inst.spec),
                                        timeout=c.inst.health_timeout + JOB_MARGIN)
                state = "running again" if back.ok else f"restored but did not start ({back.result})"
            except UnitgenError as exc:
                state = f"restored but did not start ({exc.message})"
            return f"\n  the previous version of {c.name} was restored and is {state}"
        with contextlib.suppress(UnitgenError):
            await self.m.disable([f"{c.name}.socket", f"{c.name}.service"])
        await self.m.reload()
        for unit in c.units:
            await self.m.reset_failed(unit)
        return f"\n  {c.name} was new: its units were removed again"


def _remove(names: list[str], session: Session, feats: list[Feature]) -> Result:
    removed: list[dict[str, object]] = []
    absent: list[str] = []
    lines: list[str] = []
    scope, m = session.scope, session.m
    with deploy_lock(scope):
        installed = scan(unit_dir(scope))
        for f in feats:  # others stop depending on them while they still run
            lines += f.before_remove(installed, names)
        for name in names:
            inst = installed.get(name)
            if inst is None:
                absent.append(name)  # already gone: nothing to do (idempotent)
                lines.append(_absent_line(name, scope))
                continue
            t0 = time.monotonic()
            # whatever state the units are in (failed, not loadable): stop what
            # can be stopped, then the files go regardless
            with contextlib.suppress(UnitgenError):
                session.run(stop_instance(m, name, inst.units))
            extra: list[Path] = []
            for f in feats:  # what each feature takes away with it (its files, a container)
                gone, said = f.removed(inst)
                extra += gone
                lines += said
            with contextlib.suppress(UnitgenError):
                session.run(m.disable(inst.units))
            files = [p for p in inst.files.values() if is_ours(p, name)]
            for path in files:
                path.unlink()
            secret = secrets_dir(scope) / f"{name}.env"
            if secret.exists():
                secret.unlink()
                files.append(secret)
            files += extra
            removed.append({"name": name, "files": [str(p) for p in files]})
            lines.append(f"{name}: removed ({', '.join(p.name for p in files)}) "
                         f"in {time.monotonic() - t0:.1f} s")
        if removed:
            session.run(m.reload())
        for entry in removed:
            for unit in installed[str(entry["name"])].units:
                session.run(m.reset_failed(unit))
    return Result(data={"changed": bool(removed), "removed": removed, "absent": absent},
                  lines=tuple(lines))


def _absent_line(name: str, scope: str) -> str:
    """What remove says of a name that is not a unitgen instance here: nothing to
    do, or a unit of that name someone else wrote, which was left alone."""
    foreign = [p.name for p in (unit_dir(scope) / f"{name}.service",
                                unit_dir(scope) / f"{name}.socket") if p.exists()]
    if foreign:
        return (f"{name}: not a unitgen instance ({', '.join(foreign)} exists and was not "
                "generated by unitgen): left alone")
    return f"{name}: not installed (nothing to do)"


def remove(names: list[str], scope: str) -> Result:
    """Stop, disable and delete exactly the files unitgen generated for ``names``."""
    session = Session(scope)
    try:
        return _remove(names, session, features(session))
    finally:
        session.close()
