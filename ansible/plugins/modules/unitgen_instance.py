#!/usr/bin/python
# Copyright: unitgen contributors
# Apache-2.0 (see the project's pyproject.toml)
"""Ansible module: deploy, update or remove one unitgen instance on a host."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: unitgen_instance
short_description: Deploy, update or remove one unitgen model-server instance
description:
  - Writes O(spec), a mapping with the keys of a unitgen TOML spec, as
    C(<spec_dir>/<name>.toml) on the host and runs C(unitgen deploy --json) on
    that file. unitgen renders the units, writes only what differs, starts the
    instance and waits until it answers; an unchanged spec restarts nothing.
  - C(changed) is unitgen's own verdict (units written, an instance started),
    or the spec file on the host having changed.
  - O(state=absent) runs C(unitgen remove) when unitgen manages an instance of
    that name and deletes its spec file; otherwise it changes nothing.
  - When unitgen refuses a spec or an instance does not start, the task fails
    with unitgen's message (the file, the key and what is wrong, or why the
    start failed), and the previous spec file is put back. unitgen has already restored the
    previous units in that case.
  - The module runs the C(unitgen) command line, not its Python API, because the
    command line is unitgen's stable interface, so the module needs only the
    standard library and works with whichever unitgen the host has installed.
version_added: "0.1.0"
author: unitgen contributors
requirements:
  - unitgen (the C(unitgen-units) distribution) installed on the host
options:
  spec:
    description:
      - The instance spec, with the same keys as a unitgen TOML spec
        (C(name), C(backend), C(model), C(port), C(args), C(env), C(health) as
        a nested mapping, ...). Keys whose value is null are left out.
      - Required with O(state=present).
      - Its secrets never appear in a result, a diff or the host's log (see the
        notes); the host's log records the instance's name and state, not the spec.
    type: dict
  name:
    description:
      - The instance name. Defaults to C(spec.name); with O(state=absent) it is
        enough on its own.
    type: str
  state:
    description: Whether the instance should be deployed or removed.
    type: str
    choices: [present, absent]
    default: present
  scope:
    description:
      - C(system) for the system manager (C(/etc/systemd/system), needs root),
        C(user) for the per-user manager (C(unitgen --user)).
    type: str
    choices: [system, user]
    default: system
  target:
    description:
      - The process manager unitgen writes for. C(--target) is passed to
        unitgen only for targets other than C(systemd).
    type: str
    choices: [systemd, supervisor]
    default: systemd
  executable:
    description: The unitgen command, a path or a name looked up on C(PATH).
    type: str
    default: unitgen
  spec_dir:
    description:
      - Where the host keeps the spec files (mode 0700; a spec may hold an API
        key).
      - Defaults to C(/etc/unitgen/specs) for O(scope=system) and
        C($XDG_CONFIG_HOME/unitgen/specs) (C(~/.config/unitgen/specs)) for
        O(scope=user).
    type: path
  wait:
    description:
      - Wait until the instance answers (unitgen's default). C(false) passes
        C(--no-wait).
    type: bool
    default: true
  port_range:
    description:
      - C(LOW-HIGH) range for instances without a C(port) (unitgen's
        C(--port-range)); unitgen's default when empty.
    type: str
notes:
  - "Secrets: the variable named by C(api_key_env) (or the backend's API key
    variable, C(VLLM_API_KEY), C(LLAMA_API_KEY)), every variable in
    C(secret_env), the value of C(--api-key) (or another option whose name
    says key, token, secret or password) in C(args) or C(command), and every
    C(env) variable whose name looks like a secret (C(HF_TOKEN),
    C(OPENAI_API_KEY)). The spec file's diff shows each as C(<redacted>), or
    C(<redacted: changed>) when it changes; Ansible masks their values
    everywhere else in the result (C(********), C(VALUE_SPECIFIED_IN_NO_LOG_PARAMETER)),
    unitgen's unit diff included. The same holds for the secrets of the spec
    file the host had before."
  - A variable that looks like a secret but is neither the API key variable
    nor in C(secret_env) gets a warning, since unitgen writes it into the unit
    file, which every local user can read; add it to C(secret_env).
  - Check mode runs C(unitgen deploy --dry-run --diff) on the spec, so it
    reports exactly what a real run would change. When the spec itself
    changed, the dry run reads it from a temporary directory, so a custom
    C(command) that uses C({spec_dir}) shows that directory in the diff.
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
"""

