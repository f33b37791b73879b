"""deploy and remove for the supervisor target: the adapter the one deploy
transaction (:mod:`unitgen.ops.transaction`) runs on. Files are written
atomically, ``reloadConfig`` is called, and only the changed process groups of
our own instances are removed and added (what ``supervisorctl update`` does,
minus other people's programs); readiness is the public port answering the
health path, asked with the probe's own code."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import stat
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from unitgen.errors import OwnershipError, UnitgenError
from unitgen.features.base import Feature
from unitgen.inunit.envfile import split_env_text
from unitgen.inunit.probe import Attempt, attempt
from unitgen.ops.allocate import HostAllocator, listeners
from unitgen.ops.files import check_ours, is_ours, read_exact
from unitgen.ops.interface import DeployOptions, Say
from unitgen.ops.pipeline import Planned, plan_paths
from unitgen.ops.supervisor.bindings import features
from unitgen.ops.supervisor.rpc import SupervisorRPC
from unitgen.ops.supervisor.site import Site, check_run_dir, clear_run_dir, log_dir, make_dir
from unitgen.ops.transaction import Change, Ready
from unitgen.ops.transaction import run as transaction
from unitgen.ops.wait import wait_until
from unitgen.plan.instance import Instance
from unitgen.result import Result
from unitgen.targets.supervisor.installed import InstalledConf, scan
from unitgen.targets.supervisor.render import (
    SupervisorTarget,
    conf_name,
    group_names,
    reload_signal,
    run_as,
    secret_name,
    target_notices,
)

__all__ = ["SupervisorDeploy", "deploy", "last_log_lines", "remove"]

# supervisord's state names (supervisor/states.py)
GAVE_UP = ("FATAL",)
DOWN = ("STOPPED", "EXITED", "FATAL", "UNKNOWN")
Diff = tuple[list[str], list[str], list[str]]


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


def _env_readers(change: Change) -> list[str]:
    """The groups a changed env file must restart that supervisord does not see
    change. A change of its plain variables is a change of the server's
    command line (``--env-digest``), which supervisord reports itself; its
    secrets are read when they start by the server and, for the probe key, by
    the public program. So a new plain variable keeps the public socket open."""
    inst = change.inst
    before = change.old.get(secret_name(inst.name))  # None: none, or taken back
    old = dict(split_env_text(before)[1]) if before is not None else {}
    new = dict(inst.secrets)
    public, server = group_names(inst)
    readers = [server] if old != new else []
    key = inst.probe_key_env
    if key and old.get(key) != new.get(key):
        readers.append(public)
    return readers


def _root_only(path: Path) -> bool:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return True
    return not stat.S_ISLNK(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077


def _check_user(inst: Instance) -> None:
    """The wrapper runs the server as ``user`` (or the target's pick): it must exist."""
    user = run_as(inst)
    if user is None:
        return
    try:
        pwd.getpwnam(user)
    except KeyError:
        key = "user" if inst.spec.user else "kind"
        raise UnitgenError(f"{inst.spec.source}: {key}: no such user {user!r}" + (
            "" if inst.spec.user else ": this target runs the program as that user, which the "
            "package that installs the program makes (docs/supervisor.md)")) from None


def _answers(inst: Instance) -> bool:
    return attempt(inst.public.probe_target(), inst.health_path, _key(inst),
                   timeout=5.0).outcome == "ready"


class SupervisorDeploy:
    """The supervisor target's steps of the deploy transaction, for one supervisord."""

    name = "supervisor"

    def __init__(self, site: Site) -> None:
        self.site = site
        self.python = site.ctx.python
        # supervisord (root) runs unitgen's wrappers as root: the trust check is owed
        self.root_runs_code = os.geteuid() == 0
        self._rpc: SupervisorRPC | None = None
        self.features: list[Feature] = features(site, self.rpc)
        self.installed: dict[str, InstalledConf] = {}
        self._states: dict[str, dict[str, object]] = {}
        self._diff: Diff = ([], [], [])

    @property
    def rpc(self) -> SupervisorRPC:
        """The XML-RPC client (made on first use)."""
        if self._rpc is None:
            self._rpc = self.site.rpc(timeout=None)
        return self._rpc

    def close(self) -> None:
        """Nothing to let go: each XML-RPC call is its own request."""

    def lock(self, say: Say) -> contextlib.AbstractContextManager[None]:
        """Deploys to one include directory wait for each other."""
        make_dir(self.site.conf_dir)
        check_run_dir(Path(self.site.ctx.run_dir))
        return _lock(self.site.conf_dir)

    def plan(self, paths: Sequence[Path], opts: DeployOptions) -> list[Planned]:
        """Ports as the systemd target picks them. Private ports are privileged:
        supervisord runs as root, and the wrapper gives a server run as ``user``
        the right to bind its own one only."""
        installed = self.installed = scan(self.site.conf_dir, self.site.ctx.run_dir)
        alloc = HostAllocator("system", installed, listeners(), opts.port_range)
        planned = plan_paths(paths, SupervisorTarget(self.site.ctx), alloc,
                             unplaceable=alloc.unplaceable)
        self._states = _process_states(self.rpc)
        return planned

    def change(self, planned: Planned) -> Change:
        """Refuse files or program groups unitgen did not write; read what is there."""
        inst, spec = planned.instance, planned.instance.spec
        ours = {g for conf in self.installed.values() for g in conf.groups}
        foreign = {str(p["group"]) for p in self._states.values()} - ours
        for group in group_names(inst):
            if group in foreign:
                raise OwnershipError(f"{spec.source}: name: supervisord already runs a program "
                                     f"group {group!r} that unitgen did not write; choose another "
                                     "instance name")
        paths: dict[str, Path] = {}
        old: dict[str, str | None] = {}
        for f in planned.files:
            where = (self.site.secrets_dir if f.secret else Path(self.site.ctx.config_dir)
                     if f.config else self.site.conf_dir)
            path = paths[f.name] = where / f.name
            if not f.secret and not f.config:
                check_ours(path, spec.name, f"{spec.source}: ")
            try:
                old[f.name] = read_exact(path) if path.exists() else None
            except OSError as exc:
                raise UnitgenError(f"cannot read {path}: {exc.strerror}") from None
        stale: dict[Path, str] = {}
        secret = self.site.secrets_dir / secret_name(spec.name)
        if secret_name(spec.name) not in paths and secret.exists():
            stale[secret] = secret.read_text(encoding="utf-8")
        elif secret_name(spec.name) in paths and not _root_only(secret):
            # a secret file someone else owns or may read (0.x handed it to the user)
            # is written again, root's and 0600: the wrapper refuses any other
            old[secret_name(spec.name)] = None
        installed = self.installed.get(spec.name)
        return Change(planned, paths, old, stale, was_installed=installed is not None,
                      units=group_names(inst), notices=[*inst.notices, *target_notices(inst)],
                      extra=installed)

    def preflight(self, changes: list[Change]) -> list[tuple[Path, str | None]]:
        """The log directory (supervisord does not make one) and the servers' users."""
        log_dir(Path(self.site.ctx.log_dir))
        for c in changes:
            if c.changed:
                _check_user(c.inst)
        return []

    def reload(self, written: list[Change]) -> None:
        """``reloadConfig``: supervisord reads the include directory again."""
        self._diff = self.rpc.reload_config()

    def running(self, change: Change) -> Ready | None:
        """Unchanged and both programs up: ready when the public port answers."""
        for group in change.units:
            info = self._states.get(group)
            if info is None or info.get("statename") in DOWN:
                return None
        return Ready(_answers(change.inst))

    def start(self, change: Change, opts: DeployOptions) -> None:
        """Replace the changed groups (and those whose secrets changed:
        supervisord does not see them, yet the programs read them when they
        start), or start the stopped ones of an unchanged instance."""
        added, changed, removed = self._diff
        if change.reload_only and self._signal_reload(change):
            return
        if not change.changed or change.reload_only:  # reload_only: it was not running
            _apply_groups(self.rpc, change.units, self._diff)
            for group in change.units:
                info = self._states.get(group)
                if info is not None and info.get("statename") in DOWN:
                    self.rpc.fault_code("startProcessGroup", group, False)
            return
        if any(f.secret for f in change.changed_files):
            changed = sorted({*changed, *(g for g in _env_readers(change) if g not in added)})
        old = change.extra.groups if change.extra is not None else []
        _apply_groups(self.rpc, list(dict.fromkeys([*change.units, *old])),
                      (added, changed, removed))
        if opts.wait:
            opts.say(f"{change.name}: starting (public {change.inst.public.listen()})")

    def _signal_reload(self, change: Change) -> bool:
        """Only files its server reads again on a signal changed: signal it if it runs."""
        sig, server = reload_signal(change.inst), f"{change.name}-backend"
        if sig is None or self._states.get(server, {}).get("statename") != "RUNNING":
            return False
        for f in self.features:  # what systemd's ExecReload= does around it
            f.before_signal(change.name)
        self.rpc.call("signalProcess", server, sig)
        for f in self.features:
            f.after_signal(change.name)
        return True

    def wait(self, change: Change, opts: DeployOptions) -> Ready:
        """Poll the PUBLIC port until it answers, supervisord gives up, or the
        [health] timeout; the server's last log lines when it did not."""
        inst = change.inst
        target = inst.public.probe_target()
        server = f"{inst.name}-backend"
        last: list[Attempt] = []
        state: dict[str, object] = {}
        t0 = time.monotonic()

        def poll() -> Ready | None:
            nonlocal state
            result = attempt(target, inst.health_path, _key(inst), timeout=5.0)
            last[:] = [result]
            seconds = time.monotonic() - t0
            if result.outcome == "ready":
                return Ready(True, seconds)
            if result.outcome == "fatal":
                return Ready(False, seconds, f"public {target}{inst.health_path}: {result.detail}")
            state = _process_states(self.rpc).get(server, {})
            if state.get("statename") in GAVE_UP:
                why = state.get("spawnerr") or state.get("description") or ""
                return Ready(False, seconds, f"supervisord gave up on {server} "
                             f"({state.get('statename')}: {why}); last answer on {target}: "
                             f"{result.detail}")
            return None

        def progress(elapsed: float) -> None:
            opts.say(f"{inst.name}: starting, {elapsed:.0f} s, {state.get('statename', '?')}: "
                     f"{last[0].detail if last else ''}")

        ready = wait_until(poll, timeout=inst.health_timeout, every=opts.poll, progress=progress)
        if ready is None:
            ready = Ready(False, time.monotonic() - t0, (
                f"public {target}{inst.health_path}: not ready after {inst.health_timeout:g} s "
                f"(the [health] timeout); last answer: {last[0].detail if last else ''}"))
        if not ready.ok:
            lines = last_log_lines(self.rpc, server)
            if lines:
                ready = Ready(False, ready.seconds, ready.reason + f"\n  last log lines of "
                              f"{server}:\n    " + "\n    ".join(lines))
        return ready

    def restore(self, change: Change, opts: DeployOptions) -> str:
        """The previous conf is back on disk: its groups again, or a new instance's gone."""
        installed: InstalledConf | None = change.extra
        if installed is not None:
            groups = list(dict.fromkeys([*change.units, *installed.groups]))
            _apply_groups(self.rpc, groups, self.rpc.reload_config())
            return f"\n  the previous version of {change.name} was restored and " \
                   f"{_wait_installed(self.rpc, installed, opts)}"
        for group in change.units:
            self.rpc.remove_group(group)
        self.rpc.reload_config()
        return f"\n  {change.name} was new: its conf file was removed again"


def _wait_installed(rpc: SupervisorRPC, conf: InstalledConf, opts: DeployOptions) -> str:
    """Wait for a restored version (its own [health] timeout)."""
    t0 = time.monotonic()

    def poll() -> str | None:
        result = attempt(conf.probe_target(), conf.health_path, None, timeout=5.0)
        if result.outcome == "ready":
            return f"answers again (after {time.monotonic() - t0:.1f} s)"
        if result.outcome == "fatal":
            return f"is running (its probe needs the key: {result.detail})"
        state = _process_states(rpc).get(conf.server, {})
        if state.get("statename") in GAVE_UP:
            return f"did not start ({state.get('statename')})"
        return None

    answer = wait_until(poll, timeout=conf.timeout, every=opts.poll)
    return answer or "did not answer within its [health] timeout"


def deploy(paths: list[Path], site: Site, opts: DeployOptions) -> Result:
    """Deploy specs to supervisord through the one transaction."""
    return transaction(SupervisorDeploy(site), paths, opts)


def remove(names: list[str], site: Site) -> Result:
    """Stop and remove the named instances' groups from supervisord and delete
    exactly the files unitgen wrote for them."""
    rpc = site.rpc(timeout=None)
    feats = features(site, rpc)
    removed: list[dict[str, object]] = []
    lines: list[str] = []
    absent: list[str] = []
    with _lock(site.conf_dir):
        installed = scan(site.conf_dir, site.ctx.run_dir)
        for feat in feats:  # others stop depending on them while they still run
            lines += feat.before_remove(installed, names)
        for name in names:
            conf = installed.get(name)
            if conf is None:
                absent.append(name)  # already gone: nothing to do (idempotent)
                lines.append(f"{name}: not installed (nothing to do)")
                continue
            t0 = time.monotonic()
            for group in conf.groups:
                rpc.remove_group(group)
            clear_run_dir(site.ctx.run_dir, name)
            files = [p for p in (conf.path, site.conf_dir / conf_name(name))
                     if p.exists() and is_ours(p, name)]
            secret = site.secrets_dir / secret_name(name)
            if secret.exists():
                files.append(secret)
            for path in dict.fromkeys(files):
                path.unlink()
            for feat in feats:  # what each feature takes away with it (its files)
                gone, said = feat.removed(conf)
                files += gone
                lines += said
            removed.append({"name": name, "files": [str(p) for p in dict.fromkeys(files)],
                            "units": conf.groups})
            lines.append(f"{name}: removed ({', '.join(conf.groups)}; "
                         f"{', '.join(p.name for p in dict.fromkeys(files))}) "
                         f"in {time.monotonic() - t0:.1f} s")
        if removed:
            rpc.reload_config()
    return Result(data={"changed": bool(removed), "removed": removed, "absent": absent,
                        "target": "supervisor"},
                  lines=tuple(lines))
