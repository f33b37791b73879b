"""A planned container (:class:`unitgen.plan.container.Container`) as the words
of ``podman run``: the one place its typed options become a command line (the
systemd target's server unit runs them; a Quadlet renderer would write the same
fields as a ``.container`` file's keys instead)."""

from __future__ import annotations

from unitgen.plan.container import CONTAINER_RUNTIME, Container

__all__ = ["run_words"]


def run_words(c: Container) -> tuple[str, ...]:
    """Everything after ``podman``: ``run OPTIONS --entrypoint EXE IMAGE ARGS``."""
    options = ["--rm", "--replace", "--name", c.name, "--cgroups=split",
               "--log-driver=passthrough", f"--network={c.network}",
               # deploy pulls (pull = ...); a start never waits on a registry
               "--pull=never"]
    if c.confined:
        # no capabilities (a server needs none), no setuid gains
        options += ["--cap-drop=all", "--security-opt=no-new-privileges"]
    options += [f"--cap-add={cap}" for cap in c.cap_add]
    options += [f"--env={name}" for name in c.env_names]
    if c.runtime:
        options.append(f"--volume={c.runtime}:{CONTAINER_RUNTIME}")
    options += [f"--device={d}" for d in c.devices]
    if c.shm_size is not None:
        options.append(f"--shm-size={c.shm_size}b")
    if c.ipc != "private":
        options.append(f"--ipc={c.ipc}")
    if c.workdir:
        options.append(f"--workdir={c.workdir}")
    options += c.extra
    return ("run", *options, "--entrypoint", c.argv[0], c.image, *c.argv[1:])
