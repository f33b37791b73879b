"""The features the supervisor target supports, each with its binding (what the
feature needs from supervisord): its capability set is this table's keys.
Swap groups and containers are not among them: their specs are refused with
the reason (its capabilities: :data:`unitgen.targets.supervisor.render.LIMITS`)."""

from __future__ import annotations

from unitgen.features.base import Feature
from unitgen.features.registry import bind
from unitgen.ops.supervisor.bind_gateway import SupervisorGateway
from unitgen.ops.supervisor.rpc import SupervisorRPC
from unitgen.ops.supervisor.site import Site

__all__ = ["features"]


def features(site: Site, rpc: SupervisorRPC) -> list[Feature]:
    """Every feature this target supports, bound to one supervisord."""
    return bind({"gateway": SupervisorGateway(site, rpc)})
