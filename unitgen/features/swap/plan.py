"""Who may run together: the policy deploy asks before it places GPUs and
writes units, and that a memory-sharing pool (issue 27) will replace.

Today's policy is the swap group (issue 12): members of one group are loaded
one at a time. How a turn is taken lives in :mod:`unitgen.inunit.swapproxy`;
the units in :mod:`unitgen.targets.systemd.render`; the hooks in
:mod:`unitgen.features.swap.ops`. Membership is a plain mapping (instance
name -> group), read back from what is installed and updated by a deploy or
a remove (:func:`after_change`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from unitgen.inunit.poolpolicy import TURNS_WAITED
from unitgen.spec.model import InstanceSpec

__all__ = ["SWAP_TURNS", "RunTogether", "SwapGroups", "after_change", "groups_of", "turn_wait"]

# A waiting member may stand behind a few turns of the others (each: a drain and
# a load) before its own model answers: the pool's rule (inunit.poolpolicy).
SWAP_TURNS = TURNS_WAITED


def turn_wait(health_timeout: float, drain: float) -> float:
    """How long a request to a swap-group member may wait before its answer
    starts: the member's proxy's deadline and the gateway's ``timeout server``
    for it (one rule, for both)."""
    return SWAP_TURNS * (health_timeout + drain)


class RunTogether(Protocol):
    """Which instances may be loaded at the same time.

    A policy answers two questions, both about other instances: which ones may
    never be loaded while ``name`` is (systemd keeps them apart with
    ``Conflicts=``, a turn asks them to yield), and which ones leave the GPU
    when ``name`` needs it (placement counts their claims as no conflict and
    their memory as free). A memory pool answers the first with nobody (its
    members run side by side when they fit: the pool decides at run time)
    and the second with its members."""

    def never_with(self, name: str) -> list[str]:
        """Instances never loaded at the same time as ``name``, sorted."""
        ...

    def makes_room_for(self, name: str) -> frozenset[str]:
        """Instances that unload when ``name`` needs their GPU memory."""
        ...


@dataclass(frozen=True)
class SwapGroups:
    """One member of a swap group at a time: each member excludes, and makes
    room for, every other member of its group."""

    membership: Mapping[str, str]  # instance name -> group

    def mates(self, name: str) -> list[str]:
        """The other members of ``name``'s group (empty when it is in none)."""
        group = self.membership.get(name)
        if group is None:
            return []
        return [n for n in groups_of(self.membership)[group] if n != name]

    def never_with(self, name: str) -> list[str]:
        """See :class:`RunTogether`: the mates."""
        return self.mates(name)

    def makes_room_for(self, name: str) -> frozenset[str]:
        """See :class:`RunTogether`: the mates."""
        return frozenset(self.mates(name))


def after_change(installed: Mapping[str, str], deployed: Iterable[InstanceSpec] = (),
                 removed: Iterable[str] = ()) -> dict[str, str]:
    """Instance name -> group, from the installed members (``installed``: name ->
    group), updated by the specs being deployed and the names being removed."""
    out = dict(installed)
    for spec in deployed:
        if spec.swap_group:
            out[spec.name] = spec.swap_group
        else:
            out.pop(spec.name, None)
    for name in removed:
        out.pop(name, None)
    return out


def groups_of(membership: Mapping[str, str]) -> dict[str, list[str]]:
    """Group -> its members, sorted."""
    out: dict[str, list[str]] = {}
    for name, group in sorted(membership.items()):
        out.setdefault(group, []).append(name)
    return out
