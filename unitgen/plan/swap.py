"""Swap groups (issue 12): on-demand instances that take turns on a GPU.

Membership only: which instances form each group once a deploy or a remove is
done. How a turn is taken lives in :mod:`unitgen.inunit.swapproxy`; the units
in :mod:`unitgen.targets.systemd.render`; the files on disk in :mod:`unitgen.ops.systemd.swap`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from unitgen.spec.model import InstanceSpec

__all__ = ["SWAP_TURNS", "after_change", "groups_of", "mates_of", "turn_wait"]

# A waiting member may stand behind a few turns of the others (each: a drain and
# a load) before its own model answers.
SWAP_TURNS = 4


def turn_wait(health_timeout: float, drain: float) -> float:
    """How long a request to a swap-group member may wait before its answer
    starts: the member's proxy's deadline and the gateway's ``timeout server``
    for it (one rule, for both)."""
    return SWAP_TURNS * (health_timeout + drain)


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


def mates_of(name: str, membership: Mapping[str, str]) -> list[str]:
    """The other members of ``name``'s group (empty when it is in none)."""
    group = membership.get(name)
    if group is None:
        return []
    return [n for n in groups_of(membership)[group] if n != name]
