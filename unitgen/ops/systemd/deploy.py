"""deploy and remove: render, write atomically, reload, enable, start and wait
for readiness over D-Bus; roll back to the previous version on failure."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from unitgen.errors import EXIT_FAILURE, EXIT_OK, OwnershipError, SpecError, UnitgenError
from unitgen.ops.allocate import HostAllocator, deploy_lock, listeners
from unitgen.ops.core import apply_changes, check_ours, files_diff, is_ours, undo_changes
from unitgen.ops.executables import SYSTEM_MANAGER_PATH, missing_program
from unitgen.ops.pipeline import Planned, plan_paths
from unitgen.ops.systemd.journal import last_lines
from unitgen.ops.systemd.manager import JobOutcome, Manager, connect
from unitgen.ops.systemd.swap import dropin_changes, installed_groups, write_dropins
from unitgen.ops.trust import check_trusted
from unitgen.plan.instance import Instance
from unitgen.plan.swap import after_change, mates_of
from unitgen.result import Result
from unitgen.spec.model import InstanceSpec
from unitgen.spec.ports import DEFAULT_PORT_RANGE
from unitgen.targets.base import RenderedFile
from unitgen.targets.systemd.installed import Installed, scan, secrets_dir, unit_dir
from unitgen.targets.systemd.render import RenderContext, SystemdTarget

__all__ = ["DeployOptions", "deploy", "remove"]

Say = Callable[[str], None]


def _rewrite_line(line: str) -> None:
    sys.stderr.write("\r\x1b[K" + line)
    sys.stderr.flush()


@dataclass(frozen=True)
class DeployOptions:
    """How deploy runs. ``say`` prints progress (stderr); ``tty`` allows a live line."""

    scope: str
    ctx: RenderContext
    dry_run: bool = False
    diff: bool = False
    wait: bool = True
    say: Say = field(default=lambda line: print(line, file=sys.stderr, flush=True))
    tty: bool = False
    # rewrites one terminal line in place (used when tty is true)
    live: Say = _rewrite_line
    port_range: tuple[int, int] = DEFAULT_PORT_RANGE
    # prints a diff before it is applied (stdout); None: diffs go only into the result
    show: Say | None = None


@dataclass
class Plan:
    """One instance's deploy: what to write, what is there now."""

    inst: Instance
    files: list[RenderedFile]
    old: dict[str, str | None]  # file name -> current text (None: absent)
    stale: list[Path]  # files of this instance no longer rendered
    stale_text: dict[Path, str]
    was_installed: bool

    @property
    def name(self) -> str:
        """Instance name."""
        return self.inst.name

    @property
    def changed_files(self) -> list[RenderedFile]:
        """Files whose content differs from what is installed."""
        return [f for f in self.files if self.old.get(f.name) != f.text]

    @property
    def changed(self) -> bool:
        """True when anything on disk would change."""
        return bool(self.changed_files or self.stale)

    @property
    def units(self) -> list[str]:
        """Unit names."""
        return [f.name for f in self.files if not f.secret]

    @property
    def entry(self) -> str:
        """What to start: the service (eager) or the socket (on-demand)."""
        eager = self.inst.spec.activation == "eager"
        return f"{self.name}.service" if eager else f"{self.name}.socket"


@dataclass
class Outcome:
    """What happened to one instance."""

    name: str
    action: str  # created, updated, unchanged, started, would-create, would-update, failed
    changed: bool
    public: str
    units: list[str]
    ready: bool | None = None  # eager: the model answered; None for on-demand
    listening: bool | None = None  # on-demand: the socket is up
    seconds: float = 0.0
    error: str = ""
    diff: str = ""
    notices: list[str] = field(default_factory=list)


def _target_dir(f: RenderedFile, scope: str) -> Path:
    return secrets_dir(scope) if f.secret else unit_dir(scope)


