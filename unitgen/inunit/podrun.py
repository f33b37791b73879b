"""Start ``podman run`` with the unit's own resource limits (docs/containers.md).

podman gives a container its own rlimits (``nofile`` 1048576 by default) and runc
sets them in the container's first process. Where the manager cannot raise a hard
limit (no ``CAP_SYS_RESOURCE``: containers, CI machines) every start fails with
"error setting rlimit type 7: operation not permitted". podman 4.3's ``--ulimit
host`` does not help (measured). This wrapper reads the limits the unit gave it
(``LimitNOFILE=``, ``LimitNPROC=``, the manager's otherwise), passes them as
``--ulimit NAME=HARD:HARD`` right after ``run``, and execs podman (same pid, so
the unit's main process is podman). Standard library only.

    python -I -m unitgen.inunit.podrun -- /usr/bin/podman run OPTIONS IMAGE ARGS...
"""

from __future__ import annotations

import os
import resource
import sys

__all__ = ["main", "ulimit_options", "with_limits"]

_LIMITS = (("nofile", resource.RLIMIT_NOFILE), ("nproc", resource.RLIMIT_NPROC))
# podman 4.3 sets its own (and so conmon's) RLIMIT_NPROC to 32768 whatever it
# was given (seen in conmon's /proc/PID/limits), and a container cannot be given
# more than conmon has: the same "operation not permitted" (measured, Debian 12).
_CEILING = {"nproc": 32768}


def ulimit_options() -> list[str]:
    """``--ulimit`` options for this process's hard limits (soft raised to hard,
    which needs no privilege); nothing for an unlimited one (podman's own then)."""
    out = []
    for name, which in _LIMITS:
        hard = resource.getrlimit(which)[1]
        if hard == resource.RLIM_INFINITY:
            hard = _CEILING.get(name, hard)
        if hard != resource.RLIM_INFINITY:
            hard = min(hard, _CEILING.get(name, hard))
            out.append(f"--ulimit={name}={hard}:{hard}")
    return out


def with_limits(argv: list[str]) -> list[str]:
    """The podman argv with the limits after its ``run`` word."""
    try:
        at = argv.index("run")
    except ValueError:
        raise SystemExit("unitgen podrun: no 'run' in the podman command line") from None
    return [*argv[:at + 1], *ulimit_options(), *argv[at + 1:]]


def main(args: list[str] | None = None) -> None:
    """Exec podman with the limits in place."""
    words = list(sys.argv[1:] if args is None else args)
    if words[:1] == ["--"]:
        words = words[1:]
    if not words:
        raise SystemExit("usage: python -m unitgen.inunit.podrun -- PODMAN run ...")
    argv = with_limits(words)
    os.execv(argv[0], argv)  # noqa: S606 - exec is the job; argv, no shell


if __name__ == "__main__":
    main()
