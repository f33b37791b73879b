#!/usr/bin/python
# Copyright: unitgen contributors
# Apache-2.0 (see the project's pyproject.toml)
"""Ansible module: drain or enable a host's servers in a unitgen gateway (HAProxy's runtime API)."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: unitgen_gateway_server
short_description: Drain or enable the servers of one host in a unitgen gateway
description:
  - Talks to the HAProxy runtime API of a unitgen gateway (its admin socket,
    C(/run/unitgen-NAME/admin.sock), or C($XDG_RUNTIME_DIR/unitgen-NAME/admin.sock)
    at user scope) and sets every server of O(node) (the servers named
    C(<node>_<instance>), in every backend) to C(drain) or C(ready), and its
    weight to 0 or back to 100%, since a route that keeps conversations to a
    replica picks it with C(use-server), which HAProxy lets through to a server
    in drain state, and reads its weight instead.
  - With O(state=drained) and O(wait=true) it returns once those servers have
    no request in flight and none queued, so the host can be updated without
    cutting a request. With O(state=enabled) and O(wait=true) it returns once
    no server of the node is down by its health check.
  - A gateway that is not running (no admin socket) or that has no server of
    O(node) yet is nothing to do (C(changed=false), C(servers=[])).
  - Why not C(community.general.haproxy) - it addresses one server name (a host
    here has one server per instance, in several backends), waits for the
    status text rather than for the requests in flight to end, and is one more
    collection to install on the controller. This module is standard library
    only and knows unitgen's server names.
  - A reload of the gateway (a new configuration) starts its servers enabled
    again; drain after the gateway's own changes, as the shipped playbook does.
version_added: "0.1.0"
author: unitgen contributors
options:
  gateway:
    description: The gateway's name (its spec's C(name)).
    type: str
    required: true
  node:
    description: The host whose servers change (the C(node) of the gateway's upstreams).
    type: str
    required: true
  state:
    description: C(drained) takes no new requests; C(enabled) takes them again.
    type: str
    choices: [drained, enabled]
    default: drained
  scope:
    description: Where the gateway runs, C(system) or C(user); decides where its admin socket is.
    type: str
    choices: [system, user]
    default: system
  socket:
    description: The admin socket's path, when not where unitgen puts it.
    type: path
  wait:
    description: Wait as described above.
    type: bool
    default: true
  wait_timeout:
    description: Seconds to wait at most; then the task fails (the servers stay as set).
    type: int
    default: 600
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
"""

EXAMPLES = r"""
- name: Drain gpu1 in the gateway llm before updating it
  unitgen.unitgen.unitgen_gateway_server:
    gateway: llm
    node: gpu1
    state: drained
  delegate_to: gw1.example.com
  become: true
"""

RETURN = r"""
servers:
  description: The servers of the node, C(backend/server), that were found.
  returned: always
  type: list
  elements: str
in_flight:
  description: Requests in flight and queued on those servers when the module returned.
  returned: always
  type: int
"""

import errno
import os
import socket
import stat
import struct
import time
from typing import Any

from ansible.module_utils.basic import AnsibleModule

ARGUMENT_SPEC: dict[str, dict[str, Any]] = {
    "gateway": {"type": "str", "required": True},
    "node": {"type": "str", "required": True},
    "state": {"type": "str", "choices": ["drained", "enabled"], "default": "drained"},
    "scope": {"type": "str", "choices": ["system", "user"], "default": "system"},
    "socket": {"type": "path"},
    "wait": {"type": "bool", "default": True},
    "wait_timeout": {"type": "int", "default": 600},
}

FORCED_DRAIN = 0x08  # srv_admin_state bit set by "set server ... state drain"


def command(path: str, line: str) -> str:
    """One runtime API command and its whole answer (the socket closes after it).

    The socket is in HAProxy's runtime directory, which HAProxy's user may
    change, and this module often runs as root: the path is opened without
    following a link, and nothing is sent to a listener that another uid than
    the directory's owner created (unitgen's own runtime API client does the same)."""
    owner = os.lstat(os.path.dirname(path) or ".").st_uid
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                raise OSError(errno.ENOTSOCK, f"{path} is not a socket: nothing was sent to it")
            s.settimeout(10)
            s.connect(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("=iII"))
        uid = struct.unpack("=iII", creds)[1]
        if uid != owner:
            raise OSError(errno.EPERM, f"{path} was created by uid {uid}, not by {owner} whose "
                                       "directory it is in: nothing was sent to it")
        s.sendall(line.encode() + b"\n")
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks).decode("utf-8", "replace")


def table(text: str) -> list[dict[str, str]]:
    """Rows of ``show stat`` (CSV) or ``show servers state`` (blank-separated),
    each keyed by the ``# ...`` header line."""
    lines = text.splitlines()
    header = next((ln for ln in lines if ln.startswith("# ")), None)
    if header is None:
        return []
    sep = "," if "," in header else " "
    names = header[2:].split(sep)
    rows = []
    for ln in lines:
        if not ln.strip() or ln.startswith("#") or ln.strip().isdigit():
            continue
        rows.append(dict(zip(names, ln.split(sep))))
    return rows


