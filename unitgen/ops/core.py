"""The operations behind ``check`` and ``render``: plain functions from spec
files to results. The CLI only parses options and prints what comes back."""

from __future__ import annotations

import difflib
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from unitgen.errors import OwnershipError, Problem, SpecError, UnitgenError
from unitgen.ops.executables import SYSTEM_MANAGER_PATH, missing_program
from unitgen.ops.pipeline import CheckAllocator, HostGpus, Planned, place_or_report, plan_paths
from unitgen.plan.gpus import Gpu, Placement
from unitgen.plan.instance import Instance
from unitgen.result import Result
from unitgen.spec.model import InstanceSpec
from unitgen.spec.ports import private_range_for
from unitgen.targets.base import RenderedFile
from unitgen.targets.systemd.render import MARKER, RenderContext, SystemdTarget
from unitgen.targets.systemd.verify import verify_units

__all__ = ["Rendered", "check", "render", "render_spec", "write_files"]


@dataclass(frozen=True)
class Rendered:
    """An instance and its rendered files."""

    instance: Instance
    files: tuple[RenderedFile, ...]


def placement_for(spec: InstanceSpec, claims: dict[str, list[tuple[str, bool]]] | None = None,
                  *, gpus: list[Gpu] | None = None,
                  mates: frozenset[str] = frozenset()) -> Placement | None:
    """GPU placement for one spec (None for CPU-only specs); SpecError when it
    cannot be placed. Reads NVML unless the caller passes what it read."""
    host = HostGpus(gpus) if gpus is not None else HostGpus.here()
    problems: list[Problem] = []
    placed = place_or_report(spec, host, claims or {},
                             lambda key, msg: problems.append(Problem(spec.source, key, msg)),
                             problems, mates=mates)
    if problems:
        raise SpecError(problems=problems)
    return placed


def _planner(ctx: RenderContext, gpus_from: Path | None) -> tuple[SystemdTarget, CheckAllocator]:
    host = HostGpus.from_file(gpus_from) if gpus_from else None
    return SystemdTarget(ctx), CheckAllocator(host, private_range_for(ctx.scope))


def render_spec(path: Path, ctx: RenderContext, *, port: int | None = None,
                private_port: int | None = None, gpus_from: Path | None = None) -> Rendered:
    """Load, plan and render one spec; raise SpecError with every problem.
    ``port``/``private_port`` fix the ports a spec leaves open."""
    target, alloc = _planner(ctx, gpus_from)
    alloc.fixed_port, alloc.fixed_private = port, private_port
    planned = plan_paths([path], target, alloc, unplaceable=alloc.unplaceable)[0]
    return Rendered(planned.instance, planned.files)


def verify_rendered(planned: list[Planned]) -> list[str]:
    """systemd-analyze verify over every planned instance's units: its complaints
    become problems naming the spec key (raised together); returns notices."""
    batch = []
    for p in planned:
        spec = p.instance.spec
        extras = {k: f"systemd.{section}.{k}" for section, pairs in
                  (("unit", spec.systemd_unit), ("service", spec.systemd_service))
                  for k, _ in pairs}
        batch.append((str(p.path), p.files, extras))
    problems, notices = verify_units(batch)  # one systemd-analyze for all of them
    if problems:
        raise SpecError(problems=problems)
    return notices


def _describe(inst: Instance) -> str:
    if inst.private is None:
        behind = "the server takes the socket itself (socket activation)"
    elif inst.private.kind == "unix":
        behind = "server on a private Unix socket"
    else:
        behind = f"server on private {inst.private.listen()}"
    return f"public {inst.public.listen()}, {behind}"


def check(paths: list[Path], ctx: RenderContext, *, gpus_from: Path | None = None,
          verify: bool = True) -> Result:
    """Validate and plan specs, render them in memory and (where installed) have
    ``systemd-analyze verify`` read the units; write nothing. Every problem of
    every file is reported in one run."""
    target, alloc = _planner(ctx, gpus_from)
    planned = plan_paths(paths, target, alloc, unplaceable=alloc.unplaceable)
    notices = verify_rendered(planned) if verify else []
    # check may be for another host: a program missing here is a notice, not an error
    notices += [f"{found}; fine when the units are for another host, deploy here refuses it"
                for p in planned if (found := missing_program(p.instance, SYSTEM_MANAGER_PATH
                                                              if ctx.scope == "system"
                                                              else os.environ.get("PATH", "")))]
    lines: list[str] = []
    instances: list[dict[str, object]] = []
    for p in planned:
        inst = p.instance
        units = [f.name for f in p.files if not f.secret]
        notices.extend(f"{p.path}: {n}" for n in inst.notices)
        lines.append(f"ok: {p.path}: {inst.name} -> {', '.join(units)} ({_describe(inst)})")
        instances.append({
            "file": str(p.path), "name": inst.name, "units": units,
            "public": inst.public.listen(), "notices": list(inst.notices),
        })
    return Result(data={"ok": True, "instances": instances}, lines=tuple(lines),
                  warnings=tuple(notices))


