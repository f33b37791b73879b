"""deploy and remove: render, write atomically, reload, enable, start and wait
for readiness over D-Bus; roll back to the previous version on failure."""

from __future__ import annotations

import asyncio
import difflib
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from unitgen.errors import EXIT_FAILURE, EXIT_OK, OwnershipError, Problem, SpecError, UnitgenError
from unitgen.ops.allocate import Listener, check_port, deploy_lock, listeners, pick_port
from unitgen.ops.core import apply_changes, check_ours, is_ours, placement_for, undo_changes
from unitgen.ops.journal import last_lines
from unitgen.ops.swap import dropin_changes, installed_groups, write_dropins
from unitgen.ops.systemd import JobOutcome, Manager, connect
from unitgen.plan.gpus import Gpu, GpuUnavailableError, read_gpus
from unitgen.plan.instance import Instance, resolve
from unitgen.plan.swap import after_change, mates_of
from unitgen.result import Result
from unitgen.spec.model import InstanceSpec, load_spec
from unitgen.spec.ports import DEFAULT_PORT_RANGE, default_port, default_private_port, private_range_for
from unitgen.targets.systemd.installed import Installed, gpu_claims, require, scan, secrets_dir, unit_dir
from unitgen.targets.systemd.render import RenderContext, RenderedFile, render_instance

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


def _load_all(paths: list[Path]) -> list[InstanceSpec]:
    problems: list[Problem] = []
    specs: list[InstanceSpec] = []
    for path in paths:
        try:
            specs.append(load_spec(path))
        except SpecError as exc:
            problems.extend(exc.problems)
    names: dict[str, str] = {}
    for spec in specs:
        if spec.name in names:
            problems.append(Problem(spec.source, "name", f"{spec.name!r} is also the name in "
                                                         f"{names[spec.name]}"))
        names[spec.name] = spec.source
    for spec in specs:
        try:
            resolve(spec)  # the port rules, before anything talks to systemd
        except SpecError as exc:
            problems.extend(exc.problems)
    if problems:
        raise SpecError(problems=problems)
    return specs


def _target_dir(f: RenderedFile, scope: str) -> Path:
    return secrets_dir(scope) if f.secret else unit_dir(scope)


async def _plan(
    m: Manager,
    spec: InstanceSpec,
    opts: DeployOptions,
    installed: dict[str, Installed],
    busy: dict[int, Listener],
    taken: set[int],
    gpus: list[Gpu] | None,
    swap_members: dict[str, str],
) -> Plan:
    first = resolve(spec)
    mine = installed.get(spec.name)
    if first.port_from_spec:
        port = first.public.port
        check_port(port, spec.name, installed, busy)
    elif mine and mine.public_port:
        port = mine.public_port  # keep the port it already has: redeploys change nothing
    else:
        port = pick_port(spec.name, default_port(spec.name), installed, busy, taken,
                         opts.port_range)
    taken.add(port)
    private_port = None
    prange = private_range_for(opts.scope)
    if first.private is not None and first.private.kind == "tcp":
        if spec.private_port:
            private_port = spec.private_port
            check_port(private_port, spec.name, installed, busy, "private_port")
        elif mine and mine.private_port and prange[0] <= mine.private_port <= prange[1]:
            private_port = mine.private_port  # kept; one from 0.1 (20000+) moves to a privileged one
        else:
            private_port = pick_port(spec.name, default_private_port(spec.name, prange),
                                     installed, busy, taken | {port}, prange)
        taken.add(private_port)
    placement = placement_for(spec, gpu_claims(installed), gpus=gpus,
                              mates=frozenset(mates_of(spec.name, swap_members)))
    inst = resolve(spec, port=port, private_port=private_port, placement=placement,
                   private_range=prange)
    files = render_instance(inst, opts.ctx)
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
    stale = []
    if mine:
        stale = [p for n, p in mine.files.items() if n not in old and p.parent == udir]
    stale_text = {p: p.read_text(encoding="utf-8") for p in stale}
    return Plan(inst, files, old, stale, stale_text, was_installed=mine is not None)


def _diff(plan: Plan) -> str:
    chunks: list[str] = []
    for f in plan.files:
        before = plan.old.get(f.name)
        if before == f.text:
            continue
        if f.secret:
            chunks.append(f"--- {f.name} (secret, content not shown) changed\n")
            continue
        chunks.extend(difflib.unified_diff(
            (before or "").splitlines(keepends=True), f.text.splitlines(keepends=True),
            fromfile=f"a/{f.name}" if before is not None else "/dev/null", tofile=f"b/{f.name}"))
    chunks.extend(f"--- {p.name} removed\n" for p in plan.stale)
    return "".join(chunks)


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


