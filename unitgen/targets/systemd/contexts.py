"""What the systemd templates are filled with, beside the plain spec values:
the host's context, the probe and checker command lines, and the GPU, sandbox
and swap-group sections. Pure functions of a planned instance and the context."""

from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from unitgen.features.swap.plan import turn_wait
from unitgen.plan.container import needs_no_network
from unitgen.plan.instance import CONFIG_DIR, RUNTIME_DIR, STATE_DIR, Instance, runtime_subdir
from unitgen.targets.base import find_proxyd
from unitgen.targets.podman import run_words
from unitgen.timespan import format_seconds

__all__ = ["START_MARGIN", "RenderContext", "confine_argv", "container_context", "gpu_context",
           "hardening_context", "pool_context", "probe_cmd", "proxy_user_context",
           "swap_context", "watch_cmd"]

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
    podman: str = "/usr/bin/podman"  # runs the servers of specs with image = ...

    @classmethod
    def detect(cls, *, scope: str = "system") -> RenderContext:
        """The context of this host: this interpreter and the installed proxyd."""
        package_root = str(Path(__file__).resolve().parents[3])
        return cls(python=sys.executable, proxyd=find_proxyd(), scope=scope,
                   code_paths=tuple(dict.fromkeys((sys.prefix, package_root))),
                   podman=shutil.which("podman") or "/usr/bin/podman")


def _checks_listener_uid(inst: Instance) -> bool:
    """The probe and the checker run as the server's uid and send nothing to a
    listener another uid created. Not for a container's Unix socket: its server
    runs as whatever uid the image says (root on the host by default), and the
    socket file itself is checked there (never through a link)."""
    private = inst.private
    return private is not None and (private.kind == "tcp" or inst.container is None)


def probe_cmd(ctx: RenderContext, inst: Instance, target: str, label: str) -> list[str]:
    cmd = [
        ctx.python, "-I", "-m", "unitgen.inunit.probe",
        "--target", target, "--path", inst.health_path,
        "--timeout", format_seconds(inst.health_timeout), "--label", label,
    ]
    if inst.probe_key_env:
        cmd += ["--key-env", inst.probe_key_env]
    if label == "private" and _checks_listener_uid(inst):
        # A loopback port is free while the server is down, and a socket path in
        # the server's runtime directory can be a link to any socket: send nothing
        # (no key) to the other end of a connection the server's uid did not create.
        cmd.append("--own-listener")
    return cmd


def confine_argv(python: str, port: int, argv: list[str]) -> list[str]:
    """The server's argv behind the bind confinement (:mod:`unitgen.inunit.confine`):
    among privileged ports it may bind ``port`` only."""
    return [python, "-I", "-m", "unitgen.inunit.confine", "--bind-port", str(port), "--", *argv]


def watch_cmd(ctx: RenderContext, inst: Instance, target: str, label: str) -> list[str]:
    """The liveness checker started after ready (empty: [health] watchdog = "off")."""
    bound = inst.spec.health.watchdog
    if bound is None:
        return []
    cmd = [ctx.python, "-I", "-m", "unitgen.inunit.watch", "--target", target,
           "--path", inst.health_path, "--bound", format_seconds(bound), "--label", label]
    if inst.probe_key_env:
        cmd += ["--key-env", inst.probe_key_env]
    if label == "private" and _checks_listener_uid(inst):
        cmd.append("--own-listener")  # as the probe: a squatter gets no key, feeds no watchdog
    return cmd


# Device nodes every CUDA process needs, besides /dev/nvidiaN of its GPUs.
NVIDIA_CONTROL_NODES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools")
GPU_WAIT_TIMEOUT = 120.0


def gpu_context(inst: Instance, ctx: RenderContext) -> dict[str, object]:
    placement = inst.gpus
    if placement is None:
        return {"gpu_wait": [], "device_allow": []}
    # -P, not -I: no current or script directory on sys.path (a pynvml.py planted in
    # WorkingDirectory must not run as the unit's user), but PYTHONPATH is honoured,
    # so an operator (or the tests) can put an NVML shim first.
    wait = [ctx.python, "-P", "-m", "unitgen.inunit.gpuwait", "--instance", inst.name,
            "--gpus", ",".join(placement.uuids), "--timeout", format_seconds(GPU_WAIT_TIMEOUT)]
    devices: list[str] = []
    if ctx.scope == "system" and placement.minors is not None:
        devices = [*NVIDIA_CONTROL_NODES, *(f"/dev/nvidia{m}" for m in placement.minors)]
    return {"gpu_wait": wait, "device_allow": devices}


