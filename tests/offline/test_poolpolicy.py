"""The GPU pool's policy (issue 27) on its own: which members make room for a
member that must load, sleep or stop, or wait, or never fit. No manager, no
process: members are values."""

from __future__ import annotations

import random
import threading
from dataclasses import replace

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from unitgen.inunit.gpuneed import Need, NeedSource
from unitgen.inunit.poolpolicy import (
    MAX_MIN_TURN,
    Action,
    Decision,
    GpuFree,
    Load,
    MemberState,
    Start,
    TurnRules,
    Verdict,
    decide,
    lock_order,
)

GIB = 1024**3
G0, G1, G2 = "GPU-00000000-aaaa", "GPU-11111111-bbbb", "GPU-22222222-cccc"
NOW = 10_000.0
RAM = 64 * GIB


def need(gib: float) -> Need:
    return Need(NeedSource.DECLARED, bytes=int(gib * GIB))


def member(name: str, gib: float, *, gpus: tuple[str, ...] = (G0,), state: Load = Load.LOADED,
           last_used: float = NOW - 100, **kw: object) -> MemberState:
    return MemberState(name=name, gpus=gpus, need=need(gib), state=state, last_used=last_used,
                       loaded_at=NOW - 3600, **kw)  # type: ignore[arg-type]


def pool(members: list[MemberState], totals: dict[str, float] | None = None,
         outside: dict[str, float] | None = None) -> list[GpuFree]:
    """The GPUs as NVML would report them with these members on them."""
    totals = totals or {G0: 80}
    out = []
    for u, t in totals.items():
        total = int(t * GIB)
        held = sum(m.holds(u, total) for m in members) + int((outside or {}).get(u, 0) * GIB)
        out.append(GpuFree(u, total, total - held))
    return out


def run(want: MemberState, others: list[MemberState], totals: dict[str, float] | None = None,
        ram: int = RAM, **kw: object) -> Decision:
    return decide(want, [*others, want], pool([*others, want], totals, **kw),  # type: ignore[arg-type]
                  ram, NOW)


def evicted(d: Decision) -> list[tuple[str, Action]]:
    return [(e.name, e.action) for e in d.evict]


# --- the scenarios ---------------------------------------------------


def test_two_members_of_30_gib_run_side_by_side_on_80_gib():
    a = member("a", 30)
    d = run(member("b", 30, state=Load.STOPPED), [a])
    assert (d.verdict, d.start, d.evict) == (Verdict.GO, Start.LOAD, ())
    assert d.reason == "b fits beside the loaded members"


def test_a_third_member_of_40_gib_evicts_the_least_recently_used():
    a, b = member("a", 30, last_used=NOW - 50), member("b", 30, last_used=NOW - 500)
    d = run(member("c", 40, state=Load.STOPPED), [a, b])
    assert d.verdict == Verdict.GO and evicted(d) == [("b", Action.STOP)]
    assert d.evict[0].frees == ((G0, 30 * GIB),) and not d.evict[0].drain
    assert d.locks == (G0,)


def test_a_member_that_needs_90_gib_is_refused_on_80():
    d = run(member("big", 90, state=Load.STOPPED), [member("a", 30)])
    assert d.verdict == Verdict.CANNOT_FIT and d.evict == ()
    assert d.reason == (f"big needs 90.0 GiB on GPU {G0}, which has 80.0 GiB in all "
                        "(90.0 GiB per GPU (declared))")


def test_memory_outside_the_pool_counts_against_fitting_at_all():
    d = run(member("m", 40, state=Load.STOPPED), [member("a", 10)], outside={G0: 50})
    assert d.verdict == Verdict.CANNOT_FIT
    assert d.reason == (f"m needs 40.0 GiB on GPU {G0}; 50.0 GiB of its 80.0 GiB is held by "
                        "processes outside the pool, leaving 30.0 GiB")


