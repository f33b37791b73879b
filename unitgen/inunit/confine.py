"""What a server may bind, and as whom it runs: the small steps between the
manager and a model server's ``exec``. Standard library only (ctypes for the
three system calls Python does not wrap).

* :func:`confine_binds`: a server that may bind its privileged private port
  (``CAP_NET_BIND_SERVICE``) could otherwise bind *any* privileged port, and so
  squat another instance's private port while that one restarts, and receive
  its API key and its clients' traffic. A Landlock ruleset (Linux 6.7+, ABI 4:
  TCP bind rules) lets it bind, below 1024, its own port(s) only; every other
  bind (unprivileged ports, port 0) stays allowed, so servers that open
  internal ports (ZMQ, torch.distributed) are not disturbed. Landlock cannot be
  undone by the process, its children or an ``exec``.
* :func:`drop_to_user`: the supervisor target's root wrapper runs as root,
  reads the root-owned secret file, then becomes the spec's ``user`` keeping
  only ``CAP_NET_BIND_SERVICE`` (ambient, so it survives the ``exec``) where
  the server must bind its privileged private port.

``python -I -m unitgen.inunit.confine --bind-port 772 -- SERVER ARGS...`` is
what a systemd unit runs: confine, then exec the server (same pid).
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["LANDLOCK_NET_ABI", "confine_binds", "drop_to_user", "landlock_abi", "main"]

_SYS_LANDLOCK_CREATE_RULESET = 444
_SYS_LANDLOCK_ADD_RULE = 445
_SYS_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_NET_PORT = 2
_LANDLOCK_ACCESS_NET_BIND_TCP = 1
# The first Landlock ABI with TCP port rules (Linux 6.7).
LANDLOCK_NET_ABI = 4
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_KEEPCAPS = 8
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_RAISE = 2
_CAP_NET_BIND_SERVICE = 10
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
# Ports below this are privileged (the kernel's default ip_unprivileged_port_start).
PRIVILEGED_BELOW = 1024


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64)]


class _NetPortAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _fail(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 where Landlock is absent or disabled."""
    libc = _libc()
    abi = int(libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, None, 0,
                           _LANDLOCK_CREATE_RULESET_VERSION))
    return max(abi, 0)


def confine_binds(own_ports: list[int]) -> str | None:
    """Allow this process (and whatever it execs) to bind, below 1024, only
    ``own_ports``. Returns None when applied, or why it could not be (an
    older kernel): the caller decides whether to go on."""
    abi = landlock_abi()
    if abi < LANDLOCK_NET_ABI:
        return (f"this kernel has no Landlock TCP rules (ABI {abi}, needs {LANDLOCK_NET_ABI}: "
                "Linux 6.7 or later): the server can bind any privileged port")
    libc = _libc()
    attr = _RulesetAttr(0, _LANDLOCK_ACCESS_NET_BIND_TCP)
    fd = int(libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr),
                          ctypes.sizeof(attr), 0))
    if fd < 0:
        raise _fail("landlock_create_ruleset")
    try:
        rule = _NetPortAttr(_LANDLOCK_ACCESS_NET_BIND_TCP, 0)
        add = libc.syscall
        for port in (0, *sorted(set(own_ports)), *range(PRIVILEGED_BELOW, 65536)):
            rule.port = port
            if add(_SYS_LANDLOCK_ADD_RULE, fd, _LANDLOCK_RULE_NET_PORT, ctypes.byref(rule), 0):
                raise _fail(f"landlock_add_rule (port {port})")
        # Landlock needs no_new_privs (or CAP_SYS_ADMIN): nothing the server execs
        # may gain privileges through set-uid bits or file capabilities either.
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0):
            raise _fail("prctl(PR_SET_NO_NEW_PRIVS)")
        if libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, fd, 0):
            raise _fail("landlock_restrict_self")
    finally:
        os.close(fd)
    return None


def drop_to_user(uid: int, gid: int, groups: list[int], *, keep_bind: bool) -> None:
    """Become ``uid``/``gid`` (with supplementary ``groups``) for good; with
    ``keep_bind``, keep ``CAP_NET_BIND_SERVICE`` as an ambient capability (so the
    exec'ed server may bind a privileged port) and nothing else."""
    libc = _libc()
    if keep_bind and libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0):
        raise _fail("prctl(PR_SET_KEEPCAPS)")
    os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if not keep_bind:
        return
    bit = 1 << _CAP_NET_BIND_SERVICE
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)(_CapData(bit, bit, bit), _CapData(0, 0, 0))
    if libc.capset(ctypes.byref(header), data):
        raise _fail("capset")
    if libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, _CAP_NET_BIND_SERVICE, 0, 0):
        raise _fail("prctl(PR_CAP_AMBIENT_RAISE)")


def main(argv: list[str] | None = None) -> int:
    """``--bind-port N [--bind-port M] -- COMMAND...``: confine, then exec COMMAND."""
    args = sys.argv[1:] if argv is None else argv
    if "--" not in args:
        print("unitgen confine: the command goes after --", file=sys.stderr)
        return 2
    cut = args.index("--")
    opts, command = args[:cut], args[cut + 1:]
    ports: list[int] = []
    while opts:
        flag, *rest = opts
        if flag != "--bind-port" or not rest or not rest[0].isdigit():
            print(f"unitgen confine: unexpected {flag!r} (usage: --bind-port N -- COMMAND...)",
                  file=sys.stderr)
            return 2
        ports.append(int(rest[0]))
        opts = rest[1:]
    if not command:
        print("unitgen confine: no command after --", file=sys.stderr)
        return 2
    try:
        why = confine_binds(ports)
    except OSError as exc:
        print(f"unitgen confine: {exc.strerror}; not starting the server", file=sys.stderr)
        return 1
    if why:
        print(f"unitgen confine: warning: {why}", file=sys.stderr, flush=True)
    try:
        os.execvp(command[0], command)  # noqa: S606 - exec is the job; argv, no shell
    except OSError as exc:
        print(f"unitgen confine: cannot run {command[0]}: {exc.strerror}", file=sys.stderr)
    return 127


if __name__ == "__main__":
    sys.exit(main())