def servers_of(path: str, node: str) -> dict[str, dict[str, str]]:
    """``backend/server`` -> its ``show servers state`` row, for the node's servers."""
    prefix = node + "_"
    return {f"{r['be_name']}/{r['srv_name']}": r
            for r in table(command(path, "show servers state"))
            if r.get("srv_name", "").startswith(prefix)}


def stats(path: str, names: list[str]) -> dict[str, dict[str, str]]:
    """``backend/server`` -> its ``show stat`` row."""
    rows = table(command(path, "show stat"))
    return {f"{r['pxname']}/{r['svname']}": r for r in rows
            if f"{r.get('pxname')}/{r.get('svname')}" in names}


def is_drained(row: dict[str, str]) -> bool:
    """A ``show servers state`` row of a server this module drained: in drain
    state and at weight 0 (a half-done drain is done again)."""
    return bool(int(row.get("srv_admin_state") or 0) & FORCED_DRAIN) \
        and row.get("srv_uweight") == "0"


def is_enabled(row: dict[str, str]) -> bool:
    """A row of a server that takes requests as its configuration says: not in
    drain state and at its configured weight. Anything else is enabled again
    (a drain by an older version of this module left the weight; a half-done
    drain, or a weight of 0 alone, would keep requests away all the same)."""
    return not int(row.get("srv_admin_state") or 0) & FORCED_DRAIN \
        and row.get("srv_uweight") == row.get("srv_iweight", row.get("srv_uweight"))


def in_flight(rows: dict[str, dict[str, str]]) -> int:
    """Requests being served and queued, over the rows."""
    return sum(int(r.get("scur") or 0) + int(r.get("qcur") or 0) for r in rows.values())


def socket_path(p: dict[str, Any]) -> str:
    """Where the gateway's admin socket is (see the gateway's HAProxy configuration)."""
    if p["socket"]:
        return str(p["socket"])
    if p["scope"] == "system":
        run = "/run"
    else:  # under sudo XDG_RUNTIME_DIR is often unset: the user manager's is /run/user/UID
        run = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    return f"{run}/unitgen-{p['gateway']}/admin.sock"


def wait_until(module: AnsibleModule, path: str, names: list[str], drained: bool) -> int:
    """Until nothing is in flight (drained) or nothing is down (enabled); the count in flight."""
    deadline = time.monotonic() + module.params["wait_timeout"]
    while True:
        rows = stats(path, names)
        busy = in_flight(rows)
        down = [n for n, r in rows.items() if r.get("status", "").startswith("DOWN")]
        if (drained and busy == 0) or (not drained and not down):
            return busy
        if time.monotonic() > deadline:
            what = f"{busy} requests still in flight" if drained else f"still down: {', '.join(down)}"
            module.fail_json(msg=f"gateway {module.params['gateway']}: {what} after "
                                 f"{module.params['wait_timeout']} s", servers=names,
                             in_flight=busy)
        time.sleep(0.2)


def main() -> None:
    """Module entry point."""
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    p = module.params
    path = socket_path(p)
    try:
        os.stat(path)
    except FileNotFoundError:
        module.exit_json(changed=False, servers=[], in_flight=0,
                         msg=f"gateway {p['gateway']} is not running here (no {path})")
    except OSError as exc:
        # not "not running": a drain that silently did nothing would let the
        # host's update cut the requests it serves (a system gateway's 0700
        # runtime directory, asked without become, say)
        module.fail_json(msg=f"gateway {p['gateway']}: cannot reach its runtime API at {path}: "
                             f"{exc.strerror}; run this task as the gateway's manager's user "
                             "(become for a system-scope gateway)")
    drained = p["state"] == "drained"
    try:
        found = servers_of(path, p["node"])
        names = sorted(found)
        todo = [n for n, r in found.items() if not (is_drained(r) if drained else is_enabled(r))]
        if module.check_mode:
            module.exit_json(changed=bool(todo), servers=names, in_flight=0)
        for name in todo:
            for line in (f"set server {name} state {'drain' if drained else 'ready'}",
                         f"set server {name} weight {'0' if drained else '100%'}"):
                said = command(path, line)
                if said.strip():
                    module.fail_json(msg=f"gateway {p['gateway']}: {name}: {said.strip()}",
                                     servers=names)
        busy = wait_until(module, path, names, drained) if p["wait"] and names else 0
    except OSError as exc:
        module.fail_json(msg=f"gateway {p['gateway']}: runtime API at {path}: {exc}")
    module.exit_json(changed=bool(todo), servers=names, in_flight=busy)


if __name__ == "__main__":
    main()
