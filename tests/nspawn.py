"""A real systemd *system* manager for the tests: this machine's own OS booted as
a throwaway container with ``systemd-nspawn`` (docs/reliability.md).

The container's root is a fresh tmpfs (``--volatile=yes``) and its ``/usr`` the
host's, read-only; the repository and this interpreter are bound read-only at
the same paths, so ``python -m unitgen`` runs inside unchanged. It shares the
host's network namespace (loopback ports are shared). Commands run inside with
``nsenter``; it is stopped with ``systemctl poweroff`` and then by its pid.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Container", "nspawn_unavailable_reason"]

ROOT = Path(__file__).resolve().parent.parent
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# systemd-nspawn 252's own seccomp allow list predates Landlock: without these,
# every process in the container gets EPERM for them, as on no real host (where
# systemd is PID 1 there is no such outer filter).
LANDLOCK = "landlock_create_ruleset landlock_add_rule landlock_restrict_self"


def nspawn_unavailable_reason() -> str | None:
    """Why no container can boot here, or None."""
    if os.geteuid() != 0:
        return "systemd-nspawn needs root"
    for tool in ("systemd-nspawn", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: systemd-container, util-linux)"
    if not Path("/lib/systemd/systemd").exists() and not Path("/usr/lib/systemd/systemd").exists():
        return "no systemd binary to boot"
    return None


def _binds() -> list[str]:
    """What the commands inside need, read-only at the same paths: the repository
    (with its .venv) and the interpreter the venv points at."""
    paths = {str(ROOT), sys.prefix, sys.base_prefix}
    paths = {p for p in paths if not p.startswith("/usr")}
    keep = sorted(p for p in paths if not any(p != q and p.startswith(q + "/") for q in paths))
    return [f"--bind-ro={p}" for p in keep]


@dataclass
class Container:
    """A booted container: its name, nspawn's pid and its PID 1 (the leader)."""

    name: str
    nspawn_pid: int
    leader: int
    log: Path

    @classmethod
    def boot(cls, name: str, log: Path, *, timeout: float = 60.0) -> Container:
        """Boot and wait until the system manager answers (running or degraded)."""
        argv = ["systemd-nspawn", "-D", "/", "--volatile=yes", "--register=no", "--keep-unit",
                "-M", name, *_binds(), f"--system-call-filter={LANDLOCK}", "-b", "--",
                "systemd.firstboot=off"]
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    start_new_session=True)
        box: Container | None = None
        try:
            box = cls._wait_for_boot(name, proc, log, time.monotonic() + timeout)
            box.prepare()
        except BaseException:
            if box is not None:
                box.stop()
            else:
                _kill(proc.pid)
            raise
        return box

    @classmethod
    def _wait_for_boot(cls, name: str, proc: subprocess.Popen[bytes], log: Path,
                       deadline: float) -> Container:
        leader = 0
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited: {log.read_text()[-2000:]}")
            if not leader:
                children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
                words = children.read_text().split() if children.exists() else []
                leader = int(words[0]) if words else 0
            if leader:
                box = cls(name, proc.pid, leader, log)
                state = box.run(["systemctl", "is-system-running"], timeout=10).stdout.strip()
                if state in ("running", "degraded"):
                    return box
            time.sleep(0.2)
        _kill(proc.pid)
        raise RuntimeError(f"the container did not boot in time: {log.read_text()[-2000:]}")

    def prepare(self) -> None:
        """Let the servers' dynamic users reach the interpreter: the container's own
        (tmpfs) parents of the bound paths become traversable; the host is untouched."""
        for path in {sys.prefix, sys.base_prefix, str(ROOT)}:
            parent = Path(path).parent
            while str(parent) != "/":
                self.run(["chmod", "go+x", str(parent)])  # read-only binds: already fine
                parent = parent.parent

    def run(self, argv: list[str], *, timeout: float = 120.0, check: bool = False,
            input_text: str | None = None, env: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
        """Run a command inside (all namespaces of PID 1), with a clean environment."""
        clean = ["env", "-i", f"PATH={PATH}", "HOME=/root", "LANG=C.UTF-8",
                 *(f"{k}={v}" for k, v in (env or {}).items())]
        return subprocess.run(["nsenter", "-t", str(self.leader), "-a", *clean, *argv],
                              input=input_text, capture_output=True, text=True,
                              timeout=timeout, check=check)

    def unitgen(self, *args: str, timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
        """``python -m unitgen ARGS`` inside, with this interpreter (system scope)."""
        return self.run([sys.executable, "-m", "unitgen", *args], timeout=timeout)

    def put(self, path: str, text: str, mode: int = 0o644) -> None:
        """Write a file inside the container."""
        self.run(["sh", "-c", f'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod {mode:o} "$1"',
                  "put", path], input_text=text, check=True)

    def prop(self, unit: str, name: str) -> str:
        """One property of a unit, as systemctl show prints it."""
        return self.run(["systemctl", "show", "-p", name, "--value", unit]).stdout.strip()

    def journal(self, unit: str, lines: int = 200) -> str:
        """The unit's journal inside the container (the manager's lines included)."""
        return self.run(["journalctl", "--no-pager", "-u", unit, "-n", str(lines)]).stdout

    def stop(self) -> None:
        """Power off; then make sure, by pid, that nspawn is gone."""
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            self.run(["systemctl", "poweroff"], timeout=20)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _alive(self.nspawn_pid):
            time.sleep(0.2)
        _kill(self.nspawn_pid)


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return Path(f"/proc/{pid}").exists()
    return waited == 0


def _kill(pid: int) -> None:
    if not _alive(pid):
        return
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass
