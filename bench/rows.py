"""The shape every benchmark row takes, the two profiles, and the markdown table."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Profile:
    """How long to measure. ``quick`` (CI: seconds per row, proves the harness
    works) or ``full`` (the figures the README quotes)."""

    name: str
    load_seconds: float  # each wrk run
    stream_seconds: float  # each wrk run of the streaming row
    cli_rounds: int  # whole-process timings per command
    ready_rounds: int  # starts per readiness figure
    status_instances: int
    render_specs: int

    @property
    def quick(self) -> bool:
        """True for the CI profile."""
        return self.name == "quick"


QUICK = Profile("quick", load_seconds=1.0, stream_seconds=2.0, cli_rounds=3, ready_rounds=1,
                status_instances=10, render_specs=100)
FULL = Profile("full", load_seconds=8.0, stream_seconds=10.0, cli_rounds=21, ready_rounds=9,
               status_instances=100, render_specs=1000)


@dataclass(frozen=True)
class Row:
    """One line of the table: unitgen's figure, the baseline measured in the same
    run, their ratio, the goal and whether it was met (None: no goal/not measured)."""

    row: str
    ours: str
    baseline: str = "—"
    ratio: float | None = None
    goal: str = ""
    met: bool | None = None
    note: str = ""
    figures: dict[str, float] = field(default_factory=dict)  # raw numbers, for tests and JSON

    @classmethod
    def not_built(cls, row: str, goal: str, what: str) -> Row:
        """A row whose feature does not exist yet: no figure, and no fake one."""
        return cls(row=row, ours="n/a (not built yet)", goal=goal, note=what)


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _met(value: bool | None) -> str:
    return "—" if value is None else ("yes" if value else "**no**")


def table(rows: list[Row]) -> str:
    """The markdown table (notes as numbered footnotes under it)."""
    lines = ["| row | unitgen | baseline (same run) | ratio | goal | met? |",
             "|---|---|---|---|---|---|"]
    notes: list[str] = []
    for r in rows:
        mark = ""
        if r.note:
            notes.append(r.note)
            mark = f" [{len(notes)}]"
        lines.append(f"| {r.row}{mark} | {r.ours} | {r.baseline} | {_ratio(r.ratio)} | "
                     f"{r.goal} | {_met(r.met)} |")
    if notes:
        lines.append("")
        lines.extend(f"[{i}] {n}" for i, n in enumerate(notes, 1))
    return "\n".join(lines)


def report(rows: list[Row], *, profile: Profile, machine: str, load_before: str,
           load_after: str, started: str, seconds: float) -> str:
    """The whole results file: machine, profile, load, then the table."""
    return (
        f"# unitgen benchmark ({profile.name} profile)\n\n"
        f"- run: {started}, {seconds:.0f} s\n"
        f"- machine: {machine}\n"
        f"- load average (1/5/15 min) before: {load_before}; after: {load_after}\n"
        f"- command: `.venv/bin/python -m bench{' --quick' if profile.quick else ''}`\n\n"
        + table(rows) + "\n"
    )


def write_report(text: str, path: Path) -> None:
    """Write the results file (creating its directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
