"""deploy and remove for the supervisor target: render, write atomically,
``reloadConfig`` and then remove/add only the changed process groups of our own
instances (what ``supervisorctl update`` does, minus other people's programs);
wait until the public port answers the health path; put the previous version
back when a changed instance does not become ready."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import stat
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from unitgen.errors import EXIT_FAILURE, EXIT_OK, OwnershipError, UnitgenError
from unitgen.inunit.probe import attempt
from unitgen.ops.allocate import HostAllocator, listeners
from unitgen.ops.core import apply_changes, check_ours, files_diff, is_ours, undo_changes
from unitgen.ops.pipeline import Planned, plan_paths
from unitgen.ops.supervisor.rpc import SupervisorRPC
from unitgen.ops.supervisor.site import Site
from unitgen.ops.trust import check_trusted
from unitgen.plan.instance import Instance
from unitgen.result import Result
from unitgen.spec.ports import DEFAULT_PORT_RANGE
from unitgen.targets.supervisor.installed import InstalledConf, require, scan
from unitgen.targets.supervisor.render import (
    ConfFile,
    SupervisorTarget,
    conf_name,
    group_names,
    secret_name,
    target_notices,
)

__all__ = ["Options", "deploy", "last_log_lines", "remove"]

Say = Callable[[str], None]
# supervisord's state names (supervisor/states.py)
GAVE_UP = ("FATAL",)
DOWN = ("STOPPED", "EXITED", "FATAL", "UNKNOWN")


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Options:
    """How deploy runs. ``say`` prints progress (stderr)."""

    dry_run: bool = False
    diff: bool = False
    wait: bool = True
    port_range: tuple[int, int] = DEFAULT_PORT_RANGE
    say: Say = field(default=_stderr)
    poll: float = 0.2


@dataclass
class Plan:
    """One instance's deploy: what to write, what is there now."""

    inst: Instance
    files: list[ConfFile]
    paths: dict[str, Path]
    old: dict[str, str | None]
    installed: InstalledConf | None
    stale: list[Path]  # files of the installed version no longer rendered (the secret)

    @property
    def name(self) -> str:
        """Instance name."""
        return self.inst.name

    @property
    def groups(self) -> list[str]:
        """Process groups of the new version."""
        return group_names(self.inst)

    @property
    def all_groups(self) -> list[str]:
        """Groups of the new and of the installed version."""
        old = self.installed.groups if self.installed else []
        return list(dict.fromkeys([*self.groups, *old]))

    @property
    def changed_files(self) -> list[ConfFile]:
        """Files whose content differs from what is installed."""
        return [f for f in self.files if self.old.get(f.name) != f.text]

    @property
    def changed(self) -> bool:
        """True when anything on disk would change."""
        return bool(self.changed_files or self.stale)

    def changes(self) -> list[tuple[Path, str | None]]:
        """For apply_changes: write the changed files, delete stale ones."""
        return ([(self.paths[f.name], f.text) for f in self.changed_files]
                + [(p, None) for p in self.stale])


@dataclass
class Outcome:
    """What happened to one instance."""

    name: str
    action: str  # created, updated, unchanged, started, would-create, would-update, failed
    changed: bool
    public: str
    programs: list[str]
    ready: bool | None = None
    seconds: float = 0.0
    error: str = ""
    diff: str = ""
    notices: list[str] = field(default_factory=list)