async def _change(m: Manager, planned: Planned, opts: DeployOptions,
                  installed: dict[str, Installed]) -> Plan:
    """What deploying one planned instance changes on disk (and refusals of
    files or units unitgen does not own)."""
    inst, files = planned.instance, list(planned.files)
    spec = inst.spec
    mine = installed.get(spec.name)
    old: dict[str, str | None] = {}
    udir = unit_dir(opts.scope)
    unit_names = [f.name for f in files if not f.secret]
    loaded = await m.info(unit_names)
    for f in files:
        path = _target_dir(f, opts.scope) / f.name
        if not f.secret:
            check_ours(path, spec.name, f"{spec.source}: ")
            info = loaded[f.name]
            if info.load_state != "not-found" and info.fragment_path not in ("", str(path)):
                raise OwnershipError(f"{spec.source}: name: unit {f.name} already exists "
                                     f"({info.fragment_path}); choose another instance name")
        try:
            old[f.name] = path.read_text(encoding="utf-8") if path.exists() else None
        except OSError as exc:
            raise UnitgenError(f"cannot read {path}: {exc.strerror}") from None
    stale: list[Path] = []
    if mine and mine.files:
        stale = [p for n, p in mine.files.items() if n not in old and p.parent == udir]
    secret = secrets_dir(opts.scope) / f"{spec.name}.env"
    if f"{spec.name}.env" not in old and is_ours(secret, spec.name):
        stale.append(secret)  # the key left the spec: its secret file goes too
    stale_text = {p: p.read_text(encoding="utf-8") for p in stale}
    return Plan(inst, files, old, stale, stale_text,
                was_installed=mine is not None and bool(mine.files))


def _diff(plan: Plan) -> str:
    return files_diff(plan.files, plan.old, plan.stale)


def _write(plan: Plan, scope: str) -> None:
    """Write the changed files and delete stale ones, all or nothing."""
    apply_changes([(_target_dir(f, scope) / f.name, f.text) for f in plan.changed_files]
                  + [(path, None) for path in plan.stale])


def _restore_plan(plan: Plan, scope: str) -> None:
    undo_changes([(_target_dir(f, scope) / f.name, plan.old.get(f.name))
                  for f in plan.changed_files] + list(plan.stale_text.items()))


async def _enable(m: Manager, plan: Plan) -> None:
    eager = plan.inst.spec.activation == "eager"
    await m.enable([f"{plan.name}.socket"] + ([f"{plan.name}.service"] if eager else []))
    if not eager:
        await m.disable([f"{plan.name}.service"])


async def _wait_start(m: Manager, plan: Plan, opts: DeployOptions) -> JobOutcome:
    backend = plan.inst.server_unit
    last_plain = [0.0]

    async def progress(elapsed: float) -> None:
        info = (await m.info([backend]))[backend]
        line = f"{plan.name}: starting, {elapsed:.0f} s, {info.active_state}/{info.sub_state}"
        if info.status_text:
            line += f": {info.status_text}"
        if opts.tty:
            opts.live(line[:200])
        elif elapsed - last_plain[0] >= 5:
            last_plain[0] = elapsed
            opts.say(line)

    timeout = plan.inst.health_timeout + 120
    return await m.job("StartUnit", plan.entry, timeout=timeout, progress=progress)


async def _why(m: Manager, plan: Plan, outcome: JobOutcome, scope: str, since: float) -> str:
    units = plan.units
    infos = await m.info(units)
    parts = [f"{plan.entry} start job ended '{outcome.result}' after {outcome.seconds:.1f} s"]
    for name in units:
        info = infos[name]
        if info.active_state == "failed" or info.result not in ("", "success"):
            detail = f"{name} {info.active_state} (Result: {info.result})"
            if info.status_text:
                detail += f": {info.status_text}"
            parts.append(detail)
    backend = plan.inst.server_unit
    lines = last_lines(backend, scope, 8, since=since)
    text = "; ".join(parts)
    if lines:
        text += ("\n  last journal lines of " + backend + " (this attempt):\n    "
                 + "\n    ".join(lines))
    return text


