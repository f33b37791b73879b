"""Start ``podman run`` with the unit's own resource limits (docs/containers.md).

podman gives a container its own rlimits (``nofile`` 1048576 by default) and runc
sets them in the container's first process. Where the manager cannot raise a hard
limit (no ``CAP_SYS_RESOURCE``: containers, CI machines) every start fails with
"error setting rlimit type 7: operation not permitted". podman 4.3's ``--ulimit
host`` does not help (measured). This wrapper reads the limits the unit gave it
(``LimitNOFILE=``, ``LimitNPROC=``, the manager's otherwise), passes them as
``--ulimit NAME=HARD:HARD`` right after ``run``, and execs podman (same pid, so
the unit's main process is podman). Standard library only.

It also passes the spec's binds (``volumes``), each only after walking its source
on the host as root, now, just before podman (:mod:`unitgen.inunit.binds`): a
source a local user could have changed since deploy is refused, the start fails
and the journal names the volume and why.

    python -I -m unitgen.inunit.podrun [--volume=HOST:CONTAINER[:ro]]... -- \
        /usr/bin/podman run OPTIONS IMAGE ARGS...
"""

from __future__ import annotations

import os
import resource
import sys

from unitgen.inunit.binds import why_not
from unitgen.inunit.volumes import normalise, split_volume

__all__ = ["checked_volumes", "main", "ulimit_options", "with_limits"]

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


def with_limits(argv: list[str], extra: list[str] | None = None) -> list[str]:
    """The podman argv with the limits (and ``extra`` options) after its ``run`` word."""
    try:
        at = argv.index("run")
    except ValueError:
        raise SystemExit("unitgen podrun: no 'run' in the podman command line") from None
    return [*argv[:at + 1], *ulimit_options(), *(extra or []), *argv[at + 1:]]


def checked_volumes(volumes: list[str]) -> list[str]:
    """``--volume`` options for the binds, each source walked now; SystemExit
    naming the first one refused (the start fails, the journal says why)."""
    out = []
    for volume in volumes:
        host, inside, mode = split_volume(volume)
        why = why_not(host, mode)
        if why:
            raise SystemExit(f"unitgen podrun: volume {volume} refused: {why}")
        out.append(f"--volume={normalise(host)}:{inside}" + (":ro" if mode == "ro" else ""))
    return out


def main(args: list[str] | None = None) -> None:
    """Exec podman with the limits and the checked binds in place."""
    words = list(sys.argv[1:] if args is None else args)
    if "--" not in words or words.index("--") == len(words) - 1:
        raise SystemExit("usage: python -m unitgen.inunit.podrun [--volume=HOST:CONTAINER"
                         "[:ro]]... -- PODMAN run ...")
    at = words.index("--")
    own, podman = words[:at], words[at + 1:]
    bad = [w for w in own if not w.startswith("--volume=")]
    if bad:
        raise SystemExit(f"unitgen podrun: unknown option {bad[0]!r}")
    argv = with_limits(podman, checked_volumes([w.partition("=")[2] for w in own]))
    os.execv(argv[0], argv)  # noqa: S606 - exec is the job; argv, no shell


if __name__ == "__main__":
    main()
