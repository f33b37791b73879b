"""deploy and remove for the systemd target: the adapter the one deploy
transaction (:mod:`unitgen.ops.transaction`) runs on; systemd over D-Bus does
the reload, enable, start and the readiness wait (the units' own probes
decide readiness; a start job ends when they do)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from unitgen.errors import OwnershipError, SpecError, UnitgenError
from unitgen.ops.allocate import HostAllocator, deploy_lock, listeners
from unitgen.ops.executables import SYSTEM_MANAGER_PATH, missing_program
from unitgen.ops.files import apply_changes, check_ours, is_ours, read_exact
from unitgen.ops.interface import DeployOptions, Say
from unitgen.ops.pipeline import Planned, plan_paths
from unitgen.ops.podman import host_podman, pull_missing, remove_container, spec_problems
from unitgen.ops.systemd.gateways import (
    affected,
    config_path,
    installed_key,
    key_file_problems,
    remove_gateway_files,
    rerender,
    validate,
)
from unitgen.ops.systemd.journal import last_lines
from unitgen.ops.systemd.manager import Manager, connect
from unitgen.ops.systemd.swap import dropin_changes, installed_groups, write_dropins
from unitgen.ops.transaction import Change, Ready
from unitgen.ops.wait import wait_until
from unitgen.plan.swap import after_change, mates_of
from unitgen.result import Result
from unitgen.spec.model import InstanceSpec
from unitgen.targets.base import RenderedFile
from unitgen.targets.systemd.gateway import config_root
from unitgen.targets.systemd.installed import Installed, scan, secrets_dir, unit_dir
from unitgen.targets.systemd.render import RenderContext, SystemdTarget

__all__ = ["SystemdDeploy", "remove", "stop_instance"]

T = TypeVar("T")
# A start job may take the probe's deadline and then some: the units' own
# TimeoutStartSec= is the probe's deadline plus a margin; this is past both.
JOB_MARGIN = 120.0


def _path(f: RenderedFile, scope: str) -> Path:
    if f.config:
        return config_path(scope, f)
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
        self._runner = asyncio.Runner()
        self._conn: connect | None = None
        self._m: Manager | None = None
        self._installed: dict[str, Installed] = {}
        self._swap: list[tuple[Path, str | None]] = []
        self._jobs: dict[str, tuple[str, float]] = {}  # name -> (job path, started)
        self._gateways: list[str] = []
        self._gateway_files: list[tuple[Path, str]] = []
        self._reload: list[str] = []
        self._notices: list[str] = []

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._runner.run(coro)

    @property
    def m(self) -> Manager:
        """The connected manager (connected on first use, subscribed to jobs)."""
        if self._m is None:
            self._conn = connect(self.scope)
            self._m = self._run(self._conn.__aenter__())
            self._run(self._m.subscribe())
        return self._m

    def close(self) -> None:
        """Disconnect and close the event loop."""
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._run(self._conn.__aexit__(None, None, None))
        self._runner.close()

    def lock(self, say: Say) -> contextlib.AbstractContextManager[None]:
        """Deploys to one manager wait for each other (see deploy_lock)."""
        return deploy_lock(self.scope, say)

    def plan(self, paths: Sequence[Path], opts: DeployOptions) -> list[Planned]:
        """Ports from the installed units and the host's listeners, GPUs from NVML;
        the swap groups' drop-ins follow the member lists."""
        self._opts = opts  # preflight pulls images with its progress lines
        installed = self._installed = scan(unit_dir(self.scope))
        groups = installed_groups(installed)
        seen: list[InstanceSpec] = []

        def mates(spec: InstanceSpec) -> frozenset[str]:
            seen.append(spec)  # members deployed together are mates too
            return frozenset(mates_of(spec.name, after_change(groups, seen)))

        alloc = HostAllocator(self.scope, installed, listeners(), opts.port_range, mates=mates,
                              member_key=lambda m: installed_key(self.scope, m))
        planned = plan_paths(paths, SystemdTarget(self.ctx), alloc, unplaceable=alloc.unplaceable)
        self._swap = dropin_changes(self.scope, installed, [p.instance.spec for p in planned])
        # gateways routing to the run's instances: their HAProxy files follow
        self._gateways = sorted(affected(installed, planned))
        self._gateway_files = [(config_path(self.scope, f), f.text) for g in self._gateways
                               for f in rerender(self.scope, g, installed, planned)]
        if found := key_file_problems(planned, self.scope):
            raise SpecError(problems=found)
        for p in planned:
            if p.instance.gateway is not None:
                validate(str(p.path), p.instance.gateway)
            elif p.instance.spec.gateway and not (p.instance.spec.gateway in installed or any(
                    q.instance.name == p.instance.spec.gateway for q in planned)):
                self._notices.append(f"{p.instance.name}: gateway {p.instance.spec.gateway!r} "
                                     "is not deployed here yet: its routes come with it")
        return planned

    def change(self, planned: Planned) -> Change:
        """Refuse unit files or units unitgen does not own; read what is installed."""
        spec = planned.instance.spec
        units = [f.name for f in planned.files if not f.secret and not f.config]
        loaded = self._run(self.m.info(units))
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
        mine = self._installed.get(spec.name)
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
        path = self._run(self.m.environment()).get("PATH") or SYSTEM_MANAGER_PATH
        missing = [found for c in changes if (found := missing_program(c.inst, path))]
        missing += [p for c in changes for p in spec_problems(c.inst, self.ctx.podman)]
        if not missing:  # images: explicit pulls, each with its own deadline
            missing = pull_missing([c.inst for c in changes], self.ctx.podman, self._opts.say,
                                   dry_run=self._opts.dry_run)
        if missing:
            raise SpecError(problems=missing)
        for c in changes:
            c.notices += [n for n in self._notices if n.startswith(f"{c.name}: ")]
        changed = [(p, t) for p, t in self._gateway_files
                   if not p.exists() or read_exact(p) != t]
        self._reload = [g for g in self._gateways
                        if any(str(p).startswith(f"{config_root(self.scope)}/unitgen/gateways/{g}/")
                               or p == secrets_dir(self.scope) / f"{g}.env" for p, _ in changed)]
        return self._swap + changed

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
        self._run(go())

    def running(self, change: Change) -> Ready | None:
        """Unchanged: its entry unit active (or on its way) needs nothing."""
        entry = _entry(change.inst.spec)
        info = self._run(self.m.info([entry]))[entry]
        if info.active_state not in ("active", "activating", "reloading"):
            return None
        return Ready(info.active_state == "active", listening=entry.endswith(".socket"))

    def start(self, change: Change, opts: DeployOptions) -> None:
        """Stop a changed instance (keeping its socket unless that changed), queue the start."""
        entry = _entry(change.inst.spec)
        started = time.time()
        if change.inst.gateway is not None and change.was_installed and change.changed and all(
                f.config or f.secret for f in change.changed_files) and not change.stale:
            # only its routes changed: new workers on the same socket, the old ones
            # finish what they serve
            verb = "ReloadUnit" if self._active(entry) else "StartUnit"
            self._jobs[change.name] = (self._run(self.m.queue(verb, entry)), started)
            return
        if change.changed and change.was_installed:
            socket_changed = any(f.name == f"{change.name}.socket" for f in change.changed_files)
            self._run(stop_instance(self.m, change.name, change.units,
                                    keep_socket=not socket_changed))
        if opts.wait:
            opts.say(f"{change.name}: starting {entry} (public {change.inst.public.listen()})")
        self._jobs[change.name] = (self._run(self.m.queue("StartUnit", entry)), started)

    def _active(self, unit: str) -> bool:
        return self._run(self.m.info([unit]))[unit].active_state == "active"

    def after(self, opts: DeployOptions) -> None:
        """Reload the gateways whose routes changed (their members are up now)."""
        for g in self._reload:
            unit = f"{g}.service"
            if self._active(unit):
                done = self._run(self.m.job("ReloadUnit", unit, timeout=60))
                opts.say(f"{g}: gateway reloaded ({done.result}): its routes follow")

    def wait(self, change: Change, opts: DeployOptions) -> Ready:
        """Until the start job ends (the units' probes decide), with a live line."""
        job, started = self._jobs.pop(change.name)
        entry = _entry(change.inst.spec)
        server = change.inst.server_unit
        last_plain = [0.0]
        t0 = time.monotonic()

        def progress(elapsed: float) -> None:
            info = self._run(self.m.info([server]))[server]
            line = f"{change.name}: starting, {elapsed:.0f} s, {info.active_state}/{info.sub_state}"
            if info.status_text:
                line += f": {info.status_text}"
            if opts.tty:
                opts.live(line[:200])
            elif elapsed - last_plain[0] >= 5:
                last_plain[0] = elapsed
                opts.say(line)

        result = wait_until(lambda: self._run(self.m.finish(job, 0.5)),
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
        return Ready(False, seconds, self._run(self._why(change, entry, result, seconds, started)))

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
        backend = c.inst.server_unit
        lines = last_lines(backend, self.scope, 8, since=since)
        text = "; ".join(parts)
        if lines:
            text += ("\n  last journal lines of " + backend + " (this attempt):\n    "
                     + "\n    ".join(lines))
        return text

    def restore(self, change: Change, opts: DeployOptions) -> str:
        """The previous version running again, or a new instance's units gone."""
        return self._run(self._restore(change))

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


async def _remove(names: list[str], scope: str) -> Result:
    removed: list[dict[str, object]] = []
    absent: list[str] = []
    lines: list[str] = []
    async with connect(scope) as m:
        await m.subscribe()
        with deploy_lock(scope):
            installed = scan(unit_dir(scope))
            # swap groups: the remaining members stop naming the removed ones
            write_dropins(dropin_changes(scope, installed,
                                         removed=[n for n in names if n in installed]))
            # gateways stop routing to the removed ones before they stop
            for g in sorted(affected(installed, [], removed=names) - set(names)):
                apply_changes([(config_path(scope, f), f.text)
                               for f in rerender(scope, g, installed, [], removed=names)])
                if (await m.info([f"{g}.service"]))[f"{g}.service"].active_state == "active":
                    await m.job("ReloadUnit", f"{g}.service", timeout=60)
                    lines.append(f"{g}: gateway reloaded: no route to "
                                 f"{', '.join(n for n in names if n in installed)} any more")
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
                    await stop_instance(m, name, inst.units)
                if inst.container and remove_container(host_podman(), inst.container):
                    lines.append(f"{name}: container {inst.container} removed")
                with contextlib.suppress(UnitgenError):
                    await m.disable(inst.units)
                files = [p for p in inst.files.values() if is_ours(p, name)]
                for path in files:
                    path.unlink()
                secret = secrets_dir(scope) / f"{name}.env"
                if secret.exists():
                    secret.unlink()
                    files.append(secret)
                if inst.is_gateway:
                    files += remove_gateway_files(scope, name)
                removed.append({"name": name, "files": [str(p) for p in files]})
                lines.append(f"{name}: removed ({', '.join(p.name for p in files)}) "
                             f"in {time.monotonic() - t0:.1f} s")
            if removed:
                await m.reload()
            for entry in removed:
                for unit in installed[str(entry["name"])].units:
                    await m.reset_failed(unit)
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
    return asyncio.run(_remove(names, scope))