async def _stop_instance(m: Manager, name: str, units: list[str], *,
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


async def _run(paths: list[Path], opts: DeployOptions) -> Result:
    outcomes: list[Outcome] = []
    if opts.scope == "system" and not opts.dry_run:
        check_trusted(opts.ctx.python)
    with contextlib.ExitStack() as held:
        # Planning needs no manager: every spec, port and GPU problem of every file
        # is reported before anything is contacted or changed.
        held.enter_context(deploy_lock(opts.scope, opts.say))
        installed = scan(unit_dir(opts.scope))
        groups = installed_groups(installed)
        seen: list[InstanceSpec] = []

        def mates(spec: InstanceSpec) -> frozenset[str]:
            seen.append(spec)  # members deployed together are mates too
            return frozenset(mates_of(spec.name, after_change(groups, seen)))

        alloc = HostAllocator(opts.scope, installed, listeners(), opts.port_range, mates=mates)
        planned = plan_paths(paths, SystemdTarget(opts.ctx), alloc, unplaceable=alloc.unplaceable)
        # swap groups: every member's Conflicts= follow the member list
        swap_changes = dropin_changes(opts.scope, installed, [p.instance.spec for p in planned])
        async with connect(opts.scope) as m:
            await m.subscribe()
            path = (await m.environment()).get("PATH") or SYSTEM_MANAGER_PATH
            missing = [found for p in planned if (found := missing_program(p.instance, path))]
            if missing:
                raise SpecError(problems=missing)
            plans = [await _change(m, p, opts, installed) for p in planned]
            if opts.dry_run:
                for p in plans:
                    action = ("would-update" if p.was_installed else "would-create") if p.changed \
                        else "unchanged"
                    outcomes.append(Outcome(p.name, action, p.changed, p.inst.public.listen(),
                                            p.units, diff=_diff(p) if opts.diff else "",
                                            notices=list(p.inst.notices)))
                return _result(outcomes, dry_run=True)
            if opts.diff and opts.show is not None:
                for p in plans:  # shown before anything is applied
                    if p.changed:
                        opts.show(_diff(p).rstrip("\n"))
            await _apply(m, plans, opts, swap_changes)
            held.close()  # the new units hold their ports now: other deploys may go on
            for p in plans:
                outcomes.append(await _activate(m, p, opts))
    return _result(outcomes, dry_run=False, diff_shown=opts.show is not None)


async def _apply(m: Manager, plans: list[Plan], opts: DeployOptions,
                 swap_changes: list[tuple[Path, str | None]]) -> None:
    """Write every changed instance (and the swap groups' drop-ins), reload,
    enable; on any failure put every file of this run back as it was (all or
    nothing across specs)."""
    written: list[Plan] = []
    swap_undo: list[tuple[Path, str | None]] = []
    try:
        for p in plans:
            if p.changed:
                _write(p, opts.scope)  # all or nothing itself: undone when it raises
                written.append(p)
        swap_undo = write_dropins(swap_changes)
        if written or swap_undo:
            await m.reload()
            for p in written:
                await _enable(m, p)
            await m.reload()
    except UnitgenError:
        for p in written:
            _restore_plan(p, opts.scope)
        undo_changes(swap_undo)
        if written or swap_undo:
            with contextlib.suppress(UnitgenError):
                await m.reload()
        raise


async def _activate(m: Manager, p: Plan, opts: DeployOptions) -> Outcome:
    out = Outcome(p.name, "unchanged", p.changed, p.inst.public.listen(), p.units,
                  diff=_diff(p) if opts.diff else "", notices=list(p.inst.notices))
    since = time.time()
    if not p.changed:
        info = (await m.info([p.entry]))[p.entry]
        if info.active_state in ("active", "activating", "reloading"):
            if p.entry.endswith(".socket"):
                out.listening = info.active_state == "active"
            else:
                out.ready = info.active_state == "active"
            return out
        out.action, out.changed = "started", True
    else:
        out.action = "updated" if p.was_installed else "created"
    try:
        if p.changed and p.was_installed:
            socket_changed = any(f.name == f"{p.name}.socket" for f in p.changed_files)
            await _stop_instance(m, p.name, p.units, keep_socket=not socket_changed)
        if not opts.wait:
            await m.start_nowait(p.entry)
            opts.say(f"{p.name}: start queued ({p.entry}); not waiting (--no-wait)")
            return out
        opts.say(f"{p.name}: starting {p.entry} (public {out.public})")
        job = await _wait_start(m, p, opts)
        refused = ""
    except UnitgenError as exc:
        # systemd refused the start itself (a setting it rejects at load time):
        # this is a failed deploy like any other, and is rolled back like one.
        job, refused = JobOutcome(p.entry, "refused", time.time() - since), exc.message
    if opts.tty:
        opts.live("")
    out.seconds = round(job.seconds, 2)
    if job.ok:
        if p.entry.endswith(".socket"):
            out.listening = True
            opts.say(f"{p.name}: listening on {out.public}; the model starts on the first "
                     "connection (on-demand)")
        else:
            out.ready = True
            opts.say(f"{p.name}: ready on {out.public} after {job.seconds:.1f} s")
        return out
    out.ready = False
    reason = refused or await _why(m, p, job, opts.scope, since)
    if p.changed:
        reason += await _roll_back(m, p, opts)
    out.action, out.error = "failed", reason
    return out


async def _roll_back(m: Manager, p: Plan, opts: DeployOptions) -> str:
    """Undo one instance's failed deploy: the previous version back and running,
    or a new instance's files gone. Returns what happened, for the message."""
    with contextlib.suppress(UnitgenError):
        await _stop_instance(m, p.name, p.units)
    if p.was_installed:
        _restore_plan(p, opts.scope)
        await m.reload()
        try:
            back = await m.job("StartUnit", p.entry, timeout=p.inst.health_timeout + 120)
            state = "running again" if back.ok else f"restored but did not start ({back.result})"
        except UnitgenError as exc:
            state = f"restored but did not start ({exc.message})"
        return f"\n  the previous version of {p.name} was restored and is {state}"
    with contextlib.suppress(UnitgenError):
        await m.disable([f"{p.name}.socket", f"{p.name}.service"])
    for f in p.files:
        (_target_dir(f, opts.scope) / f.name).unlink(missing_ok=True)
    await m.reload()
    for unit in p.units:
        await m.reset_failed(unit)
    return f"\n  {p.name} was new: its units were removed again"


def _result(outcomes: list[Outcome], *, dry_run: bool, diff_shown: bool = False) -> Result:
    lines: list[str] = []
    for o in outcomes:
        if o.diff and not diff_shown:
            lines.append(o.diff.rstrip("\n"))
        status = {True: "ready", False: "NOT ready", None: ""}[o.ready]
        if o.listening:
            status = "listening (on-demand)"
        lines.append(f"{o.name}: {o.action}{', ' + status if status else ''} ({o.public}; "
                     f"{', '.join(o.units)})")
        if o.error:
            lines.append(f"error: {o.name}: {o.error}")
    failed = any(o.action == "failed" for o in outcomes)
    data = {
        "changed": any(o.changed for o in outcomes),
        "dry_run": dry_run,
        "failed": failed,
        "instances": [asdict(o) for o in outcomes],
    }
    notices = tuple(f"{o.name}: {n}" for o in outcomes for n in o.notices)
    return Result(data=data, lines=tuple(lines), warnings=notices,
                  exit_code=EXIT_FAILURE if failed else EXIT_OK)


def deploy(paths: list[Path], opts: DeployOptions) -> Result:
    """Deploy specs; see the module docstring."""
    return asyncio.run(_run(paths, opts))


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
            for name in names:
                inst = installed.get(name)
                if inst is None:
                    absent.append(name)  # already gone: nothing to do (idempotent)
                    lines.append(f"{name}: not installed (nothing to do)")
                    continue
                t0 = time.monotonic()
                # whatever state the units are in (failed, not loadable): stop what
                # can be stopped, then the files go regardless
                with contextlib.suppress(UnitgenError):
                    await _stop_instance(m, name, inst.units)
                with contextlib.suppress(UnitgenError):
                    await m.disable(inst.units)
                files = [p for p in inst.files.values() if is_ours(p, name)]
                for path in files:
                    path.unlink()
                secret = secrets_dir(scope) / f"{name}.env"
                if secret.exists():
                    secret.unlink()
                    files.append(secret)
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


def remove(names: list[str], scope: str) -> Result:
    """Stop, disable and delete exactly the files unitgen generated for ``names``."""
    return asyncio.run(_remove(names, scope))