EXAMPLES = r"""
- name: Serve Qwen2 with vLLM on port 8000
  unitgen_instance:
    spec:
      name: qwen2
      backend: vllm
      model: Qwen/Qwen2-7B-Instruct
      host: 0.0.0.0
      port: 8000
      gpus: 1
      args: [--dtype, bfloat16, --max-model-len, "8192"]
      env:
        HF_HOME: /var/lib/models/hf
      health:
        timeout: 20min
  become: true

- name: Remove an instance
  unitgen_instance:
    name: old-model
    state: absent
  become: true
"""

RETURN = r"""
name:
  description: The instance name.
  returned: always
  type: str
action:
  description:
    - What unitgen did, C(created), C(updated), C(unchanged), C(started),
      C(would-create), C(would-update) (check mode), C(removed),
      C(would-remove), C(absent).
  returned: always
  type: str
public:
  description: The public address the instance's socket owns (C(host:port)).
  returned: state=present
  type: str
  sample: 0.0.0.0:8000
host:
  description: The host part of RV(public).
  returned: state=present
  type: str
port:
  description: The public port (chosen by unitgen when the spec has none).
  returned: state=present
  type: int
units:
  description: The instance's unit names.
  returned: always
  type: list
  elements: str
spec_file:
  description: The spec file on the host.
  returned: always
  type: str
notices:
  description: unitgen's notices (an adopted C(--port), a moved API key, ...).
  returned: state=present
  type: list
  elements: str
instance:
  description: unitgen's own JSON record of the instance (C(unitgen deploy --json)).
  returned: state=present
  type: dict
"""

import os
import tempfile
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.unitgen.unitgen.plugins.module_utils.unitgen_cli import (
    address_parts,
    argv_for,
    error_message,
    parse_json,
)
from ansible_collections.unitgen.unitgen.plugins.module_utils.unitgen_secrets import (
    Secret,
    redacted,
    secrets,
    spec_strings,
    undeclared,
)
from ansible_collections.unitgen.unitgen.plugins.module_utils.unitgen_toml import TomlWriteError, dumps, loads

HEADER = (
    "# Written by the unitgen_instance Ansible module: the next run overwrites\n"
    "# changes made here. Edit the play or inventory instead.\n"
)
# The diff's "before" when the previous spec file cannot be read to redact it.
UNREADABLE = "# (the previous spec file is not shown: it could not be read to hide its secrets)\n"
# Written first, in this order; the rest alphabetically (tables go last anyway).
FIRST_KEYS = ("name", "backend", "model", "executable", "command", "host", "port")


