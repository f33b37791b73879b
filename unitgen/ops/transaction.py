"""The one deploy transaction, for every target:

    plan (every problem of every spec, before any manager is contacted)
    -> diff -> apply under the target's lock (all files of the run, or none)
    -> activate -> wait until ready -> roll back what did not become ready
    -> one result

A target supplies a small :class:`Adapter`: where its files go, which of them
are its own, how its manager reloads, starts, waits and restores. Everything
else (dry runs, diffs, all-or-nothing writes, the undo, what a result says)
is written once, here, and so is the order in which the features the target
binds (:mod:`unitgen.features.base`) take part: ``plan`` once every spec is
planned, ``preflight`` before anything is written, their ``files`` written
with the run's, ``reload_only`` for each changed instance, ``after`` once
every instance is up.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from unitgen.errors import EXIT_FAILURE, EXIT_OK, Problem, SpecError, UnitgenError
from unitgen.features.base import Feature, InstalledLike
from unitgen.ops.files import apply_changes, files_diff, undo_changes
from unitgen.ops.interface import DeployOptions, Say
from unitgen.ops.pipeline import Planned
from unitgen.ops.trust import check_trusted
from unitgen.plan.instance import Instance
from unitgen.result import Result
from unitgen.targets.base import RenderedFile

__all__ = ["Adapter", "Change", "Outcome", "Ready", "run"]


@dataclass
class Change:
    """One instance's deploy: its files, what is installed now, what goes."""

    planned: Planned
    paths: dict[str, Path]  # file name -> where it is installed
    old: dict[str, str | None]  # file name -> installed text (None: absent)
    stale: dict[Path, str] = field(default_factory=dict)  # installed, no longer rendered
    was_installed: bool = False
    units: list[str] = field(default_factory=list)  # what the result lists (units, programs)
    notices: list[str] = field(default_factory=list)
    extra: Any = None  # the adapter's own (the installed version, say)
    # only files a feature owns changed (a gateway's routes): reloading is enough
    reload_only: bool = False

    @property
    def inst(self) -> Instance:
        """The planned instance."""
        return self.planned.instance

    @property
    def name(self) -> str:
        """Instance name."""
        return self.planned.instance.name

    @property
    def files(self) -> tuple[RenderedFile, ...]:
        """Every rendered file."""
        return self.planned.files

    @property
    def changed_files(self) -> list[RenderedFile]:
        """Files whose content differs from what is installed."""
        return [f for f in self.files if self.old.get(f.name) != f.text]

    @property
    def changed(self) -> bool:
        """True when anything on disk would change."""
        return bool(self.changed_files or self.stale)

    def writes(self) -> list[tuple[Path, str | None]]:
        """For :func:`apply_changes`: the changed files, and the stale ones deleted."""
        return ([(self.paths[f.name], f.text) for f in self.changed_files]
                + [(p, None) for p in self.stale])

    def undo(self) -> list[tuple[Path, str | None]]:
        """What puts the installed version back."""
        return ([(self.paths[f.name], self.old.get(f.name)) for f in self.changed_files]
                + list(self.stale.items()))

    def diff(self) -> str:
        """What deploying would change, as a unified diff (secrets not shown)."""
        return files_diff(self.files, self.old, list(self.stale))


@dataclass
class Outcome:
    """What happened to one instance."""

    name: str
    action: str  # created, updated, unchanged, started, would-create, would-update, failed
    changed: bool
    public: str
    units: list[str]
    ready: bool | None = None  # the model answered (None: on-demand, not waited for)
    listening: bool | None = None  # on-demand: the socket is up
    seconds: float = 0.0
    error: str = ""
    diff: str = ""
    notices: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Ready:
    """How activating one instance ended."""

    ok: bool
    seconds: float = 0.0
    reason: str = ""
    listening: bool = False  # ok, and only the socket was started (on-demand)


class Adapter(Protocol):
    """What a target does at each step of the transaction."""

    name: str
    python: str  # the interpreter the installed files run
    root_runs_code: bool  # root runs that interpreter and unitgen's modules: check them
    features: list[Feature]  # the features this target binds (features.registry.bind)

    @property
    def installed(self) -> Mapping[str, InstalledLike]:
        """What is installed (read by :meth:`plan`)."""
        ...

    def close(self) -> None:
        """Let go of the manager (connections, event loops)."""
        ...

    def lock(self, say: Say) -> contextlib.AbstractContextManager[None]:
        """Held while planning and writing: two deploys never pick one port."""
        ...

    def plan(self, paths: Sequence[Path], opts: DeployOptions) -> list[Planned]:
        """The installed instances read, ports and GPUs allocated, every spec planned
        and rendered (SpecError with every problem)."""
        ...

    def change(self, planned: Planned) -> Change:
        """Where its files go and what is there; refuse files and names unitgen
        does not own."""
        ...

    def preflight(self, changes: list[Change]) -> list[tuple[Path, str | None]]:
        """Last checks against the manager before anything is written (a program
        it cannot find, say); returns further files to write with the run."""
        ...

    def reload(self, written: list[Change]) -> None:
        """Make the manager read the written files (and enable what must start)."""
        ...

    def running(self, change: Change) -> Ready | None:
        """An unchanged instance that is up (None: it must be started)."""
        ...

    def start(self, change: Change, opts: DeployOptions) -> None:
        """Start (or restart, for a changed one) an instance; return without waiting."""
        ...

    def wait(self, change: Change, opts: DeployOptions) -> Ready:
        """Wait until the started instance answers, fails or times out."""
        ...

    def restore(self, change: Change, opts: DeployOptions) -> str:
        """After a failed start, with the previous files back: bring the previous
        version back (or a new instance's traces away); say what happened."""
        ...


