"""Rendering a resolved instance into systemd unit files (text, not yet on disk).

One function builds the Jinja environment (StrictUndefined: a missing variable
is a bug, not an empty string); quoting lives in :mod:`unitgen.targets.systemd.escape`.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import jinja2

from unitgen.errors import Problem, SpecError
from unitgen.plan.instance import RUNTIME_DIR, Instance, runtime_subdir
from unitgen.spec.model import InstanceSpec
from unitgen.targets.base import (
    MARKER,
    RenderedFile,
    find_proxyd,
    strict_environment,
    templates_dir,
)
from unitgen.targets.systemd import escape
from unitgen.timespan import format_seconds

__all__ = [
    "MARKER",
    "OWNED_DIRECTIVES",
    "RenderContext",
    "RenderedFile",
    "SystemdTarget",
    "confine_argv",
    "find_proxyd",
    "make_environment",
    "render_instance",
    "render_swap_dropin",
    "secret_path",
    "spec_problems",
    "templates_dir",
]


# Directives unitgen sets itself; [systemd.*] in a spec may not override them,
# because each one could move the port, the probe or the process that owns them.
OWNED_DIRECTIVES = frozenset({
    "ExecStart", "ExecStartPost", "ExecStartPre", "ExecStop", "ExecStopPost", "ExecReload",
    "Type", "Environment", "DevicePolicy", "KillSignal",
    "EnvironmentFile", "RuntimeDirectory", "RuntimeDirectoryMode",
    "User", "Group", "WorkingDirectory", "Restart", "NotifyAccess", "TimeoutStartSec",
    "StopWhenUnneeded", "PartOf", "BindsTo", "After", "Before", "Requires", "Sockets",
    "ListenStream", "KillMode", "SyslogIdentifier", "DynamicUser",
})

# A server starts its ExecStartPost probe at once; systemd's own start timeout is
# the probe's deadline plus this margin, so the probe's one-line reason wins.
START_MARGIN = 30.0


@dataclass(frozen=True)
class RenderContext:
    """What rendering needs from the host: the interpreter that runs the probe,
    where systemd-socket-proxyd lives, and which manager the units are for."""

    python: str
    proxyd: str
    scope: str = "system"  # "system" or "user"
    # Where the interpreter's environment and unitgen's own package live: the
    # units run code from there (the probe, the GPU wait).
    code_paths: tuple[str, ...] = ()

    @classmethod
    def detect(cls, *, scope: str = "system") -> RenderContext:
        """The context of this host: this interpreter and the installed proxyd."""
        package_root = str(Path(__file__).resolve().parents[3])
        return cls(python=sys.executable, proxyd=find_proxyd(), scope=scope,
                   code_paths=tuple(dict.fromkeys((sys.prefix, package_root))))


@functools.cache
def make_environment() -> jinja2.Environment:
    """The one Jinja environment (:func:`unitgen.targets.base.strict_environment`):
    only the escaping filters below print a value. Built once per process:
    compiling the templates is most of a render's cost."""
    return strict_environment("systemd", _FILTERS)


_FILTERS: dict[str, Callable[..., str]] = {
    "exec": escape.exec_line,
    "env": escape.environment_assignment,
    "text": escape.text_value,
    "path": escape.path_value,
    "word": escape.word_value,
    "directive": escape.directive_name,
    "setting": escape.setting_value,
    "specifier_path": escape.specifier_path,
}


def secret_path(name: str) -> str:
    """Where an instance's secret file is installed, as a unit specifier path:
    ``/etc/unitgen/secrets/NAME.env`` (system) or ``~/.config/unitgen/secrets/NAME.env`` (user)."""
    return f"%E/unitgen/secrets/{name}.env"


def _probe_cmd(ctx: RenderContext, inst: Instance, target: str, label: str) -> list[str]:
    cmd = [
        ctx.python, "-I", "-m", "unitgen.inunit.probe",
        "--target", target, "--path", inst.health_path,
        "--timeout", format_seconds(inst.health_timeout), "--label", label,
    ]
    if inst.probe_key_env:
        cmd += ["--key-env", inst.probe_key_env]
    if label == "private" and inst.private is not None and inst.private.kind == "tcp":
        # A loopback port is free while the server is down: send nothing (no key)
        # to the other end of a connection that the server's uid did not create.
        cmd.append("--own-listener")
    return cmd


def confine_argv(python: str, port: int, argv: list[str]) -> list[str]:
    """The server's argv behind the bind confinement (:mod:`unitgen.inunit.confine`):
    among privileged ports it may bind ``port`` only."""
    return [python, "-I", "-m", "unitgen.inunit.confine", "--bind-port", str(port), "--", *argv]


