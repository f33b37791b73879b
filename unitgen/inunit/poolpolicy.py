"""The GPU pool's policy (issue 27): on-demand members on the same GPUs share
them by memory. When a member must load and its GPUs lack room, :func:`decide`
says which members make room and how (sleep, keeping the process, or stop),
in what order, or that it must wait, or that it can never fit.

A pure function of the members' states, their memory needs, what NVML says is
free, the host-RAM budget for sleeping members and the time: no manager, no
process, no clock of its own. The mechanism (the swap proxy, later) reads the
states, takes the GPU locks in :func:`lock_order`, asks :func:`decide`, and
carries out the answer. Swap groups are the special case where every member
needs the whole GPU: one member at a time.

Which member makes room first:

1. idle members (no request in flight) before busy ones, which are drained
   first (a busy one is chosen only when the idle ones cannot make room);
2. among those, the least recently used;
3. then the cheapest to bring back (a wake before a load).

Members already draining are leaving anyway: their memory is counted as
coming, and they are waited for. Members loading, or within their minimum
turn (:class:`TurnRules`), are never evicted: if only they stand in the way,
the answer is to wait.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from unitgen.inunit.gpuneed import Need
from unitgen.inunit.nvml import gib

__all__ = ["MAX_MIN_TURN", "Action", "Decision", "Eviction", "GpuFree", "Load", "MemberState",
           "Start", "TurnRules", "Verdict", "decide", "lock_order"]

# A minimum turn longer than this would let one member keep a GPU from members
# that wait: the bound every waiting member's wait is computed with.
MAX_MIN_TURN = 60.0


class Load(StrEnum):
    """Where a member stands."""

    LOADED = "loaded"  # its server holds its memory and answers
    ASLEEP = "asleep"  # its process lives, its GPU memory is released (weights in host RAM)
    STOPPED = "stopped"
    LOADING = "loading"  # starting or waking: taking its memory now
    DRAINING = "draining"  # yielding: finishing its requests, then releasing its memory


class Action(StrEnum):
    """How a member makes room."""

    SLEEP = "sleep"  # keep the process, release the GPU memory (wake is quick)
    STOP = "stop"  # end the process (the next start is a full load)


class Start(StrEnum):
    """How the wanted member is brought in."""

    NONE = "none"  # it is loaded already
    WAKE = "wake"
    LOAD = "load"


class Verdict(StrEnum):
    """The kind of answer."""

    GO = "go"  # make room as listed (maybe nothing), wait for the drainers, then start
    WAIT = "wait"  # nothing to do now: ask again when a member named in wait_for changes
    CANNOT_FIT = "cannot-fit"  # not even with every other member gone


@dataclass(frozen=True)
class MemberState:
    """One member of the pool as the mechanism sees it now. Times are seconds
    on the clock ``now`` is given in (monotonic or Unix, the same for all)."""

    name: str
    gpus: tuple[str, ...]  # GPU UUIDs it runs on (several: tensor parallel)
    need: Need  # what it holds on each of them once loaded
    state: Load = Load.STOPPED
    in_flight: int = 0  # requests being answered now
    last_used: float = 0.0  # when it last answered a request
    loaded_at: float = 0.0  # when it last became loaded (its minimum turn runs from here)
    load_seconds: float = 60.0  # cost to bring it back from stopped: a full load
    can_sleep: bool = False  # its backend can release its GPU memory and keep its process
    wake_seconds: float = 0.0  # cost to bring it back from asleep
    ram_asleep: int = 0  # host RAM it holds while asleep (the weights, at vLLM's level 1)
    asleep_held: int = 0  # GPU memory it keeps on each GPU while asleep (its CUDA context)
    idle_stop: float | None = None  # idle this long: stopped, not put to sleep
    held: Mapping[str, int] | None = None  # what NVML saw it hold per GPU; None: from state
    min_turn: float | None = None  # its own minimum turn (None: the rules')

    def holds(self, gpu: str, total: int) -> int:
        """Bytes it holds on ``gpu`` now: measured if known, else from its state."""
        if gpu not in self.gpus:
            return 0
        if self.held is not None:
            return self.held.get(gpu, 0)
        if self.state in (Load.LOADED, Load.LOADING, Load.DRAINING):
            return self.need.on(total)
        return self.asleep_held if self.state == Load.ASLEEP else 0

    def cost_back(self) -> float:
        """Seconds to bring it back after it makes room (a wake if it can sleep)."""
        return self.wake_seconds if self.can_sleep else self.load_seconds


@dataclass(frozen=True)
class GpuFree:
    """One GPU of the pool: its size and what NVML says is free now (memory
    members hold is not free)."""

    uuid: str
    total: int
    free: int


# A waiting member stands behind at most this many turns of the others (a swap
# group's too: unitgen.features.swap.plan.SWAP_TURNS is this number).
TURNS_WAITED = 4

@dataclass(frozen=True)
class TurnRules:
    """The rules of a turn the mechanism consults (data, not code):

    * ``min_turn``: a member that became loaded keeps its GPUs this long
      before another member may evict it, so a load is never wasted on a
      request or two (at most :data:`MAX_MIN_TURN`);
    * ``serve_queued``: a member asked to make room first serves the requests
      already waiting in its socket (they asked for it before the others), as
      today's swap drain does;
    * ``turns_waited``: a waiting member waits at most this many turns of the
      others: :meth:`max_wait` is the bound a waiting request is given."""

    min_turn: float = 5.0
    serve_queued: bool = True
    turns_waited: int = TURNS_WAITED

    def __post_init__(self) -> None:
        if not 0 <= self.min_turn <= MAX_MIN_TURN:
            raise ValueError(f"min_turn must be within 0-{MAX_MIN_TURN:g} s, not {self.min_turn}")
        if self.turns_waited < 1:
            raise ValueError(f"turns_waited must be at least 1, not {self.turns_waited}")

    def max_wait(self, load_timeout: float, drain: float) -> float:
        """The longest a member waits for its turn: each turn ahead of it is a
        minimum turn, a drain and a load (bounded by its health timeout)."""
        return self.turns_waited * (self.min_turn + drain + load_timeout)


@dataclass(frozen=True)
class Eviction:
    """One member making room."""

    name: str
    action: Action
    drain: bool  # it has requests in flight: drain it first (bounded by its swap_drain)
    frees: tuple[tuple[str, int], ...]  # (GPU, bytes) it gives back
    why: str


@dataclass(frozen=True)
class Decision:
    """What the mechanism does for a member that wants to run."""

    verdict: Verdict
    start: Start = Start.NONE
    evict: tuple[Eviction, ...] = ()  # in this order
    wait_for: tuple[str, ...] = ()  # GO: drainers it counts on; WAIT: who stands in the way
    locks: tuple[str, ...] = ()  # the GPUs to hold while this is carried out, in lock order
    reason: str = ""


def lock_order(*gpu_sets: Iterable[str]) -> tuple[str, ...]:
    """The GPUs of ``gpu_sets`` in the one order every lock holder takes them:
    sorted UUIDs, each once. Everyone taking locks in one global order cannot
    deadlock (no two holders can each wait for the other's GPU). A holder
    that learns it needs a GPU outside what it holds releases all and takes
    the whole set again in this order."""
    return tuple(sorted({g for gpus in gpu_sets for g in gpus}))


@dataclass
class _Room:
    """The shortfall per GPU of the wanted member while room is being made."""

    gpus: Mapping[str, GpuFree]
    short: dict[str, int] = field(default_factory=dict)

    def fits(self) -> bool:
        return all(s <= 0 for s in self.short.values())

    def helps(self, m: MemberState) -> bool:
        return any(s > 0 and m.holds(u, self.gpus[u].total) > 0 for u, s in self.short.items())

    def take(self, m: MemberState, keep: int = 0, sign: int = 1) -> None:
        for u in self.short:
            got = m.holds(u, self.gpus[u].total)
            if got:
                self.short[u] -= sign * max(0, got - keep)


def decide(want: MemberState, members: Sequence[MemberState], gpus: Sequence[GpuFree],
           ram_budget: int, now: float, rules: TurnRules | None = None) -> Decision:
    """What to do so that ``want`` runs. ``members`` are the pool's members
    (``want`` among them or not); ``gpus`` at least ``want``'s; ``ram_budget``
    the host RAM sleeping members may hold together; ``now`` on the members' clock."""
    rules = rules or TurnRules()
    by_uuid = {g.uuid: g for g in gpus}
    others = sorted((m for m in members if m.name != want.name), key=lambda m: m.name)
    if want.state == Load.LOADED:
        return Decision(Verdict.GO, reason=f"{want.name} is loaded")
    if want.state in (Load.LOADING, Load.DRAINING):
        return Decision(Verdict.WAIT, wait_for=(want.name,),
                        reason=f"{want.name} is {want.state.value}")
    refused = _never_fits(want, others, by_uuid)
    if refused:
        return Decision(Verdict.CANNOT_FIT, reason=refused)
    start = Start.WAKE if want.state == Load.ASLEEP else Start.LOAD
    # a wake reuses what it kept on the GPU; a stopped member's leftovers are not its own
    have = {u: want.holds(u, by_uuid[u].total) if start == Start.WAKE else 0 for u in want.gpus}
    room = _Room(by_uuid, {u: want.need.on(by_uuid[u].total) - have[u] - by_uuid[u].free
                           for u in want.gpus})
    drainers = [m for m in others if m.state == Load.DRAINING and room.helps(m)]
    for m in drainers:
        room.take(m)
    chosen = _choose(room, [m for m in others if _evictable(m, now, rules)])
    if not room.fits():
        return _wait(want, others, now, rules)
    evictions = _actions(want, others, chosen, room, ram_budget, now)
    touched = [m.gpus for m in chosen]
    return Decision(Verdict.GO, start, tuple(evictions), tuple(m.name for m in drainers),
                    lock_order(want.gpus, *touched),
                    _summary(want, evictions, drainers))


def _never_fits(want: MemberState, others: Sequence[MemberState],
                gpus: Mapping[str, GpuFree]) -> str:
    """Why ``want`` cannot fit even with every other member gone ("" if it can)."""
    for u in want.gpus:
        g = gpus.get(u)
        if g is None:
            return f"{want.name} runs on GPU {u}, which is not in the pool"
        need = want.need.on(g.total)
        if need > g.total:
            return (f"{want.name} needs {gib(need)} on GPU {u}, which has {gib(g.total)} "
                    f"in all ({want.need.shown()})")
        members = sum(m.holds(u, g.total) for m in (want, *others))
        outside = max(0, g.total - g.free - members)
        if need > g.total - outside:
            return (f"{want.name} needs {gib(need)} on GPU {u}; {gib(outside)} of its "
                    f"{gib(g.total)} is held by processes outside the pool, leaving "
                    f"{gib(g.total - outside)}")
    return ""


def _min_turn(m: MemberState, rules: TurnRules) -> float:
    return rules.min_turn if m.min_turn is None else min(m.min_turn, MAX_MIN_TURN)


def _evictable(m: MemberState, now: float, rules: TurnRules) -> bool:
    if m.state == Load.ASLEEP:
        return True
    return m.state == Load.LOADED and now - m.loaded_at >= _min_turn(m, rules)


def _choose(room: _Room, candidates: list[MemberState]) -> list[MemberState]:
    """Members to evict: greedily in the policy's order until ``want`` fits,
    then without those the later ones made unneeded (so a busy member is
    taken only when the idle ones cannot make room, and none for nothing)."""
    order = sorted(candidates, key=lambda m: (m.in_flight > 0, m.last_used, m.cost_back(), m.name))
    chosen: list[MemberState] = []
    for m in order:
        if room.fits():
            break
        if room.helps(m):
            chosen.append(m)
            room.take(m)
    if not room.fits():
        return chosen
    for m in reversed(list(chosen)):
        room.take(m, sign=-1)
        if room.fits():
            chosen.remove(m)
        else:
            room.take(m)
    return chosen


def _actions(want: MemberState, others: Sequence[MemberState], chosen: list[MemberState],
             room: _Room, ram_budget: int, now: float) -> list[Eviction]:
    """Sleep or stop, in the chosen order: sleep when the member can, is not
    idle past its idle_stop, its host RAM fits the budget and what it keeps on
    the GPU still leaves room; otherwise stop."""
    leaving = {m.name for m in chosen}
    ram = sum(m.ram_asleep for m in others if m.state == Load.ASLEEP and m.name not in leaving)
    out = []
    for m in chosen:
        why = f"idle since {now - m.last_used:.0f} s ago" if not m.in_flight else (
            f"{m.in_flight} requests in flight, drained first")
        action = Action.STOP
        if m.state == Load.ASLEEP:
            why += "; asleep already: stopped to free what it keeps"
        elif not m.can_sleep:
            why += "; its server cannot sleep"
        elif m.idle_stop is not None and now - m.last_used >= m.idle_stop:
            why += f"; idle past its idle_stop ({m.idle_stop:g} s)"
        elif ram + m.ram_asleep > ram_budget:
            why += (f"; asleep it would hold {gib(m.ram_asleep)} of host RAM, past the budget "
                    f"({gib(ram)} held of {gib(ram_budget)})")
        else:
            room.take(m, sign=-1)
            room.take(m, keep=m.asleep_held)
            if room.fits():
                action, ram = Action.SLEEP, ram + m.ram_asleep
            else:
                room.take(m, keep=m.asleep_held, sign=-1)
                room.take(m)
                why += "; what it keeps on the GPU asleep would leave too little room"
        keep = m.asleep_held if action == Action.SLEEP else 0
        frees = tuple((u, max(0, m.holds(u, room.gpus[u].total) - keep))
                      for u in m.gpus if u in room.gpus)
        out.append(Eviction(m.name, action, m.in_flight > 0 and m.state != Load.ASLEEP,
                            frees, why))
    return out


def _wait(want: MemberState, others: Sequence[MemberState], now: float,
          rules: TurnRules) -> Decision:
    """Only members that cannot be evicted yet stand in the way."""
    blocking = [m for m in others if set(m.gpus) & set(want.gpus)
                and m.state in (Load.LOADING, Load.LOADED, Load.DRAINING)
                and not _evictable(m, now, rules)]
    parts = []
    for m in blocking:
        if m.state == Load.LOADED:
            parts.append(f"{m.name}'s minimum turn ends in "
                         f"{max(0.0, m.loaded_at + _min_turn(m, rules) - now):.0f} s")
        else:
            parts.append(f"{m.name} is {m.state.value}")
    return Decision(Verdict.WAIT, wait_for=tuple(m.name for m in blocking),
                    reason=f"{want.name} waits: " + ("; ".join(parts) or "no room yet"))


def _summary(want: MemberState, evictions: list[Eviction], drainers: list[MemberState]) -> str:
    if not evictions and not drainers:
        return f"{want.name} fits beside the loaded members"
    parts = [f"{e.action.value} {e.name}" for e in evictions]
    parts += [f"wait for {m.name} (draining)" for m in drainers]
    return f"{want.name}: " + ", ".join(parts)
