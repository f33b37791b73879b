"""Deploy's check of a GPU pool (issue 27): a member that cannot fit on its
GPUs even alone, and always-on instances that leave a member no room, are
refused before anything is written, with the member's file and key.

A pure function of the members (their placed GPUs and memory needs) and the
GPUs' sizes; the deploy plan calls it once every member is placed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from unitgen.errors import Problem
from unitgen.inunit.gpuneed import Need, NeedSource
from unitgen.inunit.nvml import gib

__all__ = ["PoolMember", "need_key", "pool_problems"]


@dataclass(frozen=True)
class PoolMember:
    """One instance on the pool's GPUs, as deploy planned it."""

    source: str  # its spec file, for problems
    name: str
    gpus: tuple[str, ...]  # the GPU UUIDs it was placed on
    need: Need
    always_on: bool = False  # loaded all the time (eager): it never makes room


def need_key(need: Need) -> str:
    """The spec key a problem with this need points at: what says it, or the
    GPUs when nothing in the spec does."""
    return {NeedSource.DECLARED: "gpu_memory", NeedSource.BACKEND_ARGS: "args"}.get(
        need.source, "gpus")


def _names(members: Sequence[PoolMember]) -> str:
    return ", ".join(f"{m.name} ({m.source})" for m in members)


def pool_problems(members: Sequence[PoolMember], totals: Mapping[str, int],
                  outside: Mapping[str, int] | None = None) -> list[Problem]:
    """Every member that could never load: its need above what its GPU has for
    the pool (``totals`` less ``outside``, memory held by processes that are no
    member), alone or beside the always-on members there. GPUs missing from
    ``totals`` (their size unknown here) are not checked."""
    outside = outside or {}
    problems = []
    for m in sorted(members, key=lambda m: (m.source, m.name)):
        for u in m.gpus:
            if u not in totals:
                continue
            room = totals[u] - outside.get(u, 0)
            need = m.need.on(totals[u])
            held = f" ({gib(outside[u])} of it held by processes outside the pool)" \
                if outside.get(u) else ""
            if need > room:
                problems.append(Problem(m.source, need_key(m.need), (
                    f"needs {gib(need)} on GPU {u} ({m.need.shown()}), more than the "
                    f"{gib(room)} it has{held}: it cannot run even alone")))
                continue
            fixed = [a for a in members if a.always_on and a.name != m.name and u in a.gpus]
            taken = sum(a.need.on(totals[u]) for a in fixed)
            if fixed and taken + need > room:
                outcome = ("they cannot all be loaded" if m.always_on else
                           "it could never load")
                problems.append(Problem(m.source, need_key(m.need), (
                    f"needs {gib(need)} on GPU {u} ({m.need.shown()}) but the always-on "
                    f"{_names(fixed)} hold {gib(taken)} of its {gib(room)}{held}: {outcome}")))
    return problems
