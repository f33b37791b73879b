"""The operations behind ``check`` and ``render``: plain functions from spec
files to results. The CLI only parses options and prints what comes back."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from unitgen.errors import OwnershipError, Problem, SpecError, UnitgenError
from unitgen.plan.gpus import Gpu, GpuUnavailableError, Placement, place, read_gpus
from unitgen.plan.instance import Instance, resolve
from unitgen.result import Result
from unitgen.spec.model import InstanceSpec, load_spec
from unitgen.spec.ports import private_range_for
from unitgen.targets.systemd.render import MARKER, RenderContext, RenderedFile, render_instance

__all__ = ["Rendered", "check", "render", "render_spec", "write_files"]


@dataclass(frozen=True)
class Rendered:
    """An instance and its rendered files."""

    instance: Instance
    files: tuple[RenderedFile, ...]


def placement_for(spec: InstanceSpec, claims: dict[str, list[tuple[str, bool]]] | None = None,
                  *, gpus: list[Gpu] | None = None,
                  mates: frozenset[str] = frozenset()) -> Placement | None:
    """GPU placement for a spec (None for CPU-only specs). Reads NVML unless the
    caller passes what it read; where NVML is unavailable only UUID lists can be
    placed."""
    if spec.gpus is None or spec.gpus == 0:
        return None
    found = gpus
    if found is None:
        try:
            found = read_gpus()
        except GpuUnavailableError:
            found = None
    return place(source=spec.source, name=spec.name, want=spec.gpus, memory=spec.gpu_memory,
                 share=spec.gpu_share, gpus=found, claims=claims or {}, mates=mates)


def render_spec(path: Path, ctx: RenderContext, *, port: int | None = None,
                private_port: int | None = None) -> Rendered:
    """Load, resolve and render one spec; raise SpecError with every problem."""
    spec = load_spec(path)
    inst = resolve(spec, port=port, private_port=private_port, placement=placement_for(spec),
                   private_range=private_range_for(ctx.scope))
    return Rendered(inst, tuple(render_instance(inst, ctx)))


def _describe(inst: Instance) -> str:
    if inst.private is None:
        behind = "the server takes the socket itself (socket activation)"
    elif inst.private.kind == "unix":
        behind = "server on a private Unix socket"
    else:
        behind = f"server on private {inst.private.listen()}"
    return f"public {inst.public.listen()}, {behind}"


def check(paths: list[Path], ctx: RenderContext) -> Result:
    """Validate specs and render them in memory; write nothing. Problems of every
    file are collected before failing, so one run explains everything."""
    problems: list[Problem] = []
    lines: list[str] = []
    notices: list[str] = []
    instances: list[dict[str, object]] = []
    seen: dict[str, str] = {}
    for path in paths:
        try:
            done = render_spec(path, ctx)
        except SpecError as exc:
            problems.extend(exc.problems)
            problems.extend(_more_problems(exc))
            continue
        inst = done.instance
        if inst.name in seen:
            problems.append(Problem(str(path), "name", f"{inst.name!r} is also the name in "
                                                       f"{seen[inst.name]}"))
            continue
        seen[inst.name] = str(path)
        units = [f.name for f in done.files if not f.secret]
        notices.extend(f"{path}: {n}" for n in inst.notices)
        lines.append(f"ok: {path}: {inst.name} -> {', '.join(units)} ({_describe(inst)})")
        instances.append({
            "file": str(path), "name": inst.name, "units": units,
            "public": inst.public.listen(), "notices": list(inst.notices),
        })
    if problems:
        raise SpecError(problems=problems)
    return Result(data={"ok": True, "instances": instances}, lines=tuple(lines),
                  warnings=tuple(notices))


def _more_problems(exc: SpecError) -> list[Problem]:
    """Port-rule problems of a spec that also has key problems (so one check run
    explains everything), skipping keys already reported."""
    spec = exc.partial
    if not isinstance(spec, InstanceSpec):
        return []
    if (spec.backend == "custom" and not spec.command) or (spec.backend != "custom" and not spec.model):
        return []
    seen = {p.key for p in exc.problems}
    try:
        resolve(spec)
    except SpecError as more:
        return [p for p in more.problems if p.key not in seen]
    return []


def render(path: Path, ctx: RenderContext, out: Path | None) -> Result:
    """Render one spec: to text (each file after a ``# <file name>`` line; secrets
    redacted), or into ``out`` (all files or none)."""
    done = render_spec(path, ctx)
    inst = done.instance
    notices = tuple(f"{path}: {n}" for n in inst.notices)
    if out is None:
        chunks: list[str] = []
        for f in done.files:
            if f.secret:
                chunks.append(f"# {f.name}\n# secret: written only with --out (mode 0600); "
                              f"install it as {_secret_hint(inst.name)}\n")
            else:
                chunks.append(f"# {f.name}\n{f.text}")
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


def is_ours(path: Path, name: str | None = None) -> bool:
    """True when ``path`` was generated by unitgen (for instance ``name``, if given)."""
    try:
        with path.open("rb") as fh:
            head = fh.read(4096).decode("utf-8", "replace")
    except FileNotFoundError:
        return False
    for line in head.splitlines():
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
        if not f.secret:
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
