"""What a target can do, as data. Each target declares the capabilities it has
and, for each one it lacks, why; which spec keys need which capability is one
table (:data:`NEEDS`), and every refusal "this target cannot do that" comes
from it, with file and key. Giving a target a capability removes its refusal
and nothing else."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from unitgen.errors import Problem

if TYPE_CHECKING:
    from unitgen.plan.instance import Instance
    from unitgen.spec.model import InstanceSpec

__all__ = ["ALL", "NEEDS", "Capability", "Limits", "Need"]


class Capability(StrEnum):
    """Something a process manager may or may not be able to do for an instance."""

    ON_DEMAND = "on_demand"  # start the server on its first connection
    IDLE_STOP = "idle_stop"  # stop an idle server, start it again on a connection
    SWAP_GROUP = "swap_group"  # servers that take turns on a GPU
    GATEWAY = "gateway"  # run a gateway (a spec with kind = "gateway")
    GATEWAY_MEMBER = "gateway_member"  # join a gateway on this host
    CONTAINER = "container"  # run the server in a container (podman)
    SYSTEMD_DIRECTIVES = "systemd_directives"  # [systemd.unit] and [systemd.service]
    RUN_AS_USER = "run_as_user"  # run the server as another user
    RUN_AS_GROUP = "run_as_group"  # ... with another group
    IPV6 = "ipv6"  # a public address that is IPv6


ALL = frozenset(Capability)

# (key, its value as a message shows it) for each use in a spec
Uses = list[tuple[str, str]]


def _when(used: bool, key: str, value: str = "") -> Uses:
    return [(key, value)] if used else []


@dataclass(frozen=True)
class Need:
    """Spec keys that need a capability: ``spec`` finds their uses in a valid
    spec; ``planned`` in a planned instance, for what only the plan knows (the
    address adopted from ``args``, a gateway's spec)."""

    capability: Capability
    keys: str  # the keys, as the docs name them
    spec: Callable[[InstanceSpec], Uses] | None = None
    planned: Callable[[Instance], Uses] | None = None


NEEDS: tuple[Need, ...] = (
    Need(Capability.ON_DEMAND, "activation",
         spec=lambda s: _when(s.activation == "on-demand", "activation", "on-demand")),
    Need(Capability.IDLE_STOP, "idle_stop",
         spec=lambda s: _when(s.idle_stop is not None, "idle_stop")),
    Need(Capability.SWAP_GROUP, "swap_group",
         spec=lambda s: _when(s.swap_group is not None, "swap_group")),
    Need(Capability.GATEWAY, "kind",
         planned=lambda i: _when(i.gateway is not None, "kind", "gateway")),
    Need(Capability.GATEWAY_MEMBER, "gateway",
         spec=lambda s: _when(s.gateway is not None, "gateway")),
    Need(Capability.CONTAINER, "image",
         spec=lambda s: _when(s.image is not None, "image")),
    Need(Capability.SYSTEMD_DIRECTIVES, "systemd.unit.*, systemd.service.*",
         spec=lambda s: [(f"systemd.{section}.{key}", "")
                         for section, pairs in (("unit", s.systemd_unit),
                                                ("service", s.systemd_service))
                         for key, _ in pairs]),
    Need(Capability.RUN_AS_USER, "user", spec=lambda s: _when(s.user is not None, "user")),
    Need(Capability.RUN_AS_GROUP, "group", spec=lambda s: _when(s.group is not None, "group")),
    Need(Capability.IPV6, "host",
         planned=lambda i: _when(ipaddress.ip_address(i.public.host).version == 6, "host",
                                 i.public.host)),
)


@dataclass(frozen=True)
class Limits:
    """What one target (or one of its managers) can do: ``capabilities``, and
    for every capability it lacks the message that refuses a key needing it,
    saying why and what to do instead (``{key}`` and ``{value}`` in it become
    the refused key and its value)."""

    capabilities: frozenset[Capability]
    why_not: Mapping[Capability, str]

    def __post_init__(self) -> None:
        lacking = ALL - self.capabilities
        if set(self.why_not) != lacking:
            # a refusal without its reason, or a reason for something it can do
            raise ValueError(f"reasons for {sorted(self.why_not)}, but lacking {sorted(lacking)}")

    def _refuse(self, source: str, need: Need, uses: Uses) -> list[Problem]:
        message = self.why_not[need.capability]
        return [Problem(source, key, message.replace("{key}", key).replace("{value}", value))
                for key, value in uses]

    def spec_refusals(self, spec: InstanceSpec) -> list[Problem]:
        """What this target cannot do that a valid spec asks for."""
        return [p for need in NEEDS
                if need.spec is not None and need.capability not in self.capabilities
                for p in self._refuse(spec.source, need, need.spec(spec))]

    def plan_refusals(self, inst: Instance) -> list[Problem]:
        """What it cannot do that only the plan shows."""
        return [p for need in NEEDS
                if need.planned is not None and need.capability not in self.capabilities
                for p in self._refuse(inst.spec.source, need, need.planned(inst))]