def test_a_tensor_parallel_member_evicts_on_each_of_its_gpus():
    a, b = member("a", 50, gpus=(G0,)), member("b", 50, gpus=(G1,))
    c = member("c", 20, gpus=(G2,))
    d = run(member("tp", 40, gpus=(G1, G0), state=Load.STOPPED), [a, b, c],
            totals={G0: 80, G1: 80, G2: 80})
    assert d.verdict == Verdict.GO and sorted(evicted(d)) == [("a", Action.STOP),
                                                              ("b", Action.STOP)]
    assert d.locks == (G0, G1)  # sorted, whatever order the member names them in


def test_a_member_on_two_gpus_is_evicted_whole_and_the_locks_cover_both():
    wide = member("wide", 50, gpus=(G0, G1))
    d = run(member("m", 60, state=Load.STOPPED), [wide], totals={G0: 80, G1: 80})
    assert evicted(d) == [("wide", Action.STOP)]
    assert d.evict[0].frees == ((G0, 50 * GIB), (G1, 50 * GIB)) and d.locks == (G0, G1)


def sleeper(name: str, gib: float, ram_gib: float, **kw: object) -> MemberState:
    return replace(member(name, gib), can_sleep=True, wake_seconds=3.0,
                   ram_asleep=int(ram_gib * GIB), **kw)  # type: ignore[arg-type]


def test_a_sleep_capable_member_sleeps_when_the_ram_budget_allows():
    d = run(member("c", 60, state=Load.STOPPED), [sleeper("a", 60, 30)], ram=64 * GIB)
    assert evicted(d) == [("a", Action.SLEEP)]


def test_past_the_ram_budget_it_is_stopped_instead():
    d = run(member("c", 60, state=Load.STOPPED), [sleeper("a", 60, 30)], ram=16 * GIB)
    assert evicted(d) == [("a", Action.STOP)]
    assert "asleep it would hold 30.0 GiB of host RAM, past the budget (0.0 GiB held of " \
           "16.0 GiB)" in d.evict[0].why


def test_members_already_asleep_count_against_the_budget():
    old = sleeper("old", 10, 40, state=Load.ASLEEP)
    d = run(member("c", 60, state=Load.STOPPED), [old, sleeper("a", 60, 30, last_used=NOW)],
            totals={G0: 80})
    assert evicted(d) == [("a", Action.STOP)]  # 40 + 30 > 64


def test_idle_past_idle_stop_is_stopped_not_slept():
    a = sleeper("a", 60, 30, idle_stop=600.0, last_used=NOW - 900)
    d = run(member("c", 60, state=Load.STOPPED), [a])
    assert evicted(d) == [("a", Action.STOP)] and "idle past its idle_stop (600 s)" in d.evict[0].why


def test_what_a_sleeper_keeps_on_the_gpu_must_leave_room():
    a = sleeper("a", 60, 30, asleep_held=2 * GIB)
    assert evicted(run(member("c", 70, state=Load.STOPPED), [a])) == [("a", Action.SLEEP)]
    assert evicted(run(member("c", 79, state=Load.STOPPED), [a])) == [("a", Action.STOP)]


def test_memory_a_stopped_member_still_shows_is_not_room_for_its_next_start():
    # the driver frees a killed process's memory late: that is no room yet
    gone = member("w", 40, state=Load.STOPPED, held={G0: 10 * GIB})
    d = run(gone, [member("a", 35)])
    assert evicted(d) == [("a", Action.STOP)]


def test_an_asleep_member_wakes_into_the_room_it_needs():
    want = sleeper("w", 40, 20, state=Load.ASLEEP, asleep_held=GIB)
    d = run(want, [member("a", 45)])
    assert d.start == Start.WAKE and evicted(d) == [("a", Action.STOP)]


# --- the order: idle, least recently used, cheapest to bring back ------------


def test_an_idle_member_goes_before_a_busy_one_even_if_used_more_recently():
    busy = member("busy", 40, in_flight=2, last_used=NOW - 1000)
    idle = member("idle", 40, last_used=NOW - 10)
    d = run(member("c", 40, state=Load.STOPPED), [busy, idle])
    assert evicted(d) == [("idle", Action.STOP)]


