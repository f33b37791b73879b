"""The CLI's door to the supervisor target: one function per command, taking
the options as the CLI parsed them (``unitgen ... --target supervisor``)."""

from __future__ import annotations

import sys
from pathlib import Path

from unitgen.errors import UnitgenError
from unitgen.ops.core import SEPARATOR, apply_changes, check_ours
from unitgen.ops.pipeline import CheckAllocator, plan_paths
from unitgen.ops.supervisor import deploy as dep
from unitgen.ops.supervisor import status as st
from unitgen.ops.supervisor.site import Site, context
from unitgen.result import Result
from unitgen.spec.ports import PRIVATE_PORT_RANGE
from unitgen.targets.supervisor.render import SupervisorTarget, target_notices

__all__ = ["check", "deploy", "doctor", "logs", "remove", "render", "status"]


def render(spec_path: Path, out: Path | None) -> Result:
    """Print the conf file (secret redacted), or write conf and secret into ``out``."""
    ctx = context()
    alloc = CheckAllocator(private_range=PRIVATE_PORT_RANGE)
    planned = plan_paths([spec_path], SupervisorTarget(ctx), alloc,
                         unplaceable=alloc.unplaceable)[0]
    inst, files = planned.instance, list(planned.files)
    notices = tuple(f"{spec_path}: {n}" for n in (*inst.notices, *target_notices(inst)))
    if out is None:
        chunks = []
        for f in files:
            if f.secret:
                chunks.append(f"{SEPARATOR.format(name=f.name)}\n# secret: written only with "
                              f"--out (mode 0600); install it as {ctx.secrets_dir}/{f.name}\n")
            else:
                chunks.append(f"{SEPARATOR.format(name=f.name)}\n{f.text}")
        return Result(data={"files": [f.name for f in files], "target": "supervisor"},
                      lines=("\n".join(chunks).rstrip("\n"),), warnings=notices)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UnitgenError(f"cannot create {out}: {exc.strerror}") from None
    for f in files:
        if not f.secret:
            check_ours(out / f.name, inst.name)
    apply_changes([(out / f.name, f.text) for f in files])
    lines = tuple(f"wrote {out / f.name}" for f in files)
    if any(f.secret for f in files):
        lines += (f"install {inst.name}.env (mode 0600) as {ctx.secrets_dir}/{inst.name}.env",)
    return Result(data={"files": [str(out / f.name) for f in files], "target": "supervisor"},
                  lines=lines, warnings=notices)


def check(specs: list[Path]) -> Result:
    """``unitgen check --target supervisor``: the shared pipeline with this target."""
    alloc = CheckAllocator(private_range=PRIVATE_PORT_RANGE)
    planned = plan_paths(specs, SupervisorTarget(context(need_proxyd=False)), alloc,
                         unplaceable=alloc.unplaceable)
    lines = tuple(f"ok: {p.path}: {p.instance.name} -> {', '.join(f.name for f in p.files)} "
                  f"(public {p.instance.public.listen()}, supervisord owns it)" for p in planned)
    notices = tuple(f"{p.path}: {n}" for p in planned
                    for n in (*p.instance.notices, *target_notices(p.instance)))
    return Result(data={"ok": True, "target": "supervisor", "instances": [
        {"file": str(p.path), "name": p.instance.name, "public": p.instance.public.listen(),
         "files": [f.name for f in p.files]} for p in planned]}, lines=lines, warnings=notices)


def deploy(specs: list[Path], *, url: str | None, conf_dir: Path | None, dry_run: bool,
           diff: bool, wait: bool, port_range: tuple[int, int]) -> Result:
    """``unitgen deploy --target supervisor``."""
    target = Site.resolve(url, conf_dir)
    opts = dep.Options(dry_run=dry_run, diff=diff, wait=wait, port_range=port_range)
    return dep.deploy(specs, target, opts)


def status(names: list[str], *, url: str | None, conf_dir: Path | None) -> Result:
    """``unitgen status --target supervisor``."""
    return st.status(names, Site.resolve(url, conf_dir, need_proxyd=False))


def remove(names: list[str], *, url: str | None, conf_dir: Path | None) -> Result:
    """``unitgen remove --target supervisor``."""
    return dep.remove(names, Site.resolve(url, conf_dir, need_proxyd=False))


def logs(name: str, *, url: str | None, conf_dir: Path | None, lines: int,
         follow: bool) -> int:
    """``unitgen logs --target supervisor``: the server's log file over XML-RPC."""
    try:
        return st.logs(name, Site.resolve(url, conf_dir, need_proxyd=False), lines=lines,
                       follow=follow)
    except KeyboardInterrupt:
        sys.stdout.flush()
        return 0


def doctor(name: str, *, url: str | None, conf_dir: Path | None) -> Result:
    """``unitgen doctor --target supervisor``."""
    return st.doctor(name, Site.resolve(url, conf_dir, need_proxyd=False))
