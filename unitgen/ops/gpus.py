"""``unitgen gpus``: what the GPU inventory says, as a result to print."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

from unitgen.inunit.nvml import GpuUnavailableError, gib, read_gpus
from unitgen.result import Result

__all__ = ["gpus_report"]


def gpus_report(sections: Sequence[tuple[dict[str, object], tuple[str, ...]]] = ()) -> Result:
    """Every GPU, its memory and processes, and their instances, then what the
    features say (``sections``: data and lines each, a GPU pool's members).
    Without NVML: one line saying why, exit 0 (CPU-only hosts are fine)."""
    try:
        gpus = read_gpus()
    except GpuUnavailableError as exc:
        return Result(data={"available": False, "reason": exc.message, "gpus": []},
                      lines=(f"no NVIDIA GPUs: {exc.message}",))
    data: dict[str, object] = {"available": True, "gpus": [asdict(g) for g in gpus]}
    lines: list[str] = []
    for g in gpus:
        lines.append(f"{g.index}  {g.uuid}  {g.name}  {gib(g.used)} used / {gib(g.total)} "
                     f"({gib(g.free)} free)")
        for p in g.processes:
            owner = (f"{p.instance} ({p.manager} manager)" if p.instance else
                     "exited" if not p.alive else "not a unitgen instance")
            lines.append(f"     pid {p.pid}  {gib(p.used_bytes)}  {owner}")
    if not gpus:
        lines.append("NVML works but reports 0 GPUs")
    for said, more in sections:
        data.update(said)
        lines += more
    return Result(data=data, lines=tuple(lines))
