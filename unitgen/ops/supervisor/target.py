"""The supervisor target: every verb for one supervisord (its XML-RPC URL and
include directory: options, then environment variables, then what
supervisorctl would read), as :class:`unitgen.ops.interface.TargetOps` says."""

from __future__ import annotations

import sys
from pathlib import Path

from unitgen.errors import UnitgenError
from unitgen.ops.interface import DeployOptions, TargetOps, Where
from unitgen.ops.pipeline import CheckAllocator, Planned, plan_paths
from unitgen.ops.supervisor.site import Site, context
from unitgen.ops.verbs import check_specs, render_one
from unitgen.result import Result
from unitgen.spec.ports import PRIVATE_PORT_RANGE
from unitgen.targets.supervisor.render import SupervisorTarget, target_notices

__all__ = ["SupervisorOps"]


class SupervisorOps(TargetOps):
    """supervisord programs over XML-RPC."""

    name = "supervisor"

    def __init__(self, where: Where) -> None:
        self.where = where
        if where.user:
            raise UnitgenError("--user is for the systemd target (a user manager); supervisord "
                               "is chosen with --supervisor-url and --conf-dir")

    def site(self, *, need_proxyd: bool = True) -> Site:
        """The supervisord this works with (resolved when a verb needs it)."""
        return Site.resolve(self.where.supervisor_url, self.where.conf_dir,
                            need_proxyd=need_proxyd)

    def _alloc(self) -> CheckAllocator:
        from unitgen.ops.pipeline import HostGpus  # noqa: PLC0415

        host = HostGpus.from_file(self.where.gpus_from) if self.where.gpus_from else None
        return CheckAllocator(host, private_range=PRIVATE_PORT_RANGE)

    def check(self, paths: list[Path], *, verify: bool) -> Result:
        """See TargetOps (supervisord has no offline verifier: ``verify`` is moot)."""
        def notices(planned: list[Planned]) -> list[str]:
            return [f"{p.path}: {n}" for p in planned for n in target_notices(p.instance)]

        return check_specs(paths, SupervisorTarget(context(need_proxyd=False)), self._alloc(),
                           describe=lambda p: f"public {p.instance.public.listen()}, "
                                              "supervisord owns it",
                           notices=notices,
                           extra=lambda p: {"files": [f.name for f in p.files]})

    def render(self, path: Path, out: Path | None) -> Result:
        """See TargetOps."""
        ctx = context()
        alloc = self._alloc()
        planned = plan_paths([path], SupervisorTarget(ctx), alloc,
                             unplaceable=alloc.unplaceable)[0]
        return render_one(planned, out, secret_hint=f"{ctx.secrets_dir}/{planned.instance.name}"
                          ".env", notices=target_notices(planned.instance), target=self.name)

    def deploy(self, paths: list[Path], opts: DeployOptions) -> Result:
        """See TargetOps: the one transaction with the supervisor adapter."""
        from unitgen.ops.supervisor.deploy import deploy  # noqa: PLC0415

        return deploy(paths, self.site(), opts)

    def status(self, names: list[str], detail: frozenset[str] = frozenset()) -> Result:
        """See TargetOps."""
        from unitgen.ops.supervisor.status import status  # noqa: PLC0415

        return status(names, self.site(need_proxyd=False), detail)

    def ls(self) -> Result:
        """See TargetOps."""
        from unitgen.ops.supervisor.status import list_instances  # noqa: PLC0415

        return list_instances(self.site(need_proxyd=False))

    def logs(self, name: str, *, lines: int, follow: bool) -> int:
        """The server's log file over XML-RPC."""
        from unitgen.ops.supervisor.status import logs  # noqa: PLC0415

        try:
            return logs(name, self.site(need_proxyd=False), lines=lines, follow=follow)
        except KeyboardInterrupt:
            sys.stdout.flush()
            return 0

    def doctor(self, name: str) -> Result:
        """See TargetOps."""
        from unitgen.ops.supervisor.status import doctor  # noqa: PLC0415

        return doctor(name, self.site(need_proxyd=False))

    def remove(self, names: list[str]) -> Result:
        """See TargetOps."""
        from unitgen.ops.supervisor.deploy import remove  # noqa: PLC0415

        return remove(names, self.site(need_proxyd=False))