# Variables that name where a model server writes its caches: made writable.
CACHE_ENV = ("HOME", "XDG_CACHE_HOME", "HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
             "TRANSFORMERS_CACHE", "VLLM_CACHE_ROOT", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR",
             "LLAMA_CACHE", "MODELSCOPE_CACHE", "OUTLINES_CACHE_DIR")
_PLAIN_PATH = re.compile(r"/[A-Za-z0-9._/+@:=,-]*")
_HOMES = ("/home", "/root", "/run/user")
_TMPS = ("/tmp", "/var/tmp")  # noqa: S108 - names of the host dirs PrivateTmp= hides


def _under(path: str, tops: tuple[str, ...]) -> bool:
    return any(path == top or path.startswith(top + "/") for top in tops)


def hardening_context(inst: Instance, ctx: RenderContext) -> dict[str, object]:
    """The sandbox of a system-scope server (docs/reliability.md#hardening):
    nothing at user scope (a user manager cannot set up most of it) or with
    ``hardening = false``."""
    spec = inst.spec
    if ctx.scope != "system" or not spec.hardening or inst.container is not None:
        # a container's unit runs podman, as root: container_context confines it
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
        "private_network": unix and needs_no_network(spec),
    }


def proxy_user_context(inst: Instance, ctx: RenderContext) -> dict[str, object]:
    """Who the proxy unit of a system-scope instance runs as: the server's own
    user (its dynamic user, shared by naming it in both units, or its ``user``),
    so that connecting to the private endpoint by path, following whatever link
    the server put there, reaches nothing the server could not reach itself.
    Root stays root (a server run as root); so does a swap group's proxy, which
    asks the manager to start and stop units, and never follows a link and
    checks the peer instead (:mod:`unitgen.inunit.peer`). A container's server
    is root on the host: its proxy is :mod:`unitgen.inunit.relay`, which never
    follows a link either."""
    spec = inst.spec
    none: dict[str, object] = {"proxy_user": "", "proxy_group": "", "proxy_dynamic": False,
                               "dynamic_user": ""}
    if (ctx.scope != "system" or inst.private is None or inst.container is not None
            or spec.swap_group):
        return none
    if spec.user:
        return {**none, "proxy_user": spec.user, "proxy_group": spec.group or ""}
    if spec.hardening:
        # the name systemd gives the server's dynamic user anyway (its unit's), so
        # its uid, and what it owns in its state and cache directories, stay
        dynamic = f"{spec.name}-backend"
        return {**none, "proxy_user": dynamic, "proxy_dynamic": True, "dynamic_user": dynamic}
    return none


def swap_context(inst: Instance, ctx: RenderContext) -> dict[str, object]:
    """The proxy of a swap-group member (issue 12): unitgen's draining proxy,
    which takes the group's turn before it forwards (docs/swap.md)."""
    spec = inst.spec
    assert spec.swap_group is not None and inst.private is not None  # noqa: S101
    wait = turn_wait(inst.health_timeout, spec.swap_drain)
    cmd = [ctx.python, "-I", "-m", "unitgen.inunit.swapproxy", "--name", spec.name,
           "--group", spec.swap_group, "--lock", f"{RUNTIME_DIR}/unitgen-swap/{spec.swap_group}.lock",
           "--scope", ctx.scope, "--drain", format_seconds(spec.swap_drain),
           f"--connections-max={spec.max_connections}"]
    if not _checks_listener_uid(inst):
        cmd.append("--any-uid")  # a container's Unix socket: the path is checked (no link)
    if spec.idle_stop is not None:
        cmd.append(f"--exit-idle-time={format_seconds(spec.idle_stop)}")
    cmd.append(inst.private.listen())
    return {
        "proxy_cmd": cmd,
        "probe_public": probe_cmd(ctx, replace(inst, health_timeout=wait),
                                   inst.public.probe_target(), "public"),
        "swap_start_timeout": format_seconds(wait + START_MARGIN),
        # every swap waits for this probe: poll faster than a load that happens once
        "probe_private": [*probe_cmd(ctx, inst, inst.private.probe_target(), "private"),
                          "--interval", "50ms"],
        "swap_stop_timeout": format_seconds(spec.swap_drain + START_MARGIN),
    }


