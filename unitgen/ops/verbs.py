"""``check`` and ``render``, written once for every target: a target passes its
renderer, its allocator and what it says about an instance; these functions
run the pipeline and shape the result."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from unitgen.errors import Problem, SpecError
from unitgen.ops.files import write_files
from unitgen.ops.pipeline import CheckAllocator, Planned, plan_paths
from unitgen.result import Result
from unitgen.targets.base import Target

__all__ = ["SEPARATOR", "check_specs", "render_one"]

# Separates files in `render` output: a line no unit file can contain (units are
# parsed line by line; this is not a comment, a section or an assignment).
SEPARATOR = "----- unitgen: {name} -----"

Describe = Callable[[Planned], str]
Notices = Callable[[list[Planned]], list[str]]


def check_specs(paths: Sequence[Path], target: Target, alloc: CheckAllocator, *,
                describe: Describe, notices: Notices | None = None,
                extra: Callable[[Planned], dict[str, object]] | None = None) -> Result:
    """Validate and plan ``paths``, render them in memory; write nothing. Every
    problem of every file in one run; the files that are fine are reported
    too, also when others are not (with the failure's exit code)."""
    try:
        planned = plan_paths(paths, target, alloc, unplaceable=alloc.unplaceable)
        problems: tuple[Problem, ...] = ()
        code = 0
        said = notices(planned) if notices else []
    except SpecError as exc:
        planned = exc.partial if isinstance(exc.partial, list) else []
        bad = {p.file for p in exc.problems}
        planned = [p for p in planned if str(p.path) not in bad]
        if not planned:
            raise
        problems, code, said = tuple(exc.problems), exc.exit_code, []
    lines: list[str] = []
    instances: list[dict[str, object]] = []
    for p in planned:
        inst = p.instance
        said.extend(f"{p.path}: {n}" for n in inst.notices)
        lines.append(f"ok: {p.path}: {inst.name} -> "
                     f"{', '.join(f.name for f in p.files if not (f.secret or f.config))} ({describe(p)})")
        instances.append({"file": str(p.path), "name": inst.name,
                          "units": [f.name for f in p.files if not (f.secret or f.config)],
                          "public": inst.public.listen(), "notices": list(inst.notices),
                          **(extra(p) if extra else {})})
    return Result(data={"ok": not problems, "target": target.name, "instances": instances},
                  lines=tuple(lines), warnings=tuple(said), exit_code=code,
                  problems=problems)


def render_one(planned: Planned, out: Path | None, *, secret_hint: str,
               notices: Sequence[str] = (), target: str = "") -> Result:
    """One planned spec: printed, each file after a separator line (a secret's
    contents never), or written into ``out`` (all files or none, never over a
    file unitgen did not generate for it)."""
    inst, files = planned.instance, planned.files
    said = tuple(f"{planned.path}: {n}" for n in (*inst.notices, *notices))
    contents = {f.name: None if f.secret else f.text for f in files}
    data: dict[str, object] = {"files": [f.name for f in files], "contents": contents}
    if target:
        data["target"] = target
    if out is None:
        chunks: list[str] = []
        for f in files:
            head = SEPARATOR.format(name=f.name)
            if f.secret:
                chunks.append(f"{head}\n# secret: written only with --out (mode 0600); "
                              f"install it as {secret_hint}\n")
            else:
                chunks.append(f"{head}\n{f.text}")
        return Result(data=data, lines=("\n".join(chunks).rstrip("\n"),), warnings=said)
    written = write_files(out, inst.name, files)
    lines = tuple(f"wrote {p}" for p in written)
    if any(f.secret for f in files):
        lines += (f"install {inst.name}.env (mode 0600) as {secret_hint}",)
    data["files"] = [str(p) for p in written]
    return Result(data=data, lines=lines, warnings=said)