def test_a_busy_member_is_chosen_only_when_the_idle_ones_cannot_make_room_and_is_drained():
    busy, idle = member("busy", 50, in_flight=2), member("idle", 10)
    d = run(member("c", 40, state=Load.STOPPED), [busy, idle])
    assert evicted(d) == [("busy", Action.STOP)]  # the idle one alone frees too little
    assert d.evict[0].drain and "2 requests in flight, drained first" in d.evict[0].why


def test_least_recently_used_then_cheapest_to_bring_back():
    a, b = member("a", 40, last_used=NOW - 50), member("b", 40, last_used=NOW - 60)
    assert evicted(run(member("c", 40, state=Load.STOPPED), [a, b])) == [("b", Action.STOP)]
    slow = member("slow", 40, last_used=NOW - 60, load_seconds=90.0)
    quick = member("quick", 40, last_used=NOW - 60, load_seconds=10.0)
    assert evicted(run(member("c", 40, state=Load.STOPPED), [slow, quick])) == [
        ("quick", Action.STOP)]
    woken = sleeper("woken", 40, 10, last_used=NOW - 60)  # a wake (3 s) is cheaper than a load
    assert evicted(run(member("c", 40, state=Load.STOPPED), [quick, woken])) == [
        ("woken", Action.SLEEP)]


def test_a_draining_member_is_waited_for_not_evicted_again_and_not_taken_before_an_idle_one():
    draining = member("d", 30, state=Load.DRAINING, in_flight=1)
    idle = member("idle", 30, last_used=NOW - 5)
    d = run(member("c", 50, state=Load.STOPPED), [draining, idle])
    assert d.verdict == Verdict.GO and evicted(d) == [] and d.wait_for == ("d",)
    d = run(member("c", 70, state=Load.STOPPED), [draining, idle])
    assert evicted(d) == [("idle", Action.STOP)] and d.wait_for == ("d",)


def test_a_loading_member_or_one_in_its_minimum_turn_makes_it_wait():
    fresh = replace(member("fresh", 60), loaded_at=NOW - 1)
    d = run(member("c", 40, state=Load.STOPPED), [fresh])
    assert d.verdict == Verdict.WAIT and d.wait_for == ("fresh",)
    assert d.reason == "c waits: fresh's minimum turn ends in 4 s"
    d = run(member("c", 40, state=Load.STOPPED), [member("l", 60, state=Load.LOADING)])
    assert (d.verdict, d.reason) == (Verdict.WAIT, "c waits: l is loading")


def test_a_wanted_member_already_loaded_or_loading():
    assert run(member("a", 10), []).verdict == Verdict.GO
    assert run(member("a", 10, state=Load.LOADING), []).verdict == Verdict.WAIT


def test_a_swap_group_is_the_pool_whose_members_need_the_whole_gpu():
    whole = Need(NeedSource.ESTIMATE, fraction=1.0)
    a = replace(member("a", 1), need=whole)
    b = replace(member("b", 1, state=Load.STOPPED), need=whole)
    d = run(b, [a])
    assert evicted(d) == [("a", Action.STOP)] and d.start == Start.LOAD


def test_a_gpu_not_in_the_pool():
    d = decide(member("m", 10, state=Load.STOPPED), [], [GpuFree(G1, 80 * GIB, 80 * GIB)], RAM,
               NOW)
    assert (d.verdict, d.reason) == (Verdict.CANNOT_FIT,
                                     f"m runs on GPU {G0}, which is not in the pool")


# --- the turn's rules --------------------------------------------------------


def test_the_minimum_turn_is_bounded_and_the_wait_is_stated():
    with pytest.raises(ValueError, match="min_turn must be within 0-60 s"):
        TurnRules(min_turn=MAX_MIN_TURN + 1)
    rules = TurnRules(min_turn=5, turns_waited=4)
    assert rules.serve_queued
    assert rules.max_wait(load_timeout=120, drain=180) == 4 * (5 + 180 + 120)


# --- never deadlock ----------------------------------------------------------


def test_lock_order_is_one_global_order():
    assert lock_order((G2, G0), [G1, G0]) == (G0, G1, G2)
    assert lock_order() == ()


