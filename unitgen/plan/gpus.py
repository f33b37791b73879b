"""GPU placement: which GPUs an instance gets, and whether its declared memory
is free there. A pure function of the GPUs (read by :mod:`unitgen.inunit.nvml`),
the other instances' claims and the spec's wants."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from unitgen.errors import Problem, SpecError
from unitgen.inunit.nvml import Gpu, gib

__all__ = ["Placement", "place"]


@dataclass(frozen=True)
class Placement:
    """Where an instance runs: GPU UUIDs (stable across reboots) and device minors."""

    uuids: tuple[str, ...]
    minors: tuple[int, ...] | None  # None: unknown (rendered without NVML)
    share: bool = False
    notices: tuple[str, ...] = field(default_factory=tuple)


def place(
    *,
    source: str,
    name: str,
    want: int | tuple[int, ...] | tuple[str, ...],
    memory: int | None,
    share: bool,
    gpus: list[Gpu] | None,
    claims: dict[str, list[tuple[str, bool]]],
    manager: str = "system",
    mates: frozenset[str] = frozenset(),
) -> Placement:
    """Choose GPUs for instance ``name``.

    ``gpus`` is None when NVML is unavailable (offline render: only UUIDs work).
    ``claims`` maps a GPU UUID to the other instances placed there (name, shares).
    ``manager`` names the manager the instance goes to, as the GPU inventory
    names a process's (:attr:`GpuProcess.manager`): only processes of its
    instance under that very manager are its own.
    ``mates`` are the instances that make room for it (the other members of
    its swap group): their claims are no conflict and their memory counts as free.
    """
    def fail(message: str) -> SpecError:
        return SpecError(problems=[Problem(source, "gpus", message)])

    mine = mates | {name}
    others = {u: [(n, s) for n, s in c if n not in mine] for u, c in claims.items()}
    if gpus is None:
        if isinstance(want, tuple) and want and isinstance(want[0], str):
            uuids = tuple(str(w) for w in want)
            _check_claims(fail, uuids, others, share, name)
            return Placement(uuids, None, share, ("NVML is not available: GPUs rendered by UUID "
                                                  "without checking them",))
        raise fail("choosing GPUs by count or index needs NVML (an NVIDIA driver) on this host; "
                   "give GPU UUIDs to render elsewhere")
    if isinstance(want, int):
        chosen = _by_count(fail, gpus, want, claims, others, share, name, mine, manager)
    else:
        chosen = _by_name(fail, gpus, want)
        _check_claims(fail, tuple(g.uuid for g in chosen), others, share, name)
    if memory is not None:
        _check_memory(source, chosen, memory, name, mine, manager)
    minors = tuple(g.minor for g in chosen if g.minor is not None)
    return Placement(tuple(g.uuid for g in chosen),
                     minors if len(minors) == len(chosen) else None, share)


def _by_count(fail: Callable[[str], SpecError], gpus: list[Gpu], want: int,
              claims: dict[str, list[tuple[str, bool]]],
              others: dict[str, list[tuple[str, bool]]], share: bool, name: str,
              mine: frozenset[str], manager: str) -> list[Gpu]:
    """``want`` GPUs: the ones it has (a redeploy keeps its GPUs), else the most free."""
    if want > len(gpus):
        raise fail(f"asks for {want} GPUs; this host has {len(gpus)}")
    usable = [g for g in gpus if _may_use(others.get(g.uuid, []), share)]
    if len(usable) < want:
        taken = ", ".join(f"{g.index} ({', '.join(n for n, _ in others[g.uuid])})"
                          for g in gpus if others.get(g.uuid))
        raise fail(f"asks for {want} GPUs but only {len(usable)} are not claimed by other "
                   f"instances (claimed: {taken}); set gpu_share = true to share")
    by_uuid = {g.uuid: g for g in gpus}
    current = [by_uuid[u] for u, c in claims.items()
               if any(n == name for n, _ in c) and u in by_uuid and by_uuid[u] in usable]
    if len(current) == want:
        return sorted(current, key=lambda g: g.index)
    usable.sort(key=lambda g: (-_free_for(g, mine, manager), g.index))
    return sorted(usable[:want], key=lambda g: g.index)


def _by_name(fail: Callable[[str], SpecError], gpus: list[Gpu],
             want: tuple[int, ...] | tuple[str, ...]) -> list[Gpu]:
    """The GPUs named by index or UUID."""
    by_uuid = {g.uuid: g for g in gpus}
    by_index = {g.index: g for g in gpus}
    chosen = []
    for item in want:
        gpu = by_index.get(item) if isinstance(item, int) else by_uuid.get(item)
        if gpu is None:
            known = ", ".join(f"{g.index}={g.uuid}" for g in gpus) or "none"
            raise fail(f"GPU {item} is not on this host (GPUs: {known})")
        chosen.append(gpu)
    return chosen


def _check_memory(source: str, chosen: list[Gpu], memory: int, name: str,
                  mine: frozenset[str], manager: str) -> None:
    for g in chosen:
        free = _free_for(g, mine, manager)
        if free < memory:
            holders = ", ".join(
                f"pid {p.pid}" + (f" ({p.instance})" if p.instance else "")
                + f" {gib(p.used_bytes)}" for p in g.processes
                if not p.belongs_to(name, manager)
            ) or "no process NVML can see"
            raise SpecError(problems=[Problem(
                source, "gpu_memory",
                f"needs {gib(memory)} but GPU {g.index} ({g.uuid}) has {gib(free)} free of "
                f"{gib(g.total)}; the rest is held by {holders}")])


def _free_for(g: Gpu, names: frozenset[str], manager: str) -> int:
    """Free memory, counting what this instance's own processes (a redeploy
    replaces them) and its swap-group mates' (they unload first) hold as free."""
    return g.free + sum(p.used_bytes for p in g.processes
                        if any(p.belongs_to(n, manager) for n in names))


def _may_use(claimers: list[tuple[str, bool]], share: bool) -> bool:
    return not claimers or (share and all(s for _, s in claimers))


def _check_claims(
    fail: Callable[[str], SpecError],
    uuids: tuple[str, ...],
    others: dict[str, list[tuple[str, bool]]],
    share: bool,
    name: str,
) -> None:
    for uuid in uuids:
        claimers = others.get(uuid, [])
        if not _may_use(claimers, share):
            names = ", ".join(n for n, _ in claimers)
            raise fail(f"GPU {uuid} is already claimed by {names}; set gpu_share = true in "
                       "every instance that shares it")
