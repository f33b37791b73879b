"""What every target provides (pre-commit's ``lang_base``: one Protocol, a dict
from name to module). The CLI and the Ansible modules reach a target through
:mod:`unitgen.ops.registry`, never by its name; deploy's steps are the one
transaction of :mod:`unitgen.ops.transaction`."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from unitgen.errors import NotAvailableError
from unitgen.result import Result
from unitgen.spec.ports import DEFAULT_PORT_RANGE

__all__ = ["DeployOptions", "Say", "TargetOps", "Where"]

Say = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _rewrite_line(line: str) -> None:
    sys.stderr.write("\r\x1b[K" + line)
    sys.stderr.flush()


@dataclass(frozen=True)
class Where:
    """Which manager a command works with, as the CLI's options say. Each target
    reads what concerns it: ``user`` (the per-user systemd manager), supervisord's
    URL and include directory."""

    user: bool = False
    supervisor_url: str | None = None
    conf_dir: Path | None = None
    gpus_from: Path | None = None

    @property
    def scope(self) -> str:
        """``user`` or ``system``."""
        return "user" if self.user else "system"


@dataclass(frozen=True)
class DeployOptions:
    """How deploy runs. ``say`` prints progress (stderr); ``tty`` allows a live
    line (``live`` rewrites it); ``show`` prints diffs before they are applied."""

    dry_run: bool = False
    diff: bool = False
    wait: bool = True
    port_range: tuple[int, int] = DEFAULT_PORT_RANGE
    say: Say = field(default=_stderr)
    tty: bool = False
    live: Say = _rewrite_line
    show: Say | None = None
    poll: float = 0.2  # how often a target that polls for readiness asks


class TargetOps(Protocol):
    """One process manager: every verb of the CLI, for that manager. A target
    subclasses this class: the optional verbs (``doctor_unit``) have a default
    that says the target does not offer them, so no caller asks whether a
    target has a verb."""

    name: str

    def check(self, paths: list[Path], *, verify: bool) -> Result:
        """Validate, plan and render in memory; every problem of every file."""
        ...

    def render(self, path: Path, out: Path | None) -> Result:
        """The files of one spec, printed (secrets redacted) or written into ``out``."""
        ...

    def deploy(self, paths: list[Path], opts: DeployOptions) -> Result:
        """Install or update instances and wait until they answer."""
        ...

    def status(self, names: list[str], detail: frozenset[str] = frozenset()) -> Result:
        """State of the named instances (all when none are named); ``detail``:
        what features add on request (``keys``: each gateway's counters per key)."""
        ...

    def ls(self) -> Result:
        """Installed instances, from the files alone."""
        ...

    def logs(self, name: str, *, lines: int, follow: bool) -> int:
        """Print an instance's logs; the exit code."""
        ...

    def doctor(self, name: str) -> Result:
        """Does the instance listen where its socket forwards and its probe checks?"""
        ...

    def remove(self, names: list[str]) -> Result:
        """Stop and delete exactly the files unitgen generated for ``names``."""
        ...

    def gpus(self) -> Result:
        """The GPUs, their memory and processes. By default NVML's view alone; a
        target adds what its features say of the GPUs (a pool's members)."""
        from unitgen.ops.gpus import gpus_report  # noqa: PLC0415 - NVML only when asked

        return gpus_report()

    def doctor_unit(self, unit: str, port: int, path: str) -> Result:
        """Diagnose a unit unitgen did not write, whose health check probes
        ``port`` at ``path``. Optional: by default the target has none."""
        raise NotAvailableError(f"--unit is not available with the {self.name} target: it has "
                                "no units of its own to diagnose (give an instance NAME)")