def run(adapter: Adapter, paths: Sequence[Path], opts: DeployOptions) -> Result:
    """Deploy ``paths`` through ``adapter``; see the module docstring."""
    try:
        return _run(adapter, paths, opts)
    finally:
        adapter.close()


def _run(adapter: Adapter, paths: Sequence[Path], opts: DeployOptions) -> Result:
    if adapter.root_runs_code and not opts.dry_run:
        check_trusted(adapter.python)  # before anything: what root will run is root's alone
    with contextlib.ExitStack() as held:
        held.enter_context(adapter.lock(opts.say))
        planned = adapter.plan(paths, opts)
        notices = [n for f in adapter.features for n in f.plan(adapter.installed, planned)]
        changes = [adapter.change(p) for p in planned]
        for c in changes:
            c.notices += [n.split(": ", 1)[1] for n in notices if n.startswith(f"{c.name}: ")]
        try:
            extra = adapter.preflight(changes)
            problems: list[Problem] = []
        except SpecError as exc:
            extra, problems = [], list(exc.problems)
        problems += [p for f in adapter.features for p in f.preflight(planned)]
        for f in adapter.features:
            problems = problems or f.prepare(planned, opts.say, dry_run=opts.dry_run)
        if problems:
            raise SpecError(problems=problems)
        extra += [w for f in adapter.features for w in f.files()]
        for c in changes:
            changed = [f.name for f in c.changed_files]
            c.reload_only = bool(c.was_installed and changed and not c.stale and any(
                f.reload_only(c.planned, changed) for f in adapter.features))
        if opts.dry_run:
            return _result(adapter.name, [_would(c, opts) for c in changes], dry_run=True)
        if opts.diff and opts.show is not None:
            for c in changes:  # shown before anything is applied
                if c.changed:
                    opts.show(c.diff().rstrip("\n"))
        _apply(adapter, changes, extra)
        held.close()  # the new files hold their ports now: other deploys may go on
        outcomes = [_activate(adapter, c, opts) for c in changes]
        for f in adapter.features:  # e.g. gateways reloaded once their members answer
            f.after(opts.say)
    return _result(adapter.name, outcomes, dry_run=False, diff_shown=opts.show is not None)


def _would(c: Change, opts: DeployOptions) -> Outcome:
    action = ("would-update" if c.was_installed else "would-create") if c.changed else "unchanged"
    return Outcome(c.name, action, c.changed, c.inst.public.listen(), c.units,
                   diff=c.diff() if opts.diff else "", notices=list(c.notices))


def _apply(adapter: Adapter, changes: list[Change], extra: list[tuple[Path, str | None]]) -> None:
    """Write every changed instance (and the adapter's extra files), then reload;
    on any failure every file of this run is put back (all or nothing)."""
    undo: list[list[tuple[Path, str | None]]] = []
    written = [c for c in changes if c.changed]
    try:
        for c in written:
            undo.append(apply_changes(c.writes()))  # all or nothing itself
        undo.append(apply_changes(extra))
        if written or extra:
            adapter.reload(written)
    except UnitgenError:
        for done in reversed(undo):
            undo_changes(done)
        if written or extra:
            with contextlib.suppress(UnitgenError):
                adapter.reload([])
        raise


def _activate(adapter: Adapter, c: Change, opts: DeployOptions) -> Outcome:
    out = Outcome(c.name, "unchanged", c.changed, c.inst.public.listen(), c.units,
                  diff=c.diff() if opts.diff else "", notices=list(c.notices))
    if not c.changed:
        up = adapter.running(c)
        if up is not None:
            out.ready = None if up.listening else up.ok
            out.listening = True if up.listening else None
            return out
        out.action, out.changed = "started", True
    else:
        out.action = "updated" if c.was_installed else "created"
    try:
        adapter.start(c, opts)
    except UnitgenError as exc:
        # the manager refused the start itself (a setting it rejects at load
        # time): a failed deploy like any other, rolled back like one
        ready = Ready(False, reason=exc.message)
    else:
        if not opts.wait:
            opts.say(f"{c.name}: start queued; not waiting (--no-wait)")
            return out
        ready = adapter.wait(c, opts)
    out.seconds = round(ready.seconds, 2)
    if ready.ok:
        if ready.listening:
            out.listening = True
            opts.say(f"{c.name}: listening on {out.public}; the model starts on the first "
                     "connection (on-demand)")
        else:
            out.ready = True
            opts.say(f"{c.name}: ready on {out.public} after {ready.seconds:.1f} s")
        return out
    out.ready = False
    reason = ready.reason
    if c.changed:
        undo_changes(c.undo())
        reason += adapter.restore(c, opts)
    out.action, out.error = "failed", reason
    return out


def _result(target: str, outcomes: list[Outcome], *, dry_run: bool,
            diff_shown: bool = False) -> Result:
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
        "target": target,
        "instances": [asdict(o) for o in outcomes],
    }
    notices = tuple(f"{o.name}: {n}" for o in outcomes for n in o.notices)
    return Result(data=data, lines=tuple(lines), warnings=notices,
                  exit_code=EXIT_FAILURE if failed else EXIT_OK)