# Separates files in `render` output: a line no unit file can contain (units are
# parsed line by line; this is not a comment, a section or an assignment).
SEPARATOR = "----- unitgen: {name} -----"


def render(path: Path, ctx: RenderContext, out: Path | None, *,
           gpus_from: Path | None = None) -> Result:
    """Render one spec: to text (each file after a separator line, secrets
    redacted), or into ``out`` (all files or none)."""
    done = render_spec(path, ctx, gpus_from=gpus_from)
    inst = done.instance
    notices = tuple(f"{path}: {n}" for n in inst.notices)
    if out is None:
        chunks: list[str] = []
        for f in done.files:
            head = SEPARATOR.format(name=f.name)
            if f.secret:
                chunks.append(f"{head}\n# secret: written only with --out (mode 0600); "
                              f"install it as {_secret_hint(inst.name)}\n")
            else:
                chunks.append(f"{head}\n{f.text}")
        text = "\n".join(chunks).rstrip("\n")
        return Result(data={"files": [f.name for f in done.files]}, lines=(text,),
                      warnings=notices)
    written = write_files(out, inst.name, done.files)
    lines = tuple(f"wrote {p}" for p in written)
    if any(f.secret for f in done.files):
        lines += (f"install {inst.name}.env (mode 0600) as {_secret_hint(inst.name)}",)
    return Result(data={"files": [str(p) for p in written]}, lines=lines, warnings=notices)


def _secret_hint(name: str) -> str:
    return (f"/etc/unitgen/secrets/{name}.env (system) or "
            f"~/.config/unitgen/secrets/{name}.env (--user)")


def files_diff(files: Sequence[RenderedFile], old: Mapping[str, str | None],
               stale: Sequence[Path]) -> str:
    """A unified diff of what writing ``files`` over ``old`` (name -> text, None:
    absent) and deleting ``stale`` would change; secrets are never shown."""
    chunks: list[str] = []
    for f in files:
        before = old.get(f.name)
        if before == f.text:
            continue
        if f.secret:
            chunks.append(f"--- {f.name} (secret, content not shown) changed\n")
            continue
        chunks.extend(difflib.unified_diff(
            (before or "").splitlines(keepends=True), f.text.splitlines(keepends=True),
            fromfile=f"a/{f.name}" if before is not None else "/dev/null", tofile=f"b/{f.name}"))
    chunks.extend(f"--- {p.name} removed\n" for p in stale)
    return "".join(chunks)


def is_ours(path: Path, name: str | None = None) -> bool:
    """True when ``path`` was generated by unitgen (for instance ``name``, if given)."""
    try:
        with path.open("rb") as fh:
            head = fh.read(4096).decode("utf-8", "replace")
    except FileNotFoundError:
        return False
    for line in head.split("\n"):
        if line.startswith(MARKER):
            return name is None or line[len(MARKER):].strip() == name
    return False


def check_ours(target: Path, name: str, where: str = "") -> None:
    """Refuse to touch ``target`` when it exists and unitgen did not generate it for ``name``."""
    if target.exists() and not is_ours(target, name):
        raise OwnershipError(f"{where}{target} exists and was not generated by unitgen for "
                             f"{name!r}; not overwriting it (rename the instance)")


def _mode(path: Path) -> int:
    return 0o600 if path.suffix == ".env" else 0o644


def apply_changes(changes: list[tuple[Path, str | None]]) -> list[tuple[Path, str | None]]:
    """Write (text) or delete (None) each path, all or nothing, each write atomic.

    Returns the undo list (path, previous text or None) for :func:`undo_changes`;
    on an I/O error undoes what it did and raises UnitgenError naming the file."""
    done: list[tuple[Path, str | None]] = []
    try:
        for path, text in changes:
            before = path.read_text(encoding="utf-8") if path.exists() else None
            if text is None:
                path.unlink(missing_ok=True)
            else:
                path.parent.mkdir(parents=True, exist_ok=True,
                                  mode=0o700 if path.suffix == ".env" else 0o755)
                atomic_write(path, text, mode=_mode(path))
            done.append((path, before))
    except OSError as exc:
        undo_changes(done)
        raise UnitgenError(f"cannot write {exc.filename or path}: {exc.strerror}; "
                           "nothing was changed") from None
    return done


def undo_changes(done: list[tuple[Path, str | None]]) -> None:
    """Put back what :func:`apply_changes` replaced, newest first."""
    for path, before in reversed(done):
        if before is None:
            path.unlink(missing_ok=True)
        else:
            atomic_write(path, before, mode=_mode(path))


def write_files(directory: Path, name: str, files: tuple[RenderedFile, ...]) -> list[Path]:
    """Write files atomically, all or nothing. Refuse, before writing anything,
    to replace a file that unitgen did not generate for this instance."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UnitgenError(f"cannot create {directory}: {exc.strerror}") from None
    for f in files:
        check_ours(directory / f.name, name)
    apply_changes([(directory / f.name, f.text) for f in files])
    return [directory / f.name for f in files]


def atomic_write(target: Path, text: str, *, mode: int) -> None:
    """Write ``text`` to ``target`` so readers see the old file or the new, never half."""
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(target)) from None
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror, str(target)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