def pool_context(inst: Instance, ctx: RenderContext) -> dict[str, object]:
    """The proxy of a GPU pool member (issue 27): the swap proxy again, taking its
    turn on its GPUs by memory (docs/swap.md), and the measured record after ready."""
    spec, terms, placement = inst.spec, inst.pool, inst.gpus
    assert terms is not None and placement is not None and inst.private is not None  # noqa: S101
    # the pool's bound (TurnRules.max_wait): turns of others, each a minimum turn,
    # a drain and a load; the gateway waits for a pool member as long (one rule)
    wait = turn_wait(inst.health_timeout + terms.min_turn, spec.swap_drain)
    # -P, not -I, as for the GPU wait: PYTHONPATH is honoured (an NVML shim first)
    cmd = [ctx.python, "-P", "-m", "unitgen.inunit.swapproxy", "--name", spec.name,
           "--pool", f"{CONFIG_DIR}/unitgen/pool/{spec.name}.json",
           "--state", f"{RUNTIME_DIR}/unitgen-pool", "--measured", STATE_DIR,
           "--scope", ctx.scope, "--drain", format_seconds(spec.swap_drain),
           f"--connections-max={spec.max_connections}"]
    if spec.idle_stop is not None:
        cmd.append(f"--exit-idle-time={format_seconds(spec.idle_stop)}")
    cmd.append(inst.private.listen())
    devices: list[str] = []
    if ctx.scope == "system" and placement.minors is not None:
        devices = [*NVIDIA_CONTROL_NODES, *(f"/dev/nvidia{m}" for m in placement.minors)]
    gpu_wait = [ctx.python, "-P", "-m", "unitgen.inunit.poolstart", "--checked",
                f"{RUNTIME_DIR}/unitgen-pool/{spec.name}.start", "--", "--instance", spec.name,
                "--gpus", ",".join(placement.uuids), "--timeout", format_seconds(GPU_WAIT_TIMEOUT)]
    return {
        "proxy_cmd": cmd,
        # a start of its turn was weighed under the GPUs' locks: no second wait
        "gpu_wait": gpu_wait,
        "probe_public": probe_cmd(ctx, replace(inst, health_timeout=wait),
                                   inst.public.probe_target(), "public"),
        "swap_start_timeout": format_seconds(wait + START_MARGIN),
        # every turn that loads waits for this probe: a private endpoint is cheap to ask
        "probe_private": [*probe_cmd(ctx, inst, inst.private.probe_target(), "private"),
                          "--interval", "20ms"],
        "swap_stop_timeout": format_seconds(spec.swap_drain + START_MARGIN),
        # only a need the spec does not say is ever taken from a measurement
        "memrecord": [] if terms.fixed else [
            ctx.python, "-P", "-m", "unitgen.inunit.memrecord", "--instance", spec.name,
            "--gpus", ",".join(placement.uuids), "--state-dir", STATE_DIR,
            "--fingerprint", terms.fingerprint],
        "pool_devices": devices,
        # asleep, the server runs on without its proxy: nothing must stop it as unneeded
        "idle_stop": False,
        # it starts and stops units, as a swap group's proxy: root at system scope
        # (without capabilities but the one to reach the server's socket)
        "proxy_user": "", "proxy_group": "", "proxy_dynamic": False,
        "proxy_reaches_socket_file": inst.private.kind == "unix",
    }


# How long podman stop waits for the server before SIGKILL: inside the unit's
# TimeoutStopSec=60s, so podman, not systemd, ends a server that ignores SIGTERM.
CONTAINER_STOP_SECONDS = 50


def container_context(inst: Instance, ctx: RenderContext) -> dict[str, object]:
    """The unit of a server run with podman (docs/containers.md): ExecStart is
    ``podman run`` behind the wrapper that passes rlimits and the binds it walked;
    stop and every end remove the container."""
    c = inst.container
    if c is None:
        return {"container": "", "image": ""}
    run = [ctx.python, "-I", "-m", "unitgen.inunit.podrun", *(f"--volume={v}" for v in c.volumes),
           "--", ctx.podman, *run_words(c)]
    return {
        "container": c.name,
        "image": c.image,
        "argv": run,
        # the container's (--workdir): the path need not exist on the host
        "working_directory": "",
        # no DevicePolicy= on the podman unit: runc must write the container's own
        # device rules below it ("b *:* m" was refused under DevicePolicy=closed,
        # measured); the container gets the default nodes and its CDI GPUs only
        "device_allow": [],
        "container_stop": [ctx.podman, "stop", "--ignore", f"--time={CONTAINER_STOP_SECONDS}",
                           c.name],
        "container_remove": [ctx.podman, "rm", "--force", "--ignore", "--time=0", c.name],
        # system scope, hardening = true: what podman (root, mounts, namespaces in
        # the host's mount namespace) still works under
        "container_hardening": ctx.scope == "system" and inst.spec.hardening,
    }