async def _why(m: Manager, plan: Plan, outcome: JobOutcome, scope: str) -> str:
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
    lines = last_lines(backend, scope, 8)
    text = "; ".join(parts)
    if lines:
        text += "\n  last journal lines of " + backend + ":\n    " + "\n    ".join(lines)
    return text


async def _stop_instance(m: Manager, name: str, units: list[str]) -> None:
    for unit in (f"{name}.socket", f"{name}.service", f"{name}-backend.service"):
        if unit in units:
            await m.job("StopUnit", unit, timeout=120)
            await m.reset_failed(unit)


async def _run(paths: list[Path], opts: DeployOptions) -> Result:
    specs = _load_all(paths)
    outcomes: list[Outcome] = []
    async with connect(opts.scope) as m:
        await m.subscribe()
        udir = unit_dir(opts.scope)
        with deploy_lock(opts.scope):
            installed = scan(udir)
            busy = listeners()
            taken: set[int] = set()
            try:
                gpus: list[Gpu] | None = read_gpus()
            except GpuUnavailableError:
                gpus = None  # CPU-only host: GPU specs with UUIDs still render
            plans = []
            swap_members = after_change(installed_groups(installed), specs)
            swap_changes = dropin_changes(opts.scope, installed, specs)
            for s in specs:
                plan = await _plan(m, s, opts, installed, busy, taken, gpus, swap_members)
                plans.append(plan)
                if plan.inst.gpus:  # later specs in this run see this claim
                    entry = installed.setdefault(s.name, Installed(name=s.name))
                    entry.gpus, entry.gpu_share = plan.inst.gpus.uuids, plan.inst.gpus.share
            if opts.dry_run:
                for p in plans:
                    action = ("would-update" if p.was_installed else "would-create") if p.changed \
                        else "unchanged"
                    outcomes.append(Outcome(p.name, action, p.changed, p.inst.public.listen(),
                                            p.units, diff=_diff(p) if opts.diff else "",
                                            notices=list(p.inst.notices)))
                return _result(outcomes, dry_run=True)
            written: list[Plan] = []
            swap_undo: list[tuple[Path, str | None]] = []
            try:
                for p in plans:
                    if p.changed:
                        _write(p, opts.scope)
                        written.append(p)
                # swap groups: every member's Conflicts= follow the member list
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
                    await m.reload()
                raise
        for p in plans:
            outcomes.append(await _activate(m, p, opts))
    return _result(outcomes, dry_run=False)


async def _activate(m: Manager, p: Plan, opts: DeployOptions) -> Outcome:
    out = Outcome(p.name, "unchanged", p.changed, p.inst.public.listen(), p.units,
                  diff=_diff(p) if opts.diff else "", notices=list(p.inst.notices))
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
        if p.was_installed:
            await _stop_instance(m, p.name, p.units)
    if not opts.wait:
        await m.start_nowait(p.entry)
        opts.say(f"{p.name}: start queued ({p.entry}); not waiting (--no-wait)")
        return out
    opts.say(f"{p.name}: starting {p.entry} (public {out.public})")
    job = await _wait_start(m, p, opts)
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
    reason = await _why(m, p, job, opts.scope)
    if p.changed and p.was_installed:
        await _stop_instance(m, p.name, p.units)
        _restore_plan(p, opts.scope)
        await m.reload()
        back = await m.job("StartUnit", p.entry, timeout=p.inst.health_timeout + 120)
        state = "running again" if back.ok else f"restored but did not start ({back.result})"
        reason += f"\n  the previous version of {p.name} was restored and is {state}"
    elif p.changed:
        await _stop_instance(m, p.name, p.units)
        await m.disable([f"{p.name}.socket", f"{p.name}.service"])
        for f in p.files:
            (_target_dir(f, opts.scope) / f.name).unlink(missing_ok=True)
        await m.reload()
        reason += f"\n  {p.name} was new: its units were removed again"
    out.action, out.error = "failed", reason
    return out


def _result(outcomes: list[Outcome], *, dry_run: bool) -> Result:
    lines: list[str] = []
    for o in outcomes:
        if o.diff:
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
    lines: list[str] = []
    async with connect(scope) as m:
        await m.subscribe()
        with deploy_lock(scope):
            installed = require(scope, names)
            # swap groups: the remaining members stop naming the removed ones
            write_dropins(dropin_changes(scope, installed, removed=names))
            for name in names:
                inst = installed[name]
                t0 = time.monotonic()
                await _stop_instance(m, name, inst.units)
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
            await m.reload()
            for name in names:
                for unit in installed[name].units:
                    await m.reset_failed(unit)
    return Result(data={"changed": bool(removed), "removed": removed}, lines=tuple(lines))


def remove(names: list[str], scope: str) -> Result:
    """Stop, disable and delete exactly the files unitgen generated for ``names``."""
    return asyncio.run(_remove(names, scope))
