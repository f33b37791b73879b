"""GPU pools (issue 27): on-demand instances on the same GPUs share them by
memory. Who is a member, the terms each member's proxy weighs (its memory
need, whether its server sleeps, its turn's bounds), the flags that let a
server sleep, and each member's pool file (:mod:`unitgen.inunit.poolfile`).

Membership is decided by the spec alone (:func:`is_member`): an on-demand
instance with GPUs, not in a swap group, that does not say ``gpu_pool =
false``. Members share a pool when they share a GPU: each member's file lists
the members on any of its GPUs, so a member on GPUs 0 and 1 sees those of both.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from unitgen.errors import SpecError
from unitgen.inunit.gpuneed import NeedSource
from unitgen.inunit.poolfile import PoolFile, PoolMember, PoolTerms
from unitgen.plan.container import ProblemSink
from unitgen.plan.memneed import fingerprint, memory_need
from unitgen.spec.argscan import find_options
from unitgen.spec.backends import SleepMode, get_backend
from unitgen.spec.model import InstanceSpec

__all__ = ["GpuPools", "after_change", "is_member", "pool_file", "pool_terms", "sleep_mode",
           "with_sleep_flags"]


def is_member(spec: InstanceSpec) -> bool:
    """True for an instance that shares its GPUs by memory (module docstring)."""
    return (spec.activation == "on-demand" and spec.gpus not in (None, 0, ())
            and spec.swap_group is None and spec.gpu_pool and not spec.socket_activation)


def sleep_mode(spec: InstanceSpec) -> SleepMode | None:
    """How the member's server sleeps; None when it is stopped instead (its
    backend cannot sleep, or ``pool_sleep = false``)."""
    if not is_member(spec) or not spec.pool_sleep:
        return None
    return get_backend(spec.backend).sleep


def pool_terms(spec: InstanceSpec, problem: ProblemSink) -> PoolTerms | None:
    """A member's terms from its spec (None for an instance in no pool, or when
    its arguments say a share of memory the server would refuse: a problem)."""
    if not is_member(spec):
        return None
    try:
        need = memory_need(spec)
    except SpecError as exc:
        for p in exc.problems:
            problem(p.key, p.message)
        return None
    return PoolTerms(
        need=need.to_arg(), detail=need.detail, fingerprint=fingerprint(spec),
        fixed=need.source in (NeedSource.DECLARED, NeedSource.BACKEND_ARGS),
        sleep=sleep_mode(spec) is not None, min_turn=spec.pool_min_turn,
        drain=spec.swap_drain, load_timeout=spec.health.timeout, idle_stop=spec.idle_stop)


def with_sleep_flags(spec: InstanceSpec, args: tuple[str, ...],
                     env: tuple[tuple[str, str], ...]) -> tuple[tuple[str, ...],
                                                                tuple[tuple[str, str], ...]]:
    """The server's arguments and environment with what its sleep needs (vLLM:
    ``--enable-sleep-mode`` and ``VLLM_SERVER_DEV_MODE=1``), each added once."""
    mode = sleep_mode(spec)
    if mode is None:
        return args, env
    backend = get_backend(spec.backend)
    added = tuple(f for f in mode.flags if not find_options(args, (f,), backend.syntax))
    names = {k for k, _ in env}
    return (*args, *added), (*env, *((k, v) for k, v in mode.env if k not in names))


@dataclass(frozen=True)
class GpuPools:
    """Pool members may run side by side (no ``Conflicts=``): the pool decides at
    run time who makes room (:mod:`unitgen.inunit.poolpolicy`). ``membership``:
    each member's GPU UUIDs (empty while it is not placed yet)."""

    membership: Mapping[str, tuple[str, ...]]

    def never_with(self, name: str) -> list[str]:
        """See :class:`unitgen.features.swap.plan.RunTogether`: nobody."""
        return []

    def makes_room_for(self, name: str) -> frozenset[str]:
        """See :class:`unitgen.features.swap.plan.RunTogether`: every other member
        (placement asks before the GPUs are chosen; only those on its GPUs matter)."""
        if name not in self.membership:
            return frozenset()
        return frozenset(self.membership) - {name}

    def neighbours(self, name: str) -> list[str]:
        """The other members on any of ``name``'s GPUs, sorted."""
        mine = set(self.membership.get(name, ()))
        return sorted(n for n, gpus in self.membership.items() if n != name and mine & set(gpus))


def pool_file(name: str, members: Mapping[str, tuple[tuple[str, ...], PoolTerms]],
              backend: str) -> PoolFile:
    """Member ``name``'s pool file: itself first, then its neighbours (``members``:
    every member's GPUs and terms; ``backend``: its server's)."""
    pools = GpuPools({n: gpus for n, (gpus, _) in members.items()})
    order = [name, *pools.neighbours(name)]
    mode = get_backend(backend).sleep if members[name][1].sleep else None
    calls = ((mode.sleep, mode.wake, mode.is_sleeping) if mode is not None else ())
    return PoolFile(
        name, tuple(PoolMember(n, members[n][0], members[n][1]) for n in order),
        sleep=(mode.sleep.method, mode.sleep.path, mode.sleep.body) if mode else None,
        wake=(mode.wake.method, mode.wake.path, mode.wake.body) if mode else None,
        refused=tuple(sorted({c.path.partition("?")[0] for c in calls if c is not None})))


def after_change(installed: Mapping[str, tuple[tuple[str, ...], PoolTerms]],
                 deployed: Iterable[tuple[str, tuple[str, ...], PoolTerms | None]] = (),
                 removed: Iterable[str] = ()) -> dict[str, tuple[tuple[str, ...], PoolTerms]]:
    """Member -> (GPUs, terms) once a deploy (``deployed``: name, placed GPUs and
    terms, None for an instance in no pool) or a remove is done."""
    out = dict(installed)
    for name, gpus, terms in deployed:
        if terms is None or not gpus:
            out.pop(name, None)
        else:
            out[name] = (gpus, terms)
    for name in removed:
        out.pop(name, None)
    return out

