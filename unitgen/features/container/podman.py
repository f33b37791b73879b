"""Talking to podman for instances with ``image =`` (docs/containers.md): is it
installed, is the image here, pulling it (explicitly, with progress and a
deadline of its own), the CDI specs for GPUs, and removing a container.
Target-neutral: the systemd target's deploy, remove and doctor call it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from unitgen.errors import Problem
from unitgen.inunit.binds import why_not
from unitgen.inunit.volumes import split_volume
from unitgen.ops.findings import Finding
from unitgen.plan.container import CDI_KIND
from unitgen.plan.instance import Instance

__all__ = ["CDI_DIRS_ENV", "cdi_missing", "container_findings", "container_state",
           "find_podman", "host_podman", "image_present", "pull", "pull_missing", "remove_container",
           "spec_problems"]

# Where podman reads CDI specs (containers.conf's default cdi_spec_dirs); the
# tests point this at a directory of their own.
CDI_DIRS_ENV = "UNITGEN_CDI_DIRS"
_CDI_DIRS = ("/etc/cdi", "/var/run/cdi")
INSTALL_HINT = "install it (Debian: apt-get install podman runc)"
CDI_HINT = "generate one: nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml"


def find_podman(podman: str) -> str | None:
    """The podman the units name, if it is there (an absolute path or a bare name)."""
    if podman.startswith("/"):
        return podman if os.access(podman, os.X_OK) else None
    return shutil.which(podman)


def _podman(podman: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """podman's answer; a podman that is missing or hangs answers 127 / 124."""
    try:
        return subprocess.run([podman, *args], capture_output=True, text=True, timeout=timeout,
                              check=False)
    except OSError as exc:
        return subprocess.CompletedProcess([podman, *args], 127, "", str(exc))
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess([podman, *args], 124, "", f"no answer in {timeout} s")


def image_present(podman: str, image: str) -> bool:
    """``podman image exists``: the image is in local storage."""
    return _podman(podman, "image", "exists", image).returncode == 0


def container_state(podman: str, name: str) -> str | None:
    """The container's state (running, exited, ...), None when there is none."""
    done = _podman(podman, "container", "inspect", "--format", "{{.State.Status}}", name)
    return done.stdout.strip() or None if done.returncode == 0 else None


def remove_container(podman: str, name: str) -> bool:
    """Remove the container whatever its state; True when one was there."""
    present = container_state(podman, name) is not None
    _podman(podman, "rm", "--force", "--ignore", "--time=0", name, timeout=120)
    return present