def _watch_cmd(ctx: RenderContext, inst: Instance, target: str, label: str) -> list[str]:
    """The liveness checker started after ready (empty: [health] watchdog = "off")."""
    bound = inst.spec.health.watchdog
    if bound is None:
        return []
    cmd = [ctx.python, "-I", "-m", "unitgen.inunit.watch", "--target", target,
           "--path", inst.health_path, "--bound", format_seconds(bound), "--label", label]
    if inst.probe_key_env:
        cmd += ["--key-env", inst.probe_key_env]
    if label == "private" and inst.private is not None and inst.private.kind == "tcp":
        cmd.append("--own-listener")  # as the probe: a squatter gets no key, feeds no watchdog
    return cmd


def spec_problems(spec: InstanceSpec) -> list[Problem]:
    """What the systemd target refuses in a valid spec: directives unitgen owns,
    and values that would continue onto the next line."""
    problems = [
        Problem(spec.source, f"systemd.{section}.{key}",
                f"is set by unitgen and cannot be overridden ({_owned_hint(key)})")
        for section, pairs in (("unit", spec.systemd_unit), ("service", spec.systemd_service))
        for key, _ in pairs if key in OWNED_DIRECTIVES
    ]
    problems += [
        Problem(spec.source, f"systemd.{section}.{key}", "must not end with a backslash")
        for section, pairs in (("unit", spec.systemd_unit), ("service", spec.systemd_service))
        for key, value in pairs if value.endswith("\\")
    ]
    return problems


@dataclass(frozen=True)
class SystemdTarget:
    """The systemd target for one manager (see :class:`RenderContext`)."""

    ctx: RenderContext
    name: str = "systemd"

    def spec_problems(self, spec: InstanceSpec) -> list[Problem]:
        """See :func:`spec_problems`; and a user manager cannot switch users."""
        problems = spec_problems(spec)
        for key in ("user", "group"):
            if self.ctx.scope == "user" and getattr(spec, key):
                problems.append(Problem(spec.source, key, f"is for the system manager: a user "
                                        f"manager runs everything as its own user (drop {key} "
                                        "or deploy without --user)"))
        return problems

    def render(self, inst: Instance) -> list[RenderedFile]:
        """See :func:`render_instance`."""
        return render_instance(inst, self.ctx)


def _owned_hint(key: str) -> str:
    hints = {
        "User": "use user = ...", "Group": "use group = ...", "Restart": "use restart = ...",
        "Environment": "use [env]", "WorkingDirectory": "use working_directory = ...",
        "ExecStart": "use args, or command for backend custom",
        "TimeoutStartSec": "use [health] timeout",
    }
    return hints.get(key, "it keeps the port, the probe and the process tree consistent")


# Device nodes every CUDA process needs, besides /dev/nvidiaN of its GPUs.
NVIDIA_CONTROL_NODES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools")
GPU_WAIT_TIMEOUT = 120.0


def _gpu_context(inst: Instance, ctx: RenderContext) -> dict[str, object]:
    placement = inst.gpus
    if placement is None:
        return {"gpu_header": "", "gpu_wait": [], "device_allow": []}
    header = ",".join(placement.uuids) + (" shared" if placement.share else " exclusive")
    # -P, not -I: no current or script directory on sys.path (a pynvml.py planted in
    # WorkingDirectory must not run as the unit's user), but PYTHONPATH is honoured,
    # so an operator (or the tests) can put an NVML shim first.
    wait = [ctx.python, "-P", "-m", "unitgen.inunit.gpuwait", "--instance", inst.name,
            "--gpus", ",".join(placement.uuids), "--timeout", format_seconds(GPU_WAIT_TIMEOUT)]
    devices: list[str] = []
    if ctx.scope == "system" and placement.minors is not None:
        devices = [*NVIDIA_CONTROL_NODES, *(f"/dev/nvidia{m}" for m in placement.minors)]
    return {"gpu_header": header, "gpu_wait": wait, "device_allow": devices}


# Variables that name where a model server writes its caches: made writable.
CACHE_ENV = ("HOME", "XDG_CACHE_HOME", "HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
             "TRANSFORMERS_CACHE", "VLLM_CACHE_ROOT", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR",
             "LLAMA_CACHE", "MODELSCOPE_CACHE", "OUTLINES_CACHE_DIR")
_PLAIN_PATH = re.compile(r"/[A-Za-z0-9._/+@:=,-]*")
_HOMES = ("/home", "/root", "/run/user")
_TMPS = ("/tmp", "/var/tmp")  # noqa: S108 - names of the host dirs PrivateTmp= hides


def _under(path: str, tops: tuple[str, ...]) -> bool:
    return any(path == top or path.startswith(top + "/") for top in tops)


