"""GPU reading, reporting and placement in-process, word for word (the CLI
tests in test_gpus.py run them in a subprocess). NVML is faked at the pynvml
function boundary; everything above it is real."""

from __future__ import annotations

import os

import pytest

from tests.nvml import GIB, ZERO_GPUS, eight_gpus, fake_nvml, uuid
from unitgen.errors import SpecError
from unitgen.plan.gpus import Placement, gpus_report, place

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
