#!/usr/bin/python
# Copyright: unitgen contributors
# Apache-2.0 (see the project's pyproject.toml)
"""Ansible module: every unitgen instance on a host, with its state and address."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: unitgen_status
short_description: List unitgen instances with their state and public address
description:
  - Runs C(unitgen status --json) (or C(unitgen ls --json) with O(live=false))
    and returns every instance unitgen manages on the host, with its state and
    the public address its socket owns, so a play can, for example, template a
    load balancer from the ports that were actually chosen.
  - Changes nothing; runs in check mode too.
  - The module runs the C(unitgen) command line, not its Python API, because the
    command line is unitgen's stable interface, so the module needs only the
    standard library and works with whichever unitgen the host has installed.
version_added: "0.1.0"
author: unitgen contributors
requirements:
  - unitgen (the C(unitgen-units) distribution) installed on the host
options:
  names:
    description: Only these instances (all by default). A name unitgen does not manage is an error.
    type: list
    elements: str
    default: []
  live:
    description:
      - C(true) asks the service manager for each instance's state, PID,
        uptime and memory (C(unitgen status)); C(false) reads the unit files
        only (C(unitgen ls)), which needs no running manager.
    type: bool
    default: true
  scope:
    description: C(system) or C(user) (C(unitgen --user)).
    type: str
    choices: [system, user]
    default: system
  target:
    description: The process manager unitgen writes for.
    type: str
    choices: [systemd, supervisor]
    default: systemd
  executable:
    description: The unitgen command, a path or a name looked up on C(PATH).
    type: str
    default: unitgen
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
"""

EXAMPLES = r"""
- name: Read the instances and their ports
  unitgen_status:
  register: models

- name: One upstream per instance for the load balancer
  ansible.builtin.debug:
    msg: "{{ item.name }} answers on {{ inventory_hostname }}:{{ item.port }} ({{ item.state }})"
  loop: "{{ models.instances }}"
"""

RETURN = r"""
instances:
  description:
    - One entry per instance. C(name), C(address) (C(host:port)), C(host),
      C(port) and C(backend) always; with O(live=true) also C(state)
      (C(ready), C(starting), C(listening), C(idle-stopped), C(failed),
      C(stopped)), C(pid), C(uptime_s), C(memory_bytes), C(gpus), C(detail);
      with O(live=false) C(activation) and C(units).
  returned: always
  type: list
  elements: dict
  sample:
    - name: qwen2
      state: ready
      address: 0.0.0.0:8000
      host: 0.0.0.0
      port: 8000
      backend: vllm
by_name:
  description: The same entries keyed by instance name.
  returned: always
  type: dict
"""

import os
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.unitgen.unitgen.plugins.module_utils.unitgen_cli import (
    address_parts,
    argv_for,
    error_message,
    parse_json,
)

ARGUMENT_SPEC: dict[str, dict[str, Any]] = {
    "names": {"type": "list", "elements": "str", "default": []},
    "live": {"type": "bool", "default": True},
    "scope": {"type": "str", "choices": ["system", "user"], "default": "system"},
    "target": {"type": "str", "choices": ["systemd", "supervisor"], "default": "systemd"},
    "executable": {"type": "str", "default": "unitgen"},
}


def main() -> None:
    """Module entry point."""
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    p = module.params
    executable = p["executable"]
    if "/" not in executable:
        executable = module.get_bin_path(executable) or executable
    if not os.access(executable, os.X_OK):
        if module.check_mode:  # the install step has not run yet
            module.exit_json(changed=False, instances=[], by_name={},
                             msg=f"{p['executable']} is not installed yet (check mode)")
        module.fail_json(msg=f"unitgen not found: {p['executable']}")
    argv = argv_for(executable, "status" if p["live"] else "ls", scope=p["scope"], target=p["target"])
    rc, out, err = module.run_command(argv)
    data = parse_json(out)
    if rc != 0 or data is None:
        module.fail_json(msg=error_message(err, out), rc=rc, cmd=argv, stderr=err)
    rows = [dict(r) for r in data.get("instances", []) if isinstance(r, dict)]
    wanted = p["names"]
    if wanted:
        missing = sorted(set(wanted) - {r.get("name") for r in rows})
        if missing:
            module.fail_json(msg=f"no unitgen instance named {', '.join(missing)}", cmd=argv)
        rows = [r for r in rows if r.get("name") in wanted]
    for row in rows:
        row["host"], row["port"] = address_parts(str(row.get("address", "")))
    module.exit_json(changed=False, instances=rows, by_name={r["name"]: r for r in rows})


if __name__ == "__main__":
    main()