@contextlib.contextmanager
def _lock(conf_dir: Path) -> Iterator[None]:
    """Serialize deploys to one include directory (two never pick the same port)."""
    try:
        fd = os.open(conf_dir / ".unitgen.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise UnitgenError(f"cannot use {conf_dir}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _plan(planned: Planned, target: Site, installed: dict[str, InstalledConf],
          foreign: set[str]) -> Plan:
    """What deploying one planned instance changes on disk (and refusals of
    files or programs unitgen did not write)."""
    inst, files = planned.instance, list(planned.files)
    spec = inst.spec
    for group in group_names(inst):
        if group in foreign:
            raise OwnershipError(f"{spec.source}: name: supervisord already runs a program "
                                 f"group {group!r} that unitgen did not write; choose another "
                                 "instance name")
    paths: dict[str, Path] = {}
    old: dict[str, str | None] = {}
    for f in files:
        path = (target.secrets_dir if f.secret else target.conf_dir) / f.name
        if not f.secret:
            check_ours(path, spec.name, f"{spec.source}: ")
        paths[f.name] = path
        try:
            old[f.name] = path.read_text(encoding="utf-8") if path.exists() else None
        except OSError as exc:
            raise UnitgenError(f"cannot read {path}: {exc.strerror}") from None
    stale: list[Path] = []
    secret = target.secrets_dir / secret_name(spec.name)
    if secret_name(spec.name) not in paths and secret.exists():
        stale.append(secret)
    elif secret_name(spec.name) in paths and not _root_only(secret):
        # a secret file someone else owns or may read (0.x handed it to the user)
        # is written again, root's and 0600: the wrapper refuses any other
        old[secret_name(spec.name)] = None
    return Plan(inst, files, paths, old, installed.get(spec.name), stale)


def _root_only(path: Path) -> bool:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return True
    return not stat.S_ISLNK(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077


def _diff(plan: Plan) -> str:
    return files_diff(plan.files, plan.old, plan.stale)


def _apply_groups(rpc: SupervisorRPC, groups: list[str],
                  diff: tuple[list[str], list[str], list[str]]) -> None:
    """What ``supervisorctl update`` does, for these groups only."""
    added, changed, removed = diff
    for g in groups:  # the public group first: it stops taking connections first
        if g in removed or g in changed:
            rpc.remove_group(g)
    for g in reversed(groups):  # the server first, then the public socket
        if g in changed or g in added:
            rpc.add_group(g)


def _process_states(rpc: SupervisorRPC) -> dict[str, dict[str, object]]:
    return {f"{p['group']}:{p['name']}" if p["group"] != p["name"] else str(p["name"]): p
            for p in rpc.processes()}


def last_log_lines(rpc: SupervisorRPC, program: str, count: int = 8) -> list[str]:
    """The last lines a program wrote (stdout, with stderr redirected into it)."""
    try:
        text, _, _ = rpc.tail(program, 0, 8192)
    except UnitgenError:
        return []
    return [ln for ln in text.splitlines() if ln.strip()][-count:]


def _key(inst: Instance) -> str | None:
    return dict(inst.secrets).get(inst.probe_key_env or "") if inst.probe_key_env else None


def _wait_ready(rpc: SupervisorRPC, inst: Instance, opts: Options) -> tuple[bool, float, str]:
    """Poll the PUBLIC port with the probe code until ready, supervisord gave up,
    or the [health] timeout. Returns (ready, seconds, reason)."""
    target = inst.public.probe_target()
    server = f"{inst.name}-backend"
    start = time.monotonic()
    deadline = start + inst.health_timeout
    next_say = start + 5
    while True:
        result = attempt(target, inst.health_path, _key(inst), timeout=5.0)
        now = time.monotonic()
        if result.outcome == "ready":
            return True, now - start, ""
        if result.outcome == "fatal":
            return False, now - start, f"public {target}{inst.health_path}: {result.detail}"
        state = _process_states(rpc).get(server, {})
        if state.get("statename") in GAVE_UP:
            why = state.get("spawnerr") or state.get("description") or ""
            return False, now - start, (f"supervisord gave up on {server} "
                                        f"({state.get('statename')}: {why}); last answer on "
                                        f"{target}: {result.detail}")
        if now >= deadline:
            return False, now - start, (f"public {target}{inst.health_path}: not ready after "
                                        f"{inst.health_timeout:g} s (the [health] timeout); "
                                        f"last answer: {result.detail}")
        if now >= next_say:
            opts.say(f"{inst.name}: starting, {now - start:.0f} s, "
                     f"{state.get('statename', '?')}: {result.detail}")
            next_say = now + 5
        time.sleep(opts.poll)


def _needs_start(states: dict[str, dict[str, object]], plan: Plan) -> bool:
    for group in plan.groups:
        info = states.get(group)
        if info is None or info.get("statename") in DOWN:
            return True
    return False


def deploy(paths: list[Path], target: Site, opts: Options) -> Result:
    """Deploy specs to supervisord; see the module docstring. Specs go through the
    same pipeline as the systemd target (unitgen.ops.pipeline): every problem of
    every file before supervisord is contacted or a file changes."""
    outcomes: list[Outcome] = []
    if os.geteuid() == 0 and not opts.dry_run:
        # supervisord runs unitgen's wrappers as root
        check_trusted(target.ctx.python)
    _mkdir(target.conf_dir)
    _check_run_dir(Path(target.ctx.run_dir))
    with _lock(target.conf_dir):
        installed = scan(target.conf_dir)
        # private ports are privileged: supervisord runs as root, and the wrapper
        # gives a server run as ``user`` the right to bind its own one only
        alloc = HostAllocator("system", installed, listeners(), opts.port_range)
        planned = plan_paths(paths, SupervisorTarget(target.ctx), alloc,
                             unplaceable=alloc.unplaceable)
        rpc = target.rpc(timeout=None)
        ours = {g for conf in installed.values() for g in conf.groups}
        states = _process_states(rpc)
        foreign = {str(p["group"]) for p in states.values()} - ours
        plans = [_plan(p, target, installed, foreign) for p in planned]
        if opts.dry_run:
            for p in plans:
                action = ("would-update" if p.installed else "would-create") if p.changed \
                    else "unchanged"
                outcomes.append(Outcome(p.name, action, p.changed, p.inst.public.listen(),
                                        p.groups, diff=_diff(p) if opts.diff else "",
                                        notices=_notices(p.inst)))
            return _result(outcomes, dry_run=True)
        written: list[tuple[Plan, list[tuple[Path, str | None]]]] = []
        _log_dir(Path(target.ctx.log_dir))
        try:
            for p in plans:
                if p.changed:
                    _check_user(p.inst)
                    written.append((p, apply_changes(p.changes())))
            diff = rpc.reload_config()
        except UnitgenError:
            for _, undo in reversed(written):
                undo_changes(undo)
            raise
        undo_of = {p.name: undo for p, undo in written}
        for p in plans:
            outcomes.append(_activate(rpc, p, undo_of.get(p.name), diff, states, opts))
    return _result(outcomes, dry_run=False)


def _check_user(inst: Instance) -> None:
    """The wrapper runs the server as ``user``: it must exist here."""
    user = inst.spec.user
    if user is None:
        return
    try:
        pwd.getpwnam(user)
    except KeyError:
        raise UnitgenError(f"{inst.spec.source}: user: no such user {user!r}") from None


def _check_run_dir(run: Path) -> None:
    """Root makes each instance's runtime directory in ``run`` and hands it to the
    server's user: a ``run`` another user can write would let them plant a link
    there (``unitgen-NAME -> /etc``), so it is refused."""
    try:
        run.mkdir(parents=True, exist_ok=True, mode=0o755)
        st = run.stat()
    except OSError as exc:
        raise UnitgenError(f"cannot create {run}: {exc.strerror}") from None
    if os.geteuid() == 0 and (st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
        raise UnitgenError(f"the run directory {run} can be written by a user other than root "
                           f"(owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}); root "
                           "makes each instance's socket directory there: use a directory only "
                           "root can write (UNITGEN_SUPERVISOR_RUN_DIR; docs/supervisor.md)")


def _log_dir(directory: Path) -> None:
    """supervisord does not create log directories. The servers' logs can hold
    prompts (vLLM's request log): the directory is root's alone (0700)."""
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = directory.stat()
        if st.st_uid == os.geteuid() and st.st_mode & 0o077:
            directory.chmod(0o700)
    except OSError as exc:
        raise UnitgenError(f"cannot create {directory}: {exc.strerror}") from None


def _mkdir(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UnitgenError(f"cannot create {directory}: {exc.strerror}") from None


def _notices(inst: Instance) -> list[str]:
    return [*inst.notices, *target_notices(inst)]


def _activate(rpc: SupervisorRPC, p: Plan, undo: list[tuple[Path, str | None]] | None,
              diff: tuple[list[str], list[str], list[str]],
              states: dict[str, dict[str, object]], opts: Options) -> Outcome:
    out = Outcome(p.name, "unchanged", p.changed, p.inst.public.listen(), p.groups,
                  diff=_diff(p) if opts.diff else "", notices=_notices(p.inst))
    if undo is None:
        if not _needs_start(states, p):
            out.ready = _answers(p.inst)
            return out
        out.action, out.changed = "started", True
        _apply_groups(rpc, p.groups, diff)
        for group in p.groups:
            info = states.get(group)
            if info is not None and info.get("statename") in DOWN:
                rpc.fault_code("startProcessGroup", group, False)
    else:
        out.action = "updated" if p.installed else "created"
        if any(f.secret for f in p.changed_files):
            # only the secret file changed (a rotated key): supervisord sees no
            # change, yet the server and the proxy read the file at start
            added, changed, removed = diff
            diff = (added, sorted({*changed, *(g for g in p.groups if g not in added)}),
                    removed)
        _apply_groups(rpc, p.all_groups, diff)
    if not opts.wait:
        opts.say(f"{p.name}: started; not waiting (--no-wait)")
        return out
    opts.say(f"{p.name}: starting (public {out.public})")
    ok, seconds, reason = _wait_ready(rpc, p.inst, opts)
    out.seconds, out.ready = round(seconds, 2), ok
    if ok:
        opts.say(f"{p.name}: ready on {out.public} after {seconds:.1f} s")
        return out
    server = f"{p.name}-backend"
    lines = last_log_lines(rpc, server)
    if lines:
        reason += f"\n  last log lines of {server}:\n    " + "\n    ".join(lines)
    if undo is not None and p.installed is not None:
        undo_changes(undo)
        _apply_groups(rpc, p.all_groups, rpc.reload_config())
        back = _wait_installed(rpc, p.installed, opts)
        reason += f"\n  the previous version of {p.name} was restored and {back}"
    elif undo is not None:
        for group in p.groups:
            rpc.remove_group(group)
        undo_changes(undo)
        rpc.reload_config()
        reason += f"\n  {p.name} was new: its conf file was removed again"
    out.action, out.error = "failed", reason
    return out


def _answers(inst: Instance) -> bool:
    return attempt(inst.public.probe_target(), inst.health_path, _key(inst),
                   timeout=5.0).outcome == "ready"


def _wait_installed(rpc: SupervisorRPC, conf: InstalledConf, opts: Options) -> str:
    """Wait for a restored version (its own [health] timeout)."""
    start = time.monotonic()
    while time.monotonic() - start < conf.timeout:
        result = attempt(conf.probe_target(), conf.health_path, None, timeout=5.0)
        if result.outcome == "ready":
            return f"answers again (after {time.monotonic() - start:.1f} s)"
        if result.outcome == "fatal":
            return f"is running (its probe needs the key: {result.detail})"
        state = _process_states(rpc).get(conf.server, {})
        if state.get("statename") in GAVE_UP:
            return f"did not start ({state.get('statename')})"
        time.sleep(opts.poll)
    return "did not answer within its [health] timeout"


def _result(outcomes: list[Outcome], *, dry_run: bool) -> Result:
    lines: list[str] = []
    for o in outcomes:
        if o.diff:
            lines.append(o.diff.rstrip("\n"))
        status = {True: "ready", False: "NOT ready", None: ""}[o.ready]
        lines.append(f"{o.name}: {o.action}{', ' + status if status else ''} ({o.public}; "
                     f"{', '.join(o.programs)})")
        if o.error:
            lines.append(f"error: {o.name}: {o.error}")
    failed = any(o.action == "failed" for o in outcomes)
    data = {
        "changed": any(o.changed for o in outcomes),
        "dry_run": dry_run,
        "failed": failed,
        "target": "supervisor",
        "instances": [asdict(o) for o in outcomes],
    }
    notices = tuple(f"{o.name}: {n}" for o in outcomes for n in o.notices)
    return Result(data=data, lines=tuple(lines), warnings=notices,
                  exit_code=EXIT_FAILURE if failed else EXIT_OK)


def remove(names: list[str], target: Site) -> Result:
    """Stop and remove the named instances' groups from supervisord and delete
    exactly the files unitgen wrote for them."""
    rpc = target.rpc(timeout=None)
    removed: list[dict[str, object]] = []
    lines: list[str] = []
    with _lock(target.conf_dir):
        installed = require(target.conf_dir, names)
        for name in names:
            conf = installed[name]
            t0 = time.monotonic()
            for group in conf.groups:
                rpc.remove_group(group)
            files = [p for p in (conf.path, target.conf_dir / conf_name(name))
                     if p.exists() and is_ours(p, name)]
            secret = target.secrets_dir / secret_name(name)
            if secret.exists():
                files.append(secret)
            for path in dict.fromkeys(files):
                path.unlink()
            removed.append({"name": name, "files": [str(p) for p in dict.fromkeys(files)],
                            "programs": conf.groups})
            lines.append(f"{name}: removed ({', '.join(conf.groups)}; "
                         f"{', '.join(p.name for p in dict.fromkeys(files))}) "
                         f"in {time.monotonic() - t0:.1f} s")
        rpc.reload_config()
    return Result(data={"changed": bool(removed), "removed": removed, "target": "supervisor"},
                  lines=tuple(lines))
