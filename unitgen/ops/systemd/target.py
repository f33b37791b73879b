"""The systemd target: every verb for one manager (the system one, or the
user's with ``--user``), as :class:`unitgen.ops.interface.TargetOps` says.
Modules that talk D-Bus are imported by the verbs that need them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from unitgen.errors import Problem, SpecError, UnitgenError
from unitgen.ops.executables import SYSTEM_MANAGER_PATH, missing_program
from unitgen.ops.interface import DeployOptions, TargetOps, Where
from unitgen.ops.pipeline import Planned
from unitgen.ops.systemd.specs import describe, planner, verify_rendered
from unitgen.ops.verbs import check_specs, render_one
from unitgen.result import Result
from unitgen.targets.systemd.render import RenderContext

__all__ = ["SystemdOps"]


def _feature_problems(scope: str, planned: list[Planned]) -> list[Problem]:
    """What the features find wrong with the run's specs (no manager asked)."""
    from unitgen.ops.systemd.bindings import features  # noqa: PLC0415
    from unitgen.ops.systemd.session import Session  # noqa: PLC0415

    session = Session(scope)
    try:
        return [p for f in features(session) for p in f.problems(planned)]
    finally:
        session.close()


class SystemdOps(TargetOps):
    """systemd units over D-Bus; ``where.user`` picks the per-user manager."""

    name = "systemd"

    def __init__(self, where: Where) -> None:
        self.where = where
        self.scope = where.scope
        self._ctx: RenderContext | None = None

    @property
    def ctx(self) -> RenderContext:
        """This host's rendering context (interpreter, proxyd, scope)."""
        if self._ctx is None:
            self._ctx = RenderContext.detect(scope=self.scope)
        return self._ctx

    def check(self, paths: list[Path], *, verify: bool) -> Result:
        """See TargetOps; ``systemd-analyze verify`` reads the units, a program
        missing here is a notice (check may be for another host)."""
        target, alloc = planner(self.ctx, self.where.gpus_from)
        path = SYSTEM_MANAGER_PATH if self.scope == "system" else os.environ.get("PATH", "")

        def notices(planned: list[Planned]) -> list[str]:
            if unsafe := _feature_problems(self.scope, planned):
                raise SpecError(problems=unsafe)
            said = verify_rendered(planned) if verify else []
            return said + [f"{found}; fine when the units are for another host, deploy here "
                           "refuses it" for p in planned
                           if (found := missing_program(p.instance, path))]

        return check_specs(paths, target, alloc, describe=describe, notices=notices)

    def render(self, path: Path, out: Path | None) -> Result:
        """See TargetOps."""
        from unitgen.ops.pipeline import plan_paths  # noqa: PLC0415

        target, alloc = planner(self.ctx, self.where.gpus_from)
        planned = plan_paths([path], target, alloc, unplaceable=alloc.unplaceable)[0]
        hint = (f"/etc/unitgen/secrets/{planned.instance.name}.env (system) or "
                f"~/.config/unitgen/secrets/{planned.instance.name}.env (--user)")
        return render_one(planned, out, secret_hint=hint)

    def deploy(self, paths: list[Path], opts: DeployOptions) -> Result:
        """See TargetOps: the one transaction with the systemd adapter."""
        from unitgen.ops.systemd.deploy import SystemdDeploy  # noqa: PLC0415
        from unitgen.ops.transaction import run  # noqa: PLC0415

        return run(SystemdDeploy(self.scope, self.ctx), paths, opts)

    def status(self, names: list[str], detail: frozenset[str] = frozenset()) -> Result:
        """See TargetOps."""
        from unitgen.ops.systemd.status import status  # noqa: PLC0415

        return status(names, self.scope, detail)

    def ls(self) -> Result:
        """See TargetOps."""
        from unitgen.ops.systemd.status import list_instances  # noqa: PLC0415

        return list_instances(self.scope)

    def logs(self, name: str, *, lines: int, follow: bool) -> int:
        """journalctl over every unit of the instance and the manager's own lines."""
        from unitgen.ops.systemd.journal import journal_argv  # noqa: PLC0415
        from unitgen.targets.systemd.installed import require  # noqa: PLC0415

        units = require(self.scope, [name])[name].units
        argv = journal_argv(units, self.scope, lines=lines, follow=follow)
        try:
            return subprocess.run(argv, check=False).returncode
        except FileNotFoundError:
            raise UnitgenError("journalctl is not installed") from None

    def doctor(self, name: str) -> Result:
        """See TargetOps."""
        from unitgen.ops.systemd.doctor import doctor  # noqa: PLC0415

        return doctor(name, self.scope)

    def gpus(self) -> Result:
        """NVML's view, and each GPU pool's members (their manager is asked only
        when some are installed)."""
        from unitgen.ops.systemd.status import gpus_with_features  # noqa: PLC0415

        return gpus_with_features(self.scope)

    def doctor_unit(self, unit: str, port: int, path: str) -> Result:
        """Diagnose a unit unitgen did not write (GPUStack #2154's shape)."""
        from unitgen.ops.systemd.doctor import doctor_unit  # noqa: PLC0415

        return doctor_unit(unit, port, self.scope, path=path)

    def remove(self, names: list[str]) -> Result:
        """See TargetOps."""
        from unitgen.ops.systemd.deploy import remove  # noqa: PLC0415

        return remove(names, self.scope)
