"""GPU reading, reporting and placement in-process, word for word (the CLI
tests in test_gpus.py run them in a subprocess). NVML is faked at the pynvml
function boundary; everything above it is real."""

from __future__ import annotations

import os

import pytest

from tests.nvml import GIB, ZERO_GPUS, eight_gpus, fake_nvml, uuid
from unitgen.errors import SpecError
from unitgen.inunit.nvml import Gpu, GpuProcess
from unitgen.ops.gpus import gpus_report
from unitgen.plan.gpus import Placement, place

__all__ = ["fake_nvml"]  # the fixture, re-exported for pytest


@pytest.mark.parametrize(("error", "reason"), [
    ("library_not_found", "no NVIDIA driver library (libnvidia-ml.so) on this host"),
    ("driver_not_loaded", "the NVIDIA driver is not loaded"),
    ("no_permission", "no permission to query the NVIDIA driver"),
])
def test_report_without_nvml_says_why(fake_nvml, error, reason):
    fake_nvml({"error": error})
    result = gpus_report()
    assert result.data == {"available": False, "reason": reason, "gpus": []}
    assert result.lines == (f"no NVIDIA GPUs: {reason}",)
    assert result.exit_code == 0


def test_report_of_zero_gpus(fake_nvml):
    fake_nvml(ZERO_GPUS)
    result = gpus_report()
    assert result.data == {"available": True, "gpus": []}
    assert result.lines == ("NVML works but reports 0 GPUs",)


def test_report_lines(fake_nvml):
    gone = 2**22 + 7
    fake_nvml(eight_gpus(processes={3: [{"pid": os.getpid(), "used": 10 * GIB},
                                        {"pid": gone, "used": GIB}]}))
    lines = gpus_report().lines
    assert len(lines) == 10
    assert lines[0] == (f"0  {uuid(0)}  NVIDIA H100 80GB HBM3  0.5 GiB used / 80.0 GiB "
                        "(79.5 GiB free)")
    assert lines[3] == (f"3  {uuid(3)}  NVIDIA H100 80GB HBM3  11.5 GiB used / 80.0 GiB "
                        "(68.5 GiB free)")
    assert lines[4] == f"     pid {os.getpid()}  10.0 GiB  not a unitgen instance"
    assert lines[5] == f"     pid {gone}  1.0 GiB  exited"


def place_offline(want: int | tuple[int, ...] | tuple[str, ...],
                  claims: dict[str, list[tuple[str, bool]]] | None = None,
                  share: bool = False) -> Placement:
    return place(source="p.toml", name="me", want=want, memory=None, share=share, gpus=None,
                 claims=claims or {})


def test_offline_placement_takes_uuids_with_a_notice():
    got = place_offline((uuid(1), uuid(2)), share=True)
    assert got == Placement((uuid(1), uuid(2)), None, True,
                            ("NVML is not available: GPUs rendered by UUID without checking them",))


@pytest.mark.parametrize("want", [1, (0, 1)])
def test_offline_placement_by_count_or_index_is_refused(want):
    with pytest.raises(SpecError) as info:
        place_offline(want)
    assert [str(p) for p in info.value.problems] == [
        "p.toml: gpus: choosing GPUs by count or index needs NVML (an NVIDIA driver) on this "
        "host; give GPU UUIDs to render elsewhere"]


def test_offline_placement_still_checks_claims():
    claims = {uuid(1): [("other", False), ("me", False)]}
    with pytest.raises(SpecError) as info:
        place_offline((uuid(1),), claims=claims, share=True)
    assert [str(p) for p in info.value.problems] == [
        f"p.toml: gpus: GPU {uuid(1)} is already claimed by other; set gpu_share = true in "
        "every instance that shares it"]
    # its own earlier claim does not count against it
    assert place_offline((uuid(1),), claims={uuid(1): [("me", False)]}).uuids == (uuid(1),)
    # sharing works only when every claimer shares
    shared = {uuid(1): [("other", True)]}
    assert place_offline((uuid(1),), claims=shared, share=True).uuids == (uuid(1),)
    with pytest.raises(SpecError):
        place_offline((uuid(1),), claims=shared, share=False)


