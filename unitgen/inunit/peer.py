"""Who is at the other end of a connection to a private endpoint: the check the
probe, the liveness checker and the proxies make *after* connecting and before
they send a byte (an API key, a client's request).

A Unix socket path is the server's to change: its runtime directory is its
own, so it can put a symbolic link to any other socket there (the system bus,
systemd's private socket) and ``connect()`` follows it. The kernel records who
created the listening socket a connection reached (``SO_PEERCRED``: the uid of
the process that called ``listen()``); a connection whose listener another uid
created gets nothing. And unitgen's own programs never follow a link there:
:func:`connect_unix` opens the path itself (``O_PATH | O_NOFOLLOW``), takes it
only if it is a socket, and connects to exactly that inode. That is the guard
where the uid cannot tell the server from root (a container's server is root on
the host).

A private loopback port is free while its server is down (on-demand, idle,
restarting), and whoever binds it in that gap receives what is sent there.
Checking the listener *before* connecting can be raced (a squatter that listens
in short bursts); checking the connection itself cannot: the kernel's record of
the accepted end of *this* connection carries the uid of the process that
created the listening socket it came through (``sk_uid``, copied to every
accepted socket). That record is asked for by its exact four-tuple over
``NETLINK_SOCK_DIAG`` (what ``ss`` uses; no privilege needed), with
``/proc/net/tcp`` as the fallback. A connection whose other end was created by
another uid gets nothing.

Standard library only (it runs inside units).
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct

__all__ = ["connect_unix", "foreign_peer", "no_follow_path", "peer_uid", "unix_peer_uid"]

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
# struct inet_diag_req_v2 header, then struct inet_diag_sockid
_REQ = struct.Struct("=BBBxI")
_SOCKID = struct.Struct(">HH16s16s")  # ports and addresses in network order
_SOCKID_TAIL = struct.Struct("=III")  # idiag_if, idiag_cookie[2]
_NOCOOKIE = 0xFFFFFFFF
_NLMSG = struct.Struct("=IHHII")
# struct inet_diag_msg: family, state, timer, retrans, sockid (48 bytes), then
# expires, rqueue, wqueue, uid, inode
_MSG_HEAD = 4 + 48
_MSG_TAIL = struct.Struct("=IIIII")
_UCRED = struct.Struct("=iII")  # struct ucred: pid, uid, gid


def _addr_bytes(family: int, host: str) -> bytes:
    packed = socket.inet_pton(family, host.partition("%")[0])
    return packed.ljust(16, b"\0")


def _diag_uid(family: int, near: tuple[str, int], far: tuple[str, int]) -> int | None:
    """The uid of the socket whose local end is ``far`` and remote end ``near``
    (the server's end of our connection), by exact lookup; None if not found."""
    sockid = _SOCKID.pack(far[1], near[1], _addr_bytes(family, far[0]),
                          _addr_bytes(family, near[0]))
    body = _REQ.pack(family, socket.IPPROTO_TCP, 0, 0xFFFFFFFF) + sockid \
        + _SOCKID_TAIL.pack(0, _NOCOOKIE, _NOCOOKIE)
    msg = _NLMSG.pack(_NLMSG.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0) + body
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(2.0)
        nl.send(msg)
        data = nl.recv(65536)
    if len(data) < _NLMSG.size:
        return None
    _length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(data)
    if kind == NLMSG_ERROR:
        (err,) = struct.unpack_from("=i", data, _NLMSG.size)
        if err == 0:
            return None
        raise OSError(-err, os.strerror(-err))
    if kind != SOCK_DIAG_BY_FAMILY or len(data) < _NLMSG.size + _MSG_HEAD + _MSG_TAIL.size:
        return None
    _expires, _rq, _wq, uid, _inode = _MSG_TAIL.unpack_from(data, _NLMSG.size + _MSG_HEAD)
    return int(uid)


def _hex_endpoint(family: int, host: str, port: int) -> str:
    """An address as /proc/net/tcp{,6} prints it (host byte order words)."""
    packed = socket.inet_pton(family, host.partition("%")[0])
    words = struct.unpack(f"={len(packed) // 4}I", packed)
    return "".join(f"{w:08X}" for w in words) + f":{port:04X}"


def _proc_uid(family: int, near: tuple[str, int], far: tuple[str, int]) -> int | None:
    table = "/proc/net/tcp6" if family == socket.AF_INET6 else "/proc/net/tcp"
    local, remote = _hex_endpoint(family, *far), _hex_endpoint(family, *near)
    with open(table, encoding="ascii") as fh:
        for row in fh.read().splitlines()[1:]:
            cols = row.split()
            if len(cols) > 7 and cols[1] == local and cols[2] == remote:
                return int(cols[7])
    return None


def peer_uid(sock: socket.socket) -> int | None:
    """The uid that created the listening socket this connected TCP socket
    reached (None: the other end is not on this machine's tables, e.g. gone)."""
    family = sock.family
    near = sock.getsockname()[:2]
    far = sock.getpeername()[:2]
    try:
        return _diag_uid(family, near, far)
    except OSError:
        return _proc_uid(family, near, far)


def no_follow_path(path: str) -> tuple[int, str]:
    """An ``O_PATH`` descriptor of the socket file at ``path`` and the name to
    connect to it by (``/proc/self/fd/N``: that inode, whatever the path becomes).
    A link (or anything but a socket) there raises ``OSError``; the caller closes
    the descriptor once connected."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    kind = os.fstat(fd).st_mode
    if not stat.S_ISSOCK(kind):
        os.close(fd)
        what = "a link" if stat.S_ISLNK(kind) else "not a socket"
        raise OSError(errno.ELOOP if stat.S_ISLNK(kind) else errno.ENOTSOCK,
                      f"{path} is {what}: nothing was sent to it")
    return fd, f"/proc/self/fd/{fd}"


def connect_unix(path: str, timeout: float | None = None) -> socket.socket:
    """A connection to the Unix socket at ``path``, never through a link."""
    fd, name = no_follow_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(name)
    except BaseException:
        sock.close()
        raise
    finally:
        os.close(fd)
    return sock


def unix_peer_uid(sock: socket.socket) -> int:
    """The uid that created the listening Unix socket this connected socket reached."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return int(_UCRED.unpack(creds)[1])


def _foreign_unix(sock: socket.socket, expect_uid: int) -> str | None:
    try:
        uid = unix_peer_uid(sock)
    except OSError as exc:
        return f"cannot tell who listens there ({exc.strerror or exc}): nothing was sent"
    if uid != expect_uid:
        return (f"{sock.getpeername() or 'the socket'} was created by uid {uid}, not the "
                f"server's uid {expect_uid} (a link to another socket?): nothing was sent to it")
    return None


def foreign_peer(sock: socket.socket, expect_uid: int) -> str | None:
    """Why the other end of ``sock`` is not the server (another uid created it),
    or None when it is."""
    if sock.family == socket.AF_UNIX:
        return _foreign_unix(sock, expect_uid)
    try:
        uid = peer_uid(sock)
    except OSError as exc:
        return f"cannot tell who listens there ({exc.strerror or exc}): nothing was sent"
    if uid is None:
        return "the connection's other end is not on this machine's tables: nothing was sent"
    if uid != expect_uid:
        host, port = sock.getpeername()[:2]
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return (f"{where} is held by uid {uid}, not the server's uid {expect_uid} (a process "
                "that bound the port while the server was down?): nothing was sent to it")
    return None