def pull(podman: str, image: str, timeout: float, say: Callable[[str], None]) -> str | None:
    """Pull ``image``, saying podman's progress lines, within ``timeout`` seconds;
    None when done, else why not (the pull is stopped at its deadline)."""
    t0 = time.monotonic()
    proc = subprocess.Popen([podman, "pull", image], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    last: list[str] = []

    def read() -> None:
        assert proc.stdout is not None  # noqa: S101 - a pipe was asked for
        for line in proc.stdout:
            if line.strip():
                last[:] = [line.strip()]
                say(f"pull {image}: {line.strip()[:160]}")

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return f"podman pull {image} did not finish within {timeout:g} s (pull_timeout)"
    reader.join(5)
    if rc != 0:
        return f"podman pull {image} failed (exit {rc}): {last[0] if last else 'no output'}"
    say(f"pull {image}: done in {time.monotonic() - t0:.1f} s")
    return None


def _cdi_texts() -> list[str]:
    dirs = os.environ.get(CDI_DIRS_ENV)
    texts = []
    for d in dirs.split(":") if dirs else _CDI_DIRS:
        directory = Path(d)
        if not directory.is_dir():
            continue
        for path in sorted(directory.iterdir()):
            if path.suffix in (".yaml", ".yml", ".json"):
                try:
                    texts.append(path.read_text(encoding="utf-8", errors="replace"))
                except OSError:
                    continue
    return texts


def cdi_missing(uuids: tuple[str, ...]) -> list[str]:
    """The GPUs no CDI spec names as an ``nvidia.com/gpu`` device. (The spec's
    text is searched, not parsed: YAML has no reader in the standard library, and
    nvidia-ctk writes each device's name on a line of its own.)"""
    texts = [t for t in _cdi_texts() if CDI_KIND in t]
    return [u for u in uuids if not any(u in t for t in texts)]


def spec_problems(inst: Instance, podman: str) -> list[Problem]:
    """What keeps an instance's container from starting on this host, before
    anything is written: podman, the image when it may not be pulled, the CDI
    devices, a bind source every start would refuse (the same walk)."""
    c = inst.container
    if c is None:
        return []
    source = inst.spec.source
    if find_podman(podman) is None:
        return [Problem(source, "image", f"{podman} is not there: containers need podman; "
                                         + INSTALL_HINT)]
    out = []
    if c.pull == "never" and not image_present(podman, c.image):
        out.append(Problem(source, "image", f"{c.image} is not on this host and pull = "
                                            f"\"never\": podman pull {c.image} (or podman load), "
                                            "or set pull = \"missing\""))
    for i, volume in enumerate(c.volumes):
        host, _, mode = split_volume(volume)
        why = why_not(host, mode)
        if why:
            out.append(Problem(source, f"volumes[{i}]", f"{volume!r}: {why}"))
    missing = cdi_missing(inst.gpus.uuids if inst.gpus else ())
    if missing:
        out.append(Problem(source, "gpus", f"no CDI spec on this host names {', '.join(missing)} "
                                           f"as a {CDI_KIND} device, so podman cannot give it to "
                                           f"the container; {CDI_HINT}"))
    return out


def container_findings(podman: str, name: str, image: str, gpus: tuple[str, ...],
                       server_active: bool) -> list[Finding]:
    """What doctor says of an instance's container."""
    if find_podman(podman) is None:
        return [Finding(False, f"{podman} is not there: the instance runs from image {image}; "
                               + INSTALL_HINT)]
    out = []
    if image_present(podman, image):
        out.append(Finding(True, f"image {image} is on this host"))
    else:
        out.append(Finding(False, f"image {image} is not on this host: deploy again (it pulls "
                                  f"when pull = \"missing\") or podman pull {image}"))
    state = container_state(podman, name)
    if server_active and state != "running":
        out.append(Finding(False, f"the server unit is active but container {name} is "
                                  f"{state or 'not there'}: restart the instance"))
    elif not server_active and state is not None:
        out.append(Finding(False, f"container {name} is {state} while its unit is not active: "
                                  f"a leftover; podman rm -f {name}"))
    else:
        out.append(Finding(True, f"container {name} is {state or 'not there'}, as its unit says"))
    missing = cdi_missing(gpus)
    if missing:
        out.append(Finding(False, f"no CDI spec names {', '.join(missing)}: the container "
                                  f"cannot start with its GPUs; {CDI_HINT}"))
    return out


def host_podman() -> str:
    """The podman this host's units run (as :class:`RenderContext` finds it)."""
    return shutil.which("podman") or "/usr/bin/podman"


def pull_missing(insts: list[Instance], podman: str, say: Callable[[str], None], *,
                 dry_run: bool) -> list[Problem]:
    """Pull each missing image of ``insts`` once (pull = "missing"); a dry run only
    says which it would pull. Problems name the spec's ``image`` key."""
    out: list[Problem] = []
    done: set[str] = set()
    for inst in insts:
        c = inst.container
        if c is None or c.pull != "missing" or c.image in done:
            continue
        done.add(c.image)
        if image_present(podman, c.image):
            continue
        if dry_run:
            say(f"{inst.name}: would pull {c.image} (not on this host)")
            continue
        say(f"{inst.name}: pulling {c.image} (at most {c.pull_timeout:g} s, pull_timeout)")
        why = pull(podman, c.image, c.pull_timeout, say)
        if why:
            out.append(Problem(inst.spec.source, "image", why))
    return out
