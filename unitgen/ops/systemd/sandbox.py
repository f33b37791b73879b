"""A private, real systemd user manager (with its own journald and session
D-Bus) for hosts where no manager is reachable: containers, CI, a laptop
without systemd as PID 1.

It runs in a private mount namespace where ``/run/systemd`` is a tmpfs, so the
manager believes it was booted by systemd and the host is untouched; units go
in ``<dir>/home/.config/systemd/user``. It is the environment the integration
tests use, and ``unitgen sandbox`` exposes it so users can try units (and
Ansible roles) inside containers. See docs/sandbox.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from unitgen.errors import UnitgenError
from unitgen.ops.systemd.journal import journal_argv

__all__ = ["Sandbox", "SandboxError", "find_systemd", "sandbox_unavailable_reason"]

_BOOT = r"""
set -e
# A cgroup of its own in every hierarchy: the manager's units live under it, so
# two sandboxes (or a sandbox and the host) never share /app.slice/dbus.service.
for h in /sys/fs/cgroup /sys/fs/cgroup/*; do
  if [ -f "$h/cgroup.procs" ] && [ -w "$h/cgroup.procs" ]; then
    mkdir -p "$h/$4" && echo $$ > "$h/$4/cgroup.procs" || true
  fi
done
mkdir -p /run/systemd && mount -t tmpfs tmpfs /run/systemd
mkdir -p /run/systemd/system /run/systemd/journal /run/log/journal
mount --bind "$0/journal" /run/log/journal
# journald ends with the manager that is its parent, even if nobody stops it
if setpriv --pdeathsig TERM true 2>/dev/null; then
  setpriv --pdeathsig TERM "$2" > "$0/journald.log" 2>&1 &
else
  "$2" > "$0/journald.log" 2>&1 &
fi
echo $! > "$0/journald.pid"
i=0
while [ ! -S /run/systemd/journal/socket ] && [ $i -lt 100 ]; do sleep 0.02; i=$((i+1)); done
# like a real user manager, it logs its own messages about units to the journal
exec env -i PATH="$3" HOME="$0/home" XDG_RUNTIME_DIR="$0/run" LANG=C.UTF-8 "$1" --user \
  --log-target=journal
"""

_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class SandboxError(UnitgenError):
    """The private manager could not be started or reached."""


def find_systemd() -> str | None:
    """Path of the systemd binary, or None."""
    for candidate in ("/lib/systemd/systemd", "/usr/lib/systemd/systemd"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _find_journald() -> str | None:
    for candidate in ("/lib/systemd/systemd-journald", "/usr/lib/systemd/systemd-journald"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def sandbox_unavailable_reason() -> str | None:
    """Why a sandbox cannot start here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (it mounts a tmpfs over /run/systemd in a private mount namespace)"
    if find_systemd() is None:
        return "no systemd binary (/lib/systemd/systemd); install the systemd package"
    if _find_journald() is None:
        return "no systemd-journald binary"
    if shutil.which("unshare") is None:
        return "no unshare (util-linux)"
    if Path("/run/systemd/system").is_dir():
        # A private user manager would share the host's cgroup tree with the real
        # PID 1; where systemd runs, use it (--user, or the system manager).
        return "this host runs systemd as PID 1: use it directly (unitgen ... --user)"
    return None


@dataclass
class Sandbox:
    """A running private manager. ``env`` points systemctl/journalctl/busctl and
    unitgen's D-Bus client at it."""

    root: Path
    manager_pid: int
    journald_pid: int
    owns_root: bool = True

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that select this manager."""
        return {
            "HOME": str(self.root / "home"),
            "XDG_RUNTIME_DIR": str(self.root / "run"),
            "XDG_CONFIG_HOME": str(self.root / "home" / ".config"),
            "DBUS_SESSION_BUS_ADDRESS": f"unix:path={self.root / 'run' / 'bus'}",
            "UNITGEN_JOURNAL_DIR": str(self.root / "journal"),
        }

    @property
    def unit_dir(self) -> Path:
        """Where user units are installed."""
        return self.root / "home" / ".config" / "systemd" / "user"

    @property
    def journal_dir(self) -> Path:
        """The sandbox's journal (read with ``journalctl -D``)."""
        return self.root / "journal"

    @classmethod
    def start(cls, root: Path | None = None, *, timeout: float = 10.0,
              tie_to_parent: bool = False) -> Sandbox:
        """Boot a private user manager under ``root`` (a new temp dir by default).

        ``tie_to_parent``: the manager gets SIGTERM if this process dies (tests,
        ``sandbox run``), so a killed run leaves no manager behind."""
        reason = sandbox_unavailable_reason()
        if reason:
            raise SandboxError(f"cannot start a private systemd manager: {reason}")
        owns = root is None
        root = Path(tempfile.mkdtemp(prefix="unitgen-sandbox-")) if root is None else root
        for sub in ("run", "home", "journal"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        (root / "run").chmod(0o700)
        (root / "home" / ".config" / "systemd" / "user").mkdir(parents=True, exist_ok=True)
        with (root / "manager.log").open("wb") as log:
            proc = subprocess.Popen(
                ["unshare", "-m", "sh", "-c", _BOOT, str(root), find_systemd() or "",
                 _find_journald() or "", _PATH, _cgroup_name(root)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                preexec_fn=_die_with_parent if tie_to_parent else None,  # noqa: PLW1509
            )
        box = cls(root=root, manager_pid=proc.pid, journald_pid=0, owns_root=owns)
        deadline = time.monotonic() + timeout
        bus = root / "run" / "bus"
        private = root / "run" / "systemd" / "private"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                log_text = (root / "manager.log").read_text(errors="replace")[-500:]
                raise SandboxError(f"the private systemd manager exited at once: {log_text}")
            if bus.exists() and private.exists():
                break
            time.sleep(0.02)
        else:
            box.stop()
            raise SandboxError(f"the private systemd manager did not come up within {timeout} s")
        with contextlib.suppress(OSError, ValueError):
            box.journald_pid = int((root / "journald.pid").read_text().strip())
        (root / "sandbox.json").write_text(json.dumps(
            {"manager_pid": box.manager_pid, "journald_pid": box.journald_pid}))
        return box

    @classmethod
    def attach(cls, root: Path) -> Sandbox:
        """A handle on a sandbox started earlier (``unitgen sandbox start``)."""
        try:
            data = json.loads((root / "sandbox.json").read_text())
        except (OSError, ValueError) as exc:
            raise SandboxError(f"{root} is not a running unitgen sandbox: {exc}") from None
        return cls(root=root, manager_pid=int(data["manager_pid"]),
                   journald_pid=int(data["journald_pid"]), owns_root=False)

    def alive(self) -> bool:
        """True while the manager process exists."""
        return _exists(self.manager_pid)

    def stop(self, *, timeout: float = 15.0) -> None:
        """Stop the manager (which stops its units) and journald, by their pids."""
        for pid in (self.manager_pid, self.journald_pid):
            if pid <= 0 or not self._still_ours(pid):
                continue  # gone, or the pid now belongs to someone else: never kill that
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and _exists(pid):
                _reap(pid)
                time.sleep(0.05)
            if _exists(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                _reap(pid)
        _remove_cgroups(_cgroup_name(self.root))
        if self.owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def _still_ours(self, pid: int) -> bool:
        """The recorded pid is still this sandbox's manager or journald: in its
        cgroup, or (where no cgroup could be made) the same systemd program."""
        try:
            cgroup = Path(f"/proc/{pid}/cgroup").read_text()
            exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
        except OSError:
            return False
        if _cgroup_name(self.root) in cgroup:
            return True
        return exe in ("systemd", "systemd-journald")

    def run(self, *argv: str, check: bool = False, timeout: float = 120.0
            ) -> subprocess.CompletedProcess[str]:
        """Run a command (systemctl --user, busctl --user, ...) against this manager."""
        env = {**os.environ, **self.env}
        return subprocess.run(list(argv), env=env, capture_output=True, text=True,
                              check=check, timeout=timeout)

    def systemctl(self, *args: str, check: bool = False, timeout: float = 120.0
                  ) -> subprocess.CompletedProcess[str]:
        """``systemctl --user ...`` against this manager."""
        return self.run("systemctl", "--user", *args, check=check, timeout=timeout)

    def journal(self, unit: str | None = None, *, lines: int = 50) -> str:
        """Recent journal lines (of one unit, if given)."""
        argv = journal_argv(unit, "user", lines=lines, directory=str(self.journal_dir))
        return subprocess.run([*argv, "-o", "cat"], capture_output=True, text=True,
                              check=False).stdout


def _cgroup_name(root: Path) -> str:
    # Shaped like a real user manager's cgroup (.../user@UID.service), so journald
    # records _SYSTEMD_USER_UNIT for its units and `journalctl --user-unit` works.
    ident = "".join(ch if ch.isalnum() else "_" for ch in root.name)
    return f"unitgen_{ident}.slice/user@{os.getuid()}.service"


def _remove_cgroups(name: str) -> None:
    """Remove the sandbox's cgroups, deepest first (they are empty once it stopped)."""
    for hierarchy in [Path("/sys/fs/cgroup"), *Path("/sys/fs/cgroup").glob("*")]:
        top = hierarchy / name.split("/", 1)[0]
        if not top.is_dir():
            continue
        for dirpath, _, _ in sorted(os.walk(top), key=lambda w: -w[0].count("/")):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (Linux prctl)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