def _take(locks: dict[str, threading.Lock], order: tuple[str, ...], hold: threading.Barrier | None,
          got: list[bool]) -> None:
    held = []
    ok = True
    for i, gpu in enumerate(order):
        if not locks[gpu].acquire(timeout=2):
            ok = False
            break
        held.append(gpu)
        if hold is not None and i == 0:
            hold.wait(timeout=2)  # both holders have their first GPU: the classic crossing
    got.append(ok)
    for gpu in reversed(held):
        locks[gpu].release()


def test_two_members_taking_gpus_in_their_own_order_deadlock_and_in_lock_order_do_not():
    for orders, barrier, expect in (([(G0, G1), (G1, G0)], threading.Barrier(2), False),
                                    ([lock_order((G0, G1)), lock_order((G1, G0))], None, True)):
        locks = {g: threading.Lock() for g in (G0, G1)}
        got: list[bool] = []
        threads = [threading.Thread(target=_take, args=(locks, o, barrier, got)) for o in orders]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert all(got) is expect, orders


def test_many_members_taking_their_gpus_in_lock_order_all_get_them():
    gpus = [f"GPU-{i}" for i in range(8)]
    locks = {g: threading.Lock() for g in gpus}
    rng = random.Random(27)
    got: list[bool] = []

    def member_turns(seed: int) -> None:
        r = random.Random(seed)
        for _ in range(200):
            _take(locks, lock_order(r.sample(gpus, r.randint(1, 4))), None, got)

    threads = [threading.Thread(target=member_turns, args=(rng.random(),)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads) and len(got) == 1600 and all(got)


# --- properties over random pools -----------------------------------------------

UUIDS = (G0, G1, G2)


@st.composite
def pools(draw: st.DrawFn) -> tuple[MemberState, list[MemberState], list[GpuFree], int]:
    n = draw(st.integers(1, 3))
    uuids = UUIDS[:n]
    totals = {u: draw(st.sampled_from([24, 48, 80])) * GIB for u in uuids}
    members = []
    for i in range(draw(st.integers(0, 7))):
        on = tuple(draw(st.lists(st.sampled_from(uuids), min_size=1, max_size=2, unique=True)))
        members.append(MemberState(
            name=f"m{i}", gpus=on, need=Need(NeedSource.DECLARED, bytes=draw(st.integers(1, 30)) * GIB),
            state=draw(st.sampled_from([*[Load.LOADED] * 4, *Load])),
            in_flight=draw(st.integers(0, 2)), last_used=draw(st.integers(0, 100)),
            loaded_at=draw(st.sampled_from([0, 0, 0, NOW - 1])),
            load_seconds=draw(st.integers(1, 5)), can_sleep=draw(st.booleans()),
            wake_seconds=1.0, ram_asleep=draw(st.integers(0, 40)) * GIB,
            asleep_held=draw(st.integers(0, 1)) * GIB))
    want = MemberState(
        name="want", gpus=tuple(draw(st.lists(st.sampled_from(uuids), min_size=1, max_size=2,
                                              unique=True))),
        need=Need(NeedSource.DECLARED, bytes=draw(st.integers(1, 60)) * GIB),
        state=draw(st.sampled_from([Load.STOPPED, Load.ASLEEP])))
    gpus = []
    for u in uuids:
        outside = draw(st.integers(0, 10)) * GIB
        free = totals[u] - outside - sum(m.holds(u, totals[u]) for m in [*members, want])
        assume(free >= 0)
        gpus.append(GpuFree(u, totals[u], free))
    return want, members, gpus, draw(st.integers(0, 80)) * GIB


def _fits(want: MemberState, members: list[MemberState], gpus: list[GpuFree],
          freed: dict[str, int], wait_for: tuple[str, ...]) -> bool:
    by = {g.uuid: g for g in gpus}
    have = {u: want.holds(u, by[u].total) if want.state == Load.ASLEEP else 0 for u in by}
    return all(by[u].free + have[u] + freed.get(u, 0)
               + sum(m.holds(u, by[u].total) for m in members if m.name in wait_for)
               >= want.need.on(by[u].total) for u in want.gpus)


def _freed(d: Decision, skip: str = "") -> dict[str, int]:
    out: dict[str, int] = {}
    for e in d.evict:
        for u, b in e.frees:
            if e.name != skip:
                out[u] = out.get(u, 0) + b
    return out


def _evictable_now(m: MemberState) -> bool:
    return m.state == Load.ASLEEP or (m.state == Load.LOADED and m.loaded_at < NOW - 5)


@settings(max_examples=400, deadline=None)
@given(pools())
def test_properties_of_every_decision(case):
    want, members, gpus, ram = case
    d = decide(want, members, gpus, ram, NOW)
    shuffled = list(members)
    random.Random(len(members)).shuffle(shuffled)
    assert decide(want, shuffled, gpus, ram, NOW) == d  # the order of the list does not matter
    names = {m.name: m for m in members}
    if d.verdict == Verdict.GO:
        assert _fits(want, members, gpus, _freed(d), d.wait_for)
        for e in d.evict:  # only members sharing its GPUs, evictable now, each one needed
            m = names[e.name]
            assert set(m.gpus) & set(want.gpus) and _evictable_now(m)
            assert not _fits(want, members, gpus, _freed(d, skip=e.name), d.wait_for)
        sleepers = [names[e.name] for e in d.evict if e.action == Action.SLEEP]
        if sleepers:
            stopped = {e.name for e in d.evict}
            asleep = sum(m.ram_asleep for m in members
                         if m.state == Load.ASLEEP and m.name not in stopped)
            assert asleep + sum(m.ram_asleep for m in sleepers) <= ram
            assert all(m.can_sleep for m in sleepers)
        if any(names[e.name].in_flight for e in d.evict):
            # a busy member is taken only when the idle ones could not make room
            idle: dict[str, int] = {}
            for m in members:
                if _evictable_now(m) and not m.in_flight:
                    for u in m.gpus:
                        idle[u] = idle.get(u, 0) + m.holds(u, next(g.total for g in gpus
                                                                   if g.uuid == u))
            assert not _fits(want, members, gpus, idle, d.wait_for)
    by = {g.uuid: g for g in gpus}
    never = any(want.need.on(by[u].total) > by[u].free + sum(
        m.holds(u, by[u].total) for m in [*members, want]) for u in want.gpus)
    assert (d.verdict == Verdict.CANNOT_FIT) == never


@given(st.one_of(st.integers(1, 2**50).map(lambda b: Need(NeedSource.MEASURED, bytes=b)),
                 st.floats(0.01, 1.0).map(lambda f: Need(NeedSource.BACKEND_ARGS, fraction=f))))
def test_a_need_round_trips_through_a_command_line_word(n):
    assert Need.from_arg(n.to_arg()) == n


def test_a_need_is_bytes_or_a_fraction_and_rounds_up():
    assert Need(NeedSource.BACKEND_ARGS, fraction=0.9).on(80 * GIB) == 72 * GIB
    assert Need(NeedSource.BACKEND_ARGS, fraction=0.3).on(10) == 3
    assert Need(NeedSource.BACKEND_ARGS, fraction=0.33).on(10) == 4
    for bad in ({"bytes": 1, "fraction": 0.5}, {}, {"fraction": 1.5}, {"bytes": 0},
                {"fraction": float("nan")}):
        with pytest.raises(ValueError):
            Need(NeedSource.DECLARED, **bad)
    for word in ("40GiB", "declared", "guess:1", "declared:1.5x2"):
        with pytest.raises(ValueError):
            Need.from_arg(word)
    assert Need(NeedSource.DECLARED, bytes=40 * GIB).shown() == "40.0 GiB per GPU (declared)"
    assert Need(NeedSource.BACKEND_ARGS, fraction=0.9, detail="--gpu-memory-utilization 0.9"
                ).shown() == "0.9 of each GPU (backend-args: --gpu-memory-utilization 0.9)"