def _hardening_context(inst: Instance, ctx: RenderContext) -> dict[str, object]:
    """The sandbox of a system-scope server (docs/reliability.md#hardening):
    nothing at user scope (a user manager cannot set up most of it) or with
    ``hardening = false``."""
    spec = inst.spec
    if ctx.scope != "system" or not spec.hardening:
        return {"hardening": False}
    env = dict(inst.env)
    writable = [v for k, v in inst.env if k in CACHE_ENV and v.startswith("/")]
    if spec.working_directory:
        writable.append(spec.working_directory)
    # Only plain paths can be listed (spaces would split them): others keep the
    # read-only view and the docs say to set ReadWritePaths= in [systemd.service].
    writable = sorted({p for p in writable if _PLAIN_PATH.fullmatch(p)})
    # Where the interpreter really lives counts too (a venv's python is a symlink,
    # often into /root/.pyenv or a home directory).
    read = [ctx.python, os.path.realpath(ctx.python),
            *(w for w in (spec.model, spec.executable) if w and w.startswith("/"))]
    state = runtime_subdir(spec.name)
    # A dynamic user's home is "/": caches go to its own state and cache directories.
    defaults = [(k, v) for k, v in (("HOME", f"/var/lib/{state}"),
                                    ("XDG_CACHE_HOME", f"/var/cache/{state}"))
                if k not in env and not spec.user]
    unix = inst.private is not None and inst.private.kind == "unix"
    local_model = bool(spec.model and spec.model.startswith("/"))
    # PrivateTmp= hides the host's /tmp and /var/tmp: code or a model kept there
    # (a checkout in /tmp, say) is bound into the unit read-only.
    in_tmp = sorted({p for p in [*ctx.code_paths, *read]
                     if _under(p, _TMPS) and _PLAIN_PATH.fullmatch(p)})
    return {
        "hardening": True,
        "bind_ro": in_tmp,
        "state_dir": state,
        "home_defaults": defaults,
        "writable": writable,
        "protect_home": "read-only" if any(_under(p, _HOMES) for p in [*read, *writable])
                        else "yes",
        "private_network": unix and (spec.offline or local_model),
    }


# A waiting member may stand behind a few turns of the others (each: drain + load).
SWAP_TURNS = 4


def _swap_context(inst: Instance, ctx: RenderContext) -> dict[str, object]:
    """The proxy of a swap-group member (issue 12): unitgen's draining proxy,
    which takes the group's turn before it forwards (docs/swap.md)."""
    spec = inst.spec
    assert spec.swap_group is not None and inst.private is not None  # noqa: S101
    wait = SWAP_TURNS * (inst.health_timeout + spec.swap_drain)
    cmd = [ctx.python, "-I", "-m", "unitgen.inunit.swapproxy", "--name", spec.name,
           "--group", spec.swap_group, "--lock", f"{RUNTIME_DIR}/unitgen-swap/{spec.swap_group}.lock",
           "--scope", ctx.scope, "--drain", format_seconds(spec.swap_drain),
           f"--connections-max={spec.max_connections}"]
    if spec.idle_stop is not None:
        cmd.append(f"--exit-idle-time={format_seconds(spec.idle_stop)}")
    cmd.append(inst.private.listen())
    return {
        "proxy_cmd": cmd,
        "probe_public": _probe_cmd(ctx, replace(inst, health_timeout=wait),
                                   inst.public.probe_target(), "public"),
        "swap_start_timeout": format_seconds(wait + START_MARGIN),
        # every swap waits for this probe: poll faster than a load that happens once
        "probe_private": [*_probe_cmd(ctx, inst, inst.private.probe_target(), "private"),
                          "--interval", "50ms"],
        "swap_stop_timeout": format_seconds(spec.swap_drain + START_MARGIN),
    }


def render_swap_dropin(name: str, group: str, mates: list[str]) -> RenderedFile:
    """``<name>-backend.service.d/unitgen-swap.conf``: the group's ``Conflicts=``,
    rewritten for every member whenever the member list changes."""
    text = make_environment().get_template("swap-group.conf.j2").render({
        "name": name, "group": group,
        "conflicts": [f"{m}-backend.service" for m in mates],
        # one ordering edge per pair (no cycle): a stop is then always ordered
        # before the other member's start, whichever way the edge points
        "after": [f"{m}-backend.service" for m in mates if m < name],
    })
    return RenderedFile(f"{name}-backend.service.d/unitgen-swap.conf", text)


