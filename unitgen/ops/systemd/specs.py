"""Specs planned and rendered as systemd units, without a manager: what
``check`` and ``render`` of the systemd target (and the tests' golden files)
are made of."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from unitgen.errors import SpecError
from unitgen.ops.pipeline import CheckAllocator, HostGpus, Planned, plan_paths
from unitgen.plan.instance import Instance
from unitgen.spec.ports import private_range_for
from unitgen.targets.base import RenderedFile
from unitgen.targets.systemd.render import RenderContext, SystemdTarget
from unitgen.targets.systemd.verify import verify_units

__all__ = ["Rendered", "describe", "planner", "render_spec", "verify_rendered"]


@dataclass(frozen=True)
class Rendered:
    """An instance and its rendered files."""

    instance: Instance
    files: tuple[RenderedFile, ...]


def planner(ctx: RenderContext, gpus_from: Path | None) -> tuple[SystemdTarget, CheckAllocator]:
    """The renderer and the allocator of ``check``/``render`` (stable default ports)."""
    host = HostGpus.from_file(gpus_from) if gpus_from else None
    return SystemdTarget(ctx), CheckAllocator(host, private_range_for(ctx.scope))


def render_spec(path: Path, ctx: RenderContext, *, port: int | None = None,
                private_port: int | None = None, gpus_from: Path | None = None) -> Rendered:
    """Load, plan and render one spec; raise SpecError with every problem.
    ``port``/``private_port`` fix the ports a spec leaves open."""
    target, alloc = planner(ctx, gpus_from)
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


def describe(p: Planned) -> str:
    """What ``check`` says of an instance's endpoints."""
    inst = p.instance
    if inst.private is None:
        behind = "the server takes the socket itself (socket activation)"
    elif inst.private.kind == "unix":
        behind = "server on a private Unix socket"
    else:
        behind = f"server on private {inst.private.listen()}"
    return f"public {inst.public.listen()}, {behind}"
