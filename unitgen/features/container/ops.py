"""Containers as a feature: before anything is written, podman, the image and
the CDI devices are checked and missing images pulled (each with its own
deadline); a removed instance's container goes with it; doctor asks podman
what runs. What a target gives is the podman it runs (:class:`ContainerBinding`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from unitgen.errors import Problem
from unitgen.features.base import Feature, InstalledLike
from unitgen.features.container.podman import (
    container_findings,
    pull_missing,
    remove_container,
    spec_problems,
)
from unitgen.ops.findings import Finding
from unitgen.ops.interface import Say
from unitgen.ops.pipeline import Planned
from unitgen.targets.capabilities import Capability

__all__ = ["ContainerBinding", "ContainerFeature"]


@dataclass(frozen=True)
class ContainerBinding:
    """What containers need from a target: the podman its units run."""

    podman: str


class ContainerFeature(Feature):
    """Containers bound to a target."""

    name = "container"
    capabilities = frozenset({Capability.CONTAINER})
    binding: ContainerBinding

    def preflight(self, planned: Sequence[Planned]) -> list[Problem]:
        """podman, a never-pulled image, the CDI devices of the GPUs."""
        return [p for pl in planned for p in spec_problems(pl.instance, self.binding.podman)]

    def prepare(self, planned: Sequence[Planned], say: Say, *, dry_run: bool) -> list[Problem]:
        """Pull the missing images (a dry run says which it would)."""
        return pull_missing([p.instance for p in planned], self.binding.podman, say,
                            dry_run=dry_run)

    def owns_processes(self, inst: InstalledLike) -> bool:
        """A container's processes are conmon's children in other namespaces:
        its unit's cgroup holds them, not the main process's tree."""
        return bool(inst.rec.container)

    def removed(self, inst: InstalledLike) -> tuple[list[Path], list[str]]:
        """Its container goes (a stopped unit has removed it already, normally)."""
        name = inst.rec.container
        if name and remove_container(self.binding.podman, name):
            return [], [f"{inst.name}: container {name} removed"]
        return [], []

    def doctor(self, installed: Mapping[str, InstalledLike], name: str,
               running: bool) -> list[Finding]:
        """What podman says of the instance's container."""
        rec = installed[name].rec
        if not rec.container:
            return []
        return container_findings(self.binding.podman, rec.container, rec.image, rec.gpus,
                                  running)
