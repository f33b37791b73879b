"""Running the server from a container image (``image =``, docs/containers.md).

A container is one more way to start the same server: the plan of the instance
(public socket, private endpoint, probe, GPUs, swap group, idle stop) does not
change; only the server's command line is wrapped in ``podman run``. This module
says what that ``podman run`` is, in words any target can write out: the server's
argv as it reads inside the container, the options, the devices. No systemd here.

- The private Unix socket lives in the instance's runtime directory on the host
  (the proxy and the probe reach it there); that directory is bound into the
  container at :data:`CONTAINER_RUNTIME`, and the server is told the path there.
- ``--network none`` where the server needs no network (its model is on disk or
  ``offline = true``) and serves on a Unix socket or a passed socket; otherwise
  the host's network (``--network host``): a loopback private port then works as
  for a server on the host, and a model can be downloaded.
- Variables reach the container by name only (``--env NAME``): their values stay in
  the unit's environment (and secrets in their 0600 file), never in an argv.
- GPUs are CDI devices named by UUID (``nvidia.com/gpu=GPU-...``), as
  ``nvidia-ctk cdi generate`` names them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from unitgen.inunit.volumes import check_volumes
from unitgen.plan.podmanargs import check_podman_args
from unitgen.spec.model import InstanceSpec

__all__ = ["CDI_KIND", "CONTAINER_RUNTIME", "Container", "ProblemSink", "container_name",
           "needs_no_network", "plan_container", "podman_env_reason"]

# Where the instance's runtime directory (its private socket) is inside the container.
CONTAINER_RUNTIME = "/run/unitgen"
# The CDI device kind of NVIDIA GPUs (nvidia-ctk's default).
CDI_KIND = "nvidia.com/gpu"

ProblemSink = Callable[[str, str], None]

# podman run options unitgen sets itself, and what to use instead.
_OWNED = {
    "--name": "unitgen names the container unitgen-<name>",
    "--rm": "unitgen removes the container when it stops",
    "--replace": "unitgen replaces a leftover container",
    "--network": "the network follows from where the server listens (docs/containers.md)",
    "--net": "the network follows from where the server listens (docs/containers.md)",
    "--publish": "the socket unit owns the public port; nothing is published",
    "-p": "the socket unit owns the public port; nothing is published",
    "--publish-all": "the socket unit owns the public port; nothing is published",
    "-P": "the socket unit owns the public port; nothing is published",
    "--cgroups": "the container runs in the unit's own cgroup (--cgroups=split)",
    "--log-driver": "the server logs to the unit's journal (--log-driver=passthrough)",
    "--detach": "the unit's main process is podman run in the foreground",
    "-d": "the unit's main process is podman run in the foreground",
    "--entrypoint": "use executable = ...",
    "--env": "use [env] (a value in argv is readable by every local user)",
    "-e": "use [env] (a value in argv is readable by every local user)",
    "--ipc": "use ipc = ...",
    "--shm-size": "use shm_size = ...",
    "--workdir": "use working_directory = ...",
    "-w": "use working_directory = ...",
    "--ulimit": "the unit's LimitNOFILE=/LimitNPROC= are passed in: set those in [systemd.service]",
    "--restart": "systemd restarts the unit (restart = ...)",
    "--privileged": "it lifts every confinement of the container (and of the GPU placement)",
    "--tty": "the server's output goes to the journal",
    "-t": "the server's output goes to the journal",
    "--interactive": "the server's output goes to the journal",
    "-i": "the server's output goes to the journal",
    "--sdnotify": "the unit's readiness is its probe",
    "--cidfile": "unitgen finds the container by its name",
    "--pod": "one instance, one container",
    "--device": "GPUs are placed by unitgen (gpus = ...), as CDI devices; other devices are "
                "not passed (the podman unit has no DevicePolicy=)",
    "--gpus": "GPUs are placed by unitgen: use gpus = ...",
    "--volume": "use volumes = [...] (checked binds)",
    "-v": "use volumes = [...] (checked binds)",
    "--mount": "use volumes = [...] (checked binds)",
    "--pull": "use pull = ...: deploy pulls, a start never waits on a registry",
}

# Variables podman reads itself (podman(1) ENVIRONMENT, podman-run(1),
# containers.conf(5), and the names in podman 4.3's binary). The unit's
# environment is podman's before it is the container's, and podman runs as root:
# each of these would change the engine, not the server. Exact names, then prefixes.
_PODMAN_ENV = {
    "CONTAINER_HOST": "points podman at another podman service",
    "CONTAINER_CONNECTION": "points podman at another podman service",
    "CONTAINER_SSHKEY": "points podman at another podman service",
    "CONTAINER_PASSPHRASE": "points podman at another podman service",
    "STORAGE_DRIVER": "is podman's storage configuration",
    "STORAGE_OPTS": "is podman's storage configuration",
    "REGISTRY_AUTH_FILE": "is podman's registry login",
    "XDG_CONFIG_HOME": "is where podman may read its configuration",
    "XDG_DATA_HOME": "is where podman may keep its images",
    "XDG_RUNTIME_DIR": "is where podman may keep its state and logins",
    "NOTIFY_SOCKET": "is podman's readiness protocol (the unit's readiness is its probe)",
    "CONTAINERS_": "is podman's configuration (containers.conf, storage, registries, helpers)",
    "_CONTAINERS_": "is podman's internal state",
    "PODMAN_": "is podman's own setting (PODMAN_USERNS, ...)",
    "LD_": "is the dynamic loader's: it loads code into podman, which runs as root",
}


def podman_env_reason(name: str) -> str | None:
    """Why variable ``name`` may not be in the environment of a container's unit
    (podman would read it); None if podman does not."""
    if name in _PODMAN_ENV:
        return _PODMAN_ENV[name]
    return next((why for prefix, why in _PODMAN_ENV.items()
                 if prefix.endswith("_") and name.startswith(prefix)), None)


def container_name(name: str) -> str:
    """The container of instance ``name``: one name, so a leftover is replaced, never doubled."""
    return f"unitgen-{name}"


def needs_no_network(spec: InstanceSpec) -> bool:
    """The server needs no network: its model is on disk or the spec says offline.
    (The one rule; the sandbox's ``PrivateNetwork=`` uses it too.)"""
    return spec.offline or bool(spec.model and spec.model.startswith("/"))


@dataclass(frozen=True)
class Container:
    """One instance's container, as data: what a target writes out as ``podman
    run`` words (systemd, :mod:`unitgen.targets.podman`), and what another
    renderer (a Quadlet ``.container`` file, say) could write as its keys.
    ``argv`` is the server's command as it runs inside the container."""

    name: str
    image: str
    argv: tuple[str, ...]
    network: str  # "none" or "host"
    pull: str
    pull_timeout: float
    devices: tuple[str, ...] = ()  # CDI devices (GPUs)
    # the spec's binds (HOST:CONTAINER[:ro]): the start walks each source on the
    # host first (unitgen.inunit.podrun), so they are passed apart
    volumes: tuple[str, ...] = ()
    env_names: tuple[str, ...] = ()  # variables it gets by name from the unit's environment
    runtime: str = ""  # the instance's runtime directory, bound at CONTAINER_RUNTIME ("": none)
    confined: bool = False  # no capabilities, no setuid gains (hardening)
    cap_add: tuple[str, ...] = ()  # capabilities given back (its privileged private port)
    shm_size: int | None = None  # bytes
    ipc: str = "private"
    workdir: str = ""
    extra: tuple[str, ...] = ()  # the spec's podman_args: checked words, passed as written


def plan_container(spec: InstanceSpec, argv: tuple[str, ...], env_names: tuple[str, ...],
                   private: tuple[str, str, int] | None, gpu_uuids: tuple[str, ...],
                   problem: ProblemSink) -> Container | None:
    """The container of a spec with ``image`` (None without one).

    ``private`` is the private endpoint's (kind, path, port): ("unix", a socket in
    the instance's runtime directory, 0), ("tcp", "", its loopback port), or None
    (the server takes the public socket itself)."""
    if spec.image is None:
        return None
    check_podman_args(spec.podman_args, _OWNED, problem)
    check_volumes(spec.volumes, problem)
    for name in env_names:
        why = podman_env_reason(name)
        if why:
            problem(f"env.{name}", f"{why}: podman reads the unit's environment before the "
                                   "container gets it; set it in the image instead")
    kind, path, port = private or (None, "", 0)
    offline = needs_no_network(spec) and kind in ("unix", None)
    inner, runtime = argv, ""
    if kind == "unix":
        runtime = path.rpartition("/")[0]  # its runtime directory, as argv writes it
        inner = tuple(w.replace(runtime, CONTAINER_RUNTIME) for w in argv)
    return Container(
        name=container_name(spec.name), image=spec.image, argv=inner,
        network="none" if offline else "host", pull=str(spec.pull),
        pull_timeout=spec.pull_timeout,
        devices=tuple(f"{CDI_KIND}={uuid}" for uuid in gpu_uuids), volumes=spec.volumes,
        env_names=env_names, runtime=runtime, confined=spec.hardening,
        # its privileged private port (no local user can squat it while the server
        # is down); with it the server could bind any privileged port: the Landlock
        # guard of servers on the host is not applied in containers
        cap_add=("NET_BIND_SERVICE",) if spec.hardening and kind == "tcp" and port < 1024
        else (),
        shm_size=spec.shm_size, ipc=str(spec.ipc), workdir=spec.working_directory or "",
        extra=tuple(spec.podman_args))
