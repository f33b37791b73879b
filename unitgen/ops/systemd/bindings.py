"""The features the systemd target supports, each with its binding (what the
feature needs from systemd): its capability set is this table's keys."""

from __future__ import annotations

from unitgen.features.base import Feature
from unitgen.features.container.ops import ContainerBinding
from unitgen.features.container.podman import host_podman
from unitgen.features.registry import bind
from unitgen.ops.systemd.bind_gateway import SystemdGateway
from unitgen.ops.systemd.bind_pool import SystemdPool
from unitgen.ops.systemd.bind_swap import SystemdSwap
from unitgen.ops.systemd.session import Session
from unitgen.targets.systemd.contexts import RenderContext

__all__ = ["features"]


def features(session: Session, ctx: RenderContext | None = None) -> list[Feature]:
    """Every feature, bound to the manager of ``session`` (containers: the podman
    the units run, as ``ctx`` says, this host's by default)."""
    return bind({"swap": SystemdSwap(session), "pool": SystemdPool(session),
                 "gateway": SystemdGateway(session),
                 "container": ContainerBinding(ctx.podman if ctx else host_podman())})