def render_instance(inst: Instance, ctx: RenderContext) -> list[RenderedFile]:
    """Render an instance's unit files (and its secret file, if it has a key).

    A value that no escaping filter can write (validation should have refused it
    already) becomes a spec problem, never a half-written or injected unit."""
    problems = spec_problems(inst.spec)
    if problems:
        raise SpecError(problems=problems)
    try:
        return _render_files(inst, ctx)
    except ValueError as exc:
        raise SpecError(problems=[Problem(inst.spec.source, "", f"cannot be rendered: {exc}")]) \
            from None


def _render_files(inst: Instance, ctx: RenderContext) -> list[RenderedFile]:
    env = make_environment()
    spec = inst.spec
    addr = ipaddress.ip_address(inst.public.host)
    secret = bool(inst.secrets)
    hardening = _hardening_context(inst, ctx)
    # a server run as another user needs the right to bind its privileged private port
    bind_low_port = bool((spec.user or hardening["hardening"]) and inst.private is not None
                         and inst.private.kind == "tcp" and inst.private.port < 1024)
    argv = list(inst.argv)
    if bind_low_port:
        assert inst.private is not None  # noqa: S101 - bind_low_port says so
        # ... and only that one: with the capability alone it could bind any
        # privileged port, another instance's private port included
        argv = confine_argv(ctx.python, inst.private.port, argv)
    common = {
        "source": Path(spec.source).name,
        "name": spec.name,
        "backend": spec.backend,
        "model": spec.model or spec.name,
        "description": spec.description or "",
        "public_listen": inst.public.listen(),
        "free_bind": not (addr.is_loopback or addr.is_unspecified),
        "eager": spec.activation == "eager",
        "wanted_by": "default.target" if ctx.scope == "user" else "multi-user.target",
        "start_timeout": format_seconds(inst.health_timeout + START_MARGIN),
        "secret_file": secret_path(spec.name) if secret else "",
        "argv": argv,
        "env": list(inst.env),
        "working_directory": spec.working_directory or "",
        "user": spec.user or "",
        "group": spec.group or "",
        "restart": spec.restart,
        "unit_extra": list(spec.systemd_unit),
        "service_extra": list(spec.systemd_service),
        "probe_public": _probe_cmd(ctx, inst, inst.public.probe_target(), "public"),
        "watch": _watch_cmd(ctx, inst, inst.public.probe_target(), "public"),
        "bind_low_port": bind_low_port,
        **hardening,
        **_gpu_context(inst, ctx),
        "swap_group": spec.swap_group or "",
    }
    files = [RenderedFile(f"{spec.name}.socket", env.get_template("socket.j2").render(common))]
    if inst.private is None:
        text = env.get_template("direct.service.j2").render(common)
        files.append(RenderedFile(f"{spec.name}.service", text))
    else:
        proxy_cmd = [ctx.proxyd, f"--connections-max={spec.max_connections}"]
        if spec.idle_stop is not None:
            proxy_cmd.append(f"--exit-idle-time={format_seconds(spec.idle_stop)}")
        proxy_cmd.append(inst.private.listen())
        private_ctx = {
            **common,
            "proxy_cmd": proxy_cmd,
            # Only an idle_stop instance needs this (its proxy exits on its own). Elsewhere
            # it would undo a restart: a server that dies leaving processes behind (workers,
            # the liveness checker) passes through "deactivating", which stops the proxy
            # (BindsTo=), and an unneeded server would then be stopped instead of restarted.
            "idle_stop": spec.idle_stop is not None,
            "probe_private": _probe_cmd(ctx, inst, inst.private.probe_target(), "private"),
            "watch": _watch_cmd(ctx, inst, inst.private.probe_target(), "private"),
            "runtime_dir": runtime_subdir(spec.name) if RUNTIME_DIR in inst.private.path else "",
            "proxy_reaches_socket_file": inst.private.kind == "unix",
            # a server killed with -9 leaves its socket file, and llama-server then
            # cannot bind it: the next start removes it first
            "clean_socket": (["/bin/rm", "-f", inst.private.path]
                             if inst.private.kind == "unix" else []),
        }
        if spec.swap_group:
            private_ctx.update(_swap_context(inst, ctx))
        files.append(RenderedFile(
            f"{spec.name}.service", env.get_template("proxy.service.j2").render(private_ctx)))
        files.append(RenderedFile(
            f"{spec.name}-backend.service",
            env.get_template("backend.service.j2").render(private_ctx)))
    if secret:
        lines = [f"# Secrets of unitgen instance {spec.name}; mode 0600. Generated: do not edit.",
                 f"{MARKER}{spec.name}",
                 *(escape.env_file_line(k, v) for k, v in inst.secrets)]
        files.append(RenderedFile(f"{spec.name}.env", "\n".join(lines) + "\n", secret=True))
    return files