def host_gpus(n: int = 4, free: dict[int, int] | None = None) -> list[Gpu]:
    free = free or {}
    return [Gpu(i, uuid(i), "H100", i, 80 * GIB, 80 * GIB - free.get(i, 70 * GIB),
                 free.get(i, 70 * GIB)) for i in range(n)]


def place_on(gpus: list[Gpu], want: int | tuple[int, ...] | tuple[str, ...],
             claims: dict[str, list[tuple[str, bool]]] | None = None, share: bool = False,
             memory: int | None = None) -> Placement:
    return place(source="p.toml", name="me", want=want, memory=memory, share=share, gpus=gpus,
                 claims=claims or {})


def refused(**kwargs: object) -> list[str]:
    with pytest.raises(SpecError) as info:
        place_on(**kwargs)  # type: ignore[arg-type]
    return [str(p) for p in info.value.problems]


def test_count_placement_prefers_free_memory_then_index():
    gpus = host_gpus(free={0: 10 * GIB, 1: 70 * GIB, 2: 70 * GIB, 3: 40 * GIB})
    assert place_on(gpus, 2) == Placement((uuid(1), uuid(2)), (1, 2), False)
    assert place_on(gpus, 4).uuids == tuple(uuid(i) for i in range(4))  # every GPU there is


def test_count_placement_refusals_name_the_numbers_and_the_claimers():
    gpus = host_gpus()
    assert refused(gpus=gpus, want=5) == ["p.toml: gpus: asks for 5 GPUs; this host has 4"]
    claims = {uuid(0): [("a", False)], uuid(2): [("b", True), ("c", True)]}
    assert refused(gpus=gpus, want=3, claims=claims) == [
        "p.toml: gpus: asks for 3 GPUs but only 2 are not claimed by other instances "
        "(claimed: 0 (a), 2 (b, c)); set gpu_share = true to share"]
    # sharing GPUs whose claimers all share
    assert place_on(gpus, 3, claims=claims, share=True).uuids == (uuid(1), uuid(2), uuid(3))
    assert place_on(gpus, 2, claims=claims).uuids == (uuid(1), uuid(3))


def test_a_redeploy_keeps_its_gpus():
    gpus = host_gpus(free={0: 70 * GIB, 1: 10 * GIB, 2: 70 * GIB, 3: 70 * GIB})
    claims = {uuid(1): [("me", False)], uuid(3): [("me", False)]}
    assert place_on(gpus, 2, claims=claims).uuids == (uuid(1), uuid(3))


def test_index_and_uuid_placement():
    gpus = host_gpus()
    assert place_on(gpus, (2, 0)).uuids == (uuid(2), uuid(0))
    assert place_on(gpus, (uuid(3),)) == Placement((uuid(3),), (3,), False)
    assert refused(gpus=gpus, want=(7,)) == [
        "p.toml: gpus: GPU 7 is not on this host (GPUs: "
        + ", ".join(f"{i}={uuid(i)}" for i in range(4)) + ")"]


def test_memory_refusal_names_the_holders():
    gpus = [Gpu(0, uuid(0), "H100", 0, 80 * GIB, 60 * GIB, 20 * GIB,
                (GpuProcess(11, 30 * GIB, "other", manager="system"),
                 GpuProcess(12, 10 * GIB, "me", manager="system"),
                 GpuProcess(13, 20 * GIB, None)))]
    # its own processes count as free (a redeploy replaces them)
    assert place_on(gpus, 1, memory=30 * GIB).uuids == (uuid(0),)
    assert refused(gpus=gpus, want=1, memory=31 * GIB) == [
        f"p.toml: gpu_memory: needs 31.0 GiB but GPU 0 ({uuid(0)}) has 30.0 GiB free of "
        "80.0 GiB; the rest is held by pid 11 (other) 30.0 GiB, pid 13 20.0 GiB"]