def ordered(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec with a stable key order, so the file depends on the values only."""
    def nested(value: Any) -> Any:  # noqa: ANN401 - any spec value
        if isinstance(value, dict):
            return {k: nested(value[k]) for k in sorted(value, key=str)}
        return value

    keys = [k for k in FIRST_KEYS if k in spec]
    keys += sorted((k for k in spec if k not in FIRST_KEYS), key=str)
    return {k: nested(spec[k]) for k in keys}


def default_spec_dir(scope: str) -> str:
    """Where the host keeps spec files: next to unitgen's own config (``%E/unitgen``)."""
    if scope == "user":
        config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
        return os.path.join(config, "unitgen", "specs")
    return "/etc/unitgen/specs"


def read_text(path: str) -> str | None:
    """A file's text, or None when it does not exist."""
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except FileNotFoundError:
        return None


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically, mode 0600, in a 0700 directory."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".unitgen-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def restore(path: str, old: str | None) -> None:
    """Put the previous spec file back (or remove a new one)."""
    if old is None:
        if os.path.exists(path):
            os.unlink(path)
    else:
        write_text(path, old)


def json_error(data: dict[str, Any] | None) -> str:
    """A failure message carried in unitgen's JSON, if it has one."""
    if not data:
        return ""
    problems = data.get("problems")
    if isinstance(problems, list) and problems:
        parts = []
        for p in problems:
            if isinstance(p, dict):
                where = ": ".join(str(p[k]) for k in ("file", "key") if p.get(k))
                parts.append(f"{where}: {p.get('message', '')}" if where else str(p.get("message", "")))
            else:
                parts.append(str(p))
        return "\n".join(parts)
    for key in ("error", "message"):
        if isinstance(data.get(key), str) and data[key]:
            return str(data[key])
    return ""


class Previous:
    """The spec file the host has, and its secrets (masked in every output)."""

    def __init__(self, module: AnsibleModule, path: str) -> None:
        try:
            self.text = read_text(path)
        except OSError as exc:
            module.fail_json(msg=f"cannot read {path}: {exc.strerror}")
        self.spec = loads(self.text) if self.text is not None else None
        self.secrets: list[Secret] = secrets(self.spec) if self.spec is not None else []
        module.no_log_values.update(value for _, _, _, value in self.secrets)

    def shown(self) -> str | None:
        """The file as the diff shows it: its secrets as ``<redacted>``."""
        if self.text is None:
            return None
        if self.spec is None:
            return UNREADABLE
        # Comments are left out: the module writes only its header, and a
        # comment added by hand could quote a key.
        header = HEADER if self.text.startswith(HEADER) else ""
        try:
            return header + dumps(redacted(self.spec, self.secrets))
        except TomlWriteError:
            return UNREADABLE


def spec_diff(path: str, old: str | None, new: str | None) -> dict[str, str]:
    """An Ansible before/after diff of the spec file (both already redacted)."""
    return {
        "before": old or "",
        "after": new or "",
        "before_header": path if old is not None else "/dev/null",
        "after_header": path if new is not None else "/dev/null",
    }


class Runner:
    """Runs unitgen for one module invocation."""

    def __init__(self, module: AnsibleModule, executable: str) -> None:
        self.module = module
        self.executable = executable
        self.scope = module.params["scope"]
        self.target = module.params["target"]

    def argv(self, command: str) -> list[str]:
        """``unitgen COMMAND [--user] [--target T] --json``."""
        return argv_for(self.executable, command, scope=self.scope, target=self.target)

    def run(self, argv: list[str]) -> tuple[int, dict[str, Any] | None, str, str]:
        """Run; return (rc, parsed JSON or None, stdout, stderr)."""
        rc, out, err = self.module.run_command(argv)
        return rc, parse_json(out), out, err


def present(module: AnsibleModule, run: Runner, name: str, spec: dict[str, Any], path: str) -> None:
    """Write the spec file and deploy it (or dry-run it in check mode)."""
    found = secrets(spec)
    try:
        text = HEADER + dumps(ordered(spec))
    except TomlWriteError as exc:
        module.fail_json(msg=f"{name}: spec: {exc}")
    previous = Previous(module, path)
    old = previous.text
    for var in undeclared(spec):
        module.warn(f"{name}: env.{var} looks like a secret, but unitgen writes it into the "
                    "unit file, which every local user can read (systemctl show); add it to "
                    "secret_env to keep it in unitgen's 0600 secret file")
    spec_changed = old != text
    argv = run.argv("deploy")
    if module.params["port_range"]:
        argv += ["--port-range", module.params["port_range"]]
    scratch = None
    if module.check_mode:
        argv += ["--dry-run", "--diff"]
        deploy_path = path
        if spec_changed:  # read the new spec without touching the host's copy
            scratch = tempfile.mkdtemp(prefix="unitgen-check-")
            deploy_path = os.path.join(scratch, os.path.basename(path))
            write_text(deploy_path, text)
    else:
        if module._diff:
            argv.append("--diff")
        if not module.params["wait"]:
            argv.append("--no-wait")
        deploy_path = path
        if spec_changed:
            try:
                write_text(path, text)
            except OSError as exc:  # e.g. system scope without become
                module.fail_json(msg=f"cannot write {path}: {exc.strerror}", spec_file=path)
    argv.append(deploy_path)
    try:
        rc, data, out, err = run.run(argv)
    finally:
        if scratch:
            for entry in os.listdir(scratch):
                os.unlink(os.path.join(scratch, entry))
            os.rmdir(scratch)
    instances = (data or {}).get("instances") or []
    inst = instances[0] if instances and isinstance(instances[0], dict) else None
    if rc != 0 or inst is None or (data or {}).get("failed"):
        if spec_changed and not module.check_mode:
            try:
                restore(path, old)
            except OSError as exc:
                module.warn(f"could not put the previous {path} back: {exc.strerror}")
        msg = (inst or {}).get("error") or json_error(data) or error_message(err, out)
        module.fail_json(msg=msg, name=name, rc=rc, cmd=argv, stderr=err, instance=inst,
                         spec_file=path)
    host, port = address_parts(str(inst.get("public", "")))
    result: dict[str, Any] = {
        "changed": bool((data or {}).get("changed")) or spec_changed,
        "name": name,
        "action": inst.get("action", ""),
        "public": inst.get("public", ""),
        "host": host,
        "port": port,
        "units": inst.get("units", []),
        "ready": inst.get("ready"),
        "listening": inst.get("listening"),
        "seconds": inst.get("seconds"),
        "spec_file": path,
        "spec_changed": spec_changed,
        "notices": (data or {}).get("notices", []),
        "instance": inst,
    }
    if module._diff:
        diffs = []
        if spec_changed:
            known = previous.secrets if previous.spec is not None else None
            shown = HEADER + dumps(ordered(redacted(spec, found, known)))
            diffs.append(spec_diff(path, previous.shown(), shown))
        if inst.get("diff"):
            diffs.append({"prepared": inst["diff"]})
        result["diff"] = diffs
    module.exit_json(**result)


def absent(module: AnsibleModule, run: Runner, name: str, path: str) -> None:
    """Remove the instance if unitgen manages it, and its spec file."""
    argv = run.argv("ls")
    rc, data, out, err = run.run(argv)
    if rc != 0 or data is None:
        module.fail_json(msg=json_error(data) or error_message(err, out), rc=rc, cmd=argv,
                         stderr=err)
    rows = [r for r in data.get("instances", []) if isinstance(r, dict) and r.get("name") == name]
    units = list(rows[0].get("units", [])) if rows else []
    previous = Previous(module, path)
    old = previous.text
    changed = bool(rows) or old is not None
    result: dict[str, Any] = {
        "changed": changed,
        "name": name,
        "action": ("would-remove" if module.check_mode else "removed") if changed else "absent",
        "units": units,
        "spec_file": path,
    }
    if module._diff and changed:
        diffs = []
        if old is not None:
            diffs.append(spec_diff(path, previous.shown(), None))
        if units:
            diffs.append({"prepared": "".join(f"--- {u} removed\n" for u in units)})
        result["diff"] = diffs
    if module.check_mode or not changed:
        module.exit_json(**result)
    if rows:
        argv = [*run.argv("remove"), name]
        rc, data, out, err = run.run(argv)
        if rc != 0:
            module.fail_json(msg=json_error(data) or error_message(err, out), rc=rc, cmd=argv,
                             stderr=err, name=name)
        result["removed"] = (data or {}).get("removed", [])
    if old is not None:
        try:
            os.unlink(path)
        except OSError as exc:
            module.fail_json(msg=f"cannot remove {path}: {exc.strerror}", **result)
    module.exit_json(**result)


ARGUMENT_SPEC: dict[str, dict[str, Any]] = {
    # no_log: see main()
    "spec": {"type": "dict", "no_log": True},
    "name": {"type": "str"},
    "state": {"type": "str", "choices": ["present", "absent"], "default": "present"},
    "scope": {"type": "str", "choices": ["system", "user"], "default": "system"},
    "target": {"type": "str", "choices": ["systemd", "supervisor"], "default": "systemd"},
    "executable": {"type": "str", "default": "unitgen"},
    "spec_dir": {"type": "path"},
    "wait": {"type": "bool", "default": True},
    "port_range": {"type": "str"},
}


def find_executable(module: AnsibleModule, executable: str) -> str | None:
    """The unitgen command as a path, or None when it is not installed."""
    if "/" in executable:
        return executable if os.access(executable, os.X_OK) else None
    found = module.get_bin_path(executable)
    return str(found) if found else None


def main() -> None:
    """Module entry point."""
    module = AnsibleModule(
        argument_spec=ARGUMENT_SPEC,
        required_if=[("state", "present", ("spec",))],
        required_one_of=[("spec", "name")],
        supports_check_mode=True,
    )
    p = module.params
    # Secrets travel in spec (env, args). AnsibleModule logs its invocation to
    # the host's syslog/journal while it is being constructed, before this code
    # can tell which values are secret, so only no_log on the whole option keeps
    # them out of that log (it then says spec=NOT_LOGGING_PARAMETER; the host
    # keeps the spec in its 0600 file anyway). no_log also lists every value of
    # the spec in no_log_values, which Ansible masks in everything the module
    # returns: the instance's name, backend, port and path would turn into
    # "********". So no_log_values keeps the secrets only (plus those of the
    # previous spec file, added when it is read): results, diffs, warnings and
    # unitgen's own output keep everything else readable, and a secret is masked
    # wherever it shows up, invocation.module_args included.
    module.no_log_values.difference_update(spec_strings(p["spec"]))
    module.no_log_values.update(value for _, _, _, value in secrets(p["spec"]))
    spec = dict(p["spec"]) if p["spec"] is not None else None
    name = p["name"]
    if spec is not None:
        if name and "name" in spec and spec["name"] != name:
            module.fail_json(msg=f"name {name!r} differs from spec.name {spec['name']!r}")
        if name and "name" not in spec:
            spec = {"name": name, **spec}
        name = spec.get("name")
    if not isinstance(name, str) or not name:
        module.fail_json(msg="spec: name: is required (lowercase letters, digits and '-')")
    if "/" in name or "\0" in name or name.startswith("."):
        module.fail_json(msg=f"spec: name: {name!r} must be lowercase letters, digits and '-'")
    executable = find_executable(module, p["executable"])
    if executable is None:
        if module.check_mode:  # the install step has not run yet
            present_ = p["state"] == "present"
            module.exit_json(changed=present_, name=name,
                             action="would-create" if present_ else "absent",
                             msg=f"{p['executable']} is not installed yet (check mode)")
        module.fail_json(msg=f"unitgen not found: {p['executable']} (install unitgen-units on "
                             "the host, or set executable)")
    path = os.path.join(p["spec_dir"] or default_spec_dir(p["scope"]), f"{name}.toml")
    # The invocation line masked every value of the spec, the name included:
    # say which instance this is, now that only the secrets are masked.
    module.log(f"Instance {name}: state={p['state']} spec_file={path}")
    run = Runner(module, executable)
    if p["state"] == "present":
        present(module, run, name, spec or {}, path)
    else:
        absent(module, run, name, path)


if __name__ == "__main__":
    main()
