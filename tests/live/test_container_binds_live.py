"""A container's binds against a local user (security issue 25, High 2), with real
podman and runc under the live tier's manager (root's, so the container's root is
the host's, as under the system manager).

podman resolves a bind's source path at every start, after deploy. The attacker
is uid 65534 holding only what such a user has: a directory on the bound path
that is theirs (or their group's to write). It swaps the bound directory for a
link to a root-only place; after a restart the container must not get that
place. The root-only places are the test's own (a 0700 directory with a secret
file), under a directory every user can reach, removed afterwards."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import wait_for
from tests.live import test_containers_live as pods
from tests.live.test_containers_live import containers, pod_spec, podman
from tests.live.test_operate_live import cli, cli_json

pytestmark = pytest.mark.systemd
# the container tier's fixtures: its image, and its box (which removes containers)
image, box = pods.image, pods.box

NOBODY = 65534  # uid and gid (nogroup)
SECRET = "root-only-secret-7d1f"  # noqa: S105 - a file the attacker must not read


def as_nobody(code: str) -> None:
    """The attacker: ``code`` run as uid 65534, no capability, no supplementary group."""
    done = subprocess.run([sys.executable, "-I", "-c", "import os\n"
                           f"os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})\n"
                           f"{code}\nprint('DONE', os.geteuid())"],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.stdout.strip() == f"DONE {NOBODY}", done.stderr


def swap_as_nobody(path: Path, target: Path) -> None:
    """The attacker renames the bound directory away and puts a link to ``target`` there."""
    as_nobody(f"os.rename({str(path)!r}, {str(path)!r} + '.away'); "
              f"os.symlink({str(target)!r}, {str(path)!r})")
    assert path.is_symlink()


@pytest.fixture
def area() -> Iterator[Path]:
    """/tmp/unitgen-binds-*: root's, 0755 (every user reaches it), holding ``vault``
    (root's, 0700) with a secret file and ``locked`` (root's, 0700, empty)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run the attacker as uid 65534")
    base = Path(tempfile.mkdtemp(prefix="unitgen-binds-", dir="/tmp"))
    try:
        base.chmod(0o755)
        (base / "vault").mkdir(mode=0o700)
        (base / "vault" / "secret").write_text(SECRET)
        (base / "vault" / "secret").chmod(0o600)
        (base / "locked").mkdir(mode=0o700)
        yield base
    finally:
        shutil.rmtree(base)


def in_container(name: str, script: str) -> subprocess.CompletedProcess[str]:
    """``script`` run by root in the instance's container (what its server could do)."""
    return podman("exec", f"unitgen-{name}", "/bin/sh", "-c", script)


def refused(box, name: str, why: str) -> None:
    """The start was refused: no container, the unit not active, and the journal
    names the volume and ``why``."""
    assert containers(f"unitgen-{name}") == []
    assert box.systemctl("is-active", f"{name}-backend.service").stdout.strip() != "active"
    unit = f"{name}-backend.service"
    assert wait_for(lambda: why in box.journal(unit, lines=200), 10), box.journal(unit, lines=200)


def test_a_link_swapped_into_a_bound_path_after_deploy_is_not_followed(box, area, tmp_path):
    home = area / "home"
    home.mkdir(mode=0o755)  # root's at deploy
    models = home / "models"
    models.mkdir()
    (models / "weights").write_text("weights")
    os.chown(models, NOBODY, NOBODY)  # the user's own model directory may be bound
    spec = pod_spec(tmp_path, "pod-bindr", volumes=(f"{models}:/models:ro",))
    rc, data = cli_json(box, "deploy", "--user", str(spec))
    assert rc == 0, data
    assert in_container("pod-bindr", "cat /models/weights").stdout == "weights"

    os.chown(home, NOBODY, NOBODY)  # later, the directory above it becomes the user's
    swap_as_nobody(models, area / "vault")
    box.systemctl("restart", "pod-bindr-backend.service", timeout=90)
    read = in_container("pod-bindr", "cat /models/secret")
    assert SECRET not in read.stdout, "the container read a root-only file through the link"

    refused(box, "pod-bindr", f"unitgen podrun: volume {models}:/models:ro refused: {models} "
                              f"is a symbolic link (to {area / 'vault'})")


def test_a_group_writable_parent_cannot_make_the_container_write_as_root(box, area, tmp_path):
    shared = area / "shared"
    shared.mkdir(mode=0o755)
    cache = shared / "cache"
    cache.mkdir()
    os.chown(cache, NOBODY, NOBODY)
    cache.chmod(0o777)  # the container (root without capabilities) writes there too
    spec = pod_spec(tmp_path, "pod-bindw", volumes=(f"{cache}:/cache",))  # read-write
    rc, data = cli_json(box, "deploy", "--user", str(spec))
    assert rc == 0, data
    assert in_container("pod-bindw", "echo ok > /cache/first").returncode == 0
    assert (cache / "first").read_text() == "ok\n"

    # later the parent is opened to a group of users the attacker is in
    os.chown(shared, 0, NOBODY)
    shared.chmod(0o775)
    swap_as_nobody(cache, area / "locked")
    box.systemctl("restart", "pod-bindw-backend.service", timeout=90)
    in_container("pod-bindw", "echo pwned > /cache/pwned")
    assert not (area / "locked" / "pwned").exists(), "the container wrote into a root-only place"

    refused(box, "pod-bindw", f"volume {cache}:/cache refused: {cache} is a symbolic link")

    # the directory back in place: still refused, for the link could come back
    # between this check and runc's mount (the race a check of links alone leaves)
    as_nobody(f"os.unlink({str(cache)!r}); os.rename({str(cache)!r} + '.away', {str(cache)!r})")
    assert cache.is_dir() and not cache.is_symlink()
    box.systemctl("reset-failed", "pod-bindw-backend.service")
    box.systemctl("restart", "pod-bindw-backend.service", timeout=90)
    refused(box, "pod-bindw", f"volume {cache}:/cache refused: {shared} is writable by users "
                              f"other than root: they could put a link at {cache} after this check")


def test_deploy_refuses_a_bind_a_local_user_could_swap(box, area, tmp_path):
    home = area / "alice"
    home.mkdir()
    (home / "hf").mkdir()
    os.chown(home, NOBODY, NOBODY)  # a home directory: its user may rename what is in it
    link = area / "models"
    link.symlink_to(home / "hf")
    spec = pod_spec(tmp_path, "pod-bindd", volumes=(f"{home}/hf:/hf", f"/{link}:/m:ro"))
    done = cli(box, "deploy", "--user", str(spec))
    assert done.returncode != 0
    assert f"pod-bindd.toml: volumes[2]: '{home}/hf:/hf': {home} is uid {NOBODY} (nobody)'s" \
        in done.stderr, done.stderr
    assert (f"pod-bindd.toml: volumes[3]: '/{link}:/m:ro': {link} is a symbolic link "
            f"(to {home}/hf)") in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not list(box.unit_dir.glob("pod-bindd*"))


# The racing attacker: swaps the directory for a link and back, again and again,
# so that some check finds the directory and podman, moments later, the link.
RACER = r"""
import os, sys, time
os.setgroups([]); os.setgid(65534); os.setuid(65534)
path, target, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
end = time.monotonic() + seconds
while time.monotonic() < end:
    os.rename(path, path + ".away"); os.symlink(target, path); time.sleep(0.003)
    os.unlink(path); os.rename(path + ".away", path); time.sleep(0.001)
"""


def test_a_link_that_comes_and_goes_never_reaches_the_container(box, area, tmp_path):
    """Checking for links alone loses this race (measured: the secret was read
    after 11 of 40 restarts); no start may happen while the user can swap."""
    home = area / "home"
    home.mkdir(mode=0o755)
    models = home / "models"
    models.mkdir()
    os.chown(models, NOBODY, NOBODY)
    spec = pod_spec(tmp_path, "pod-bindrace", volumes=(f"{models}:/models:ro",))
    rc, data = cli_json(box, "deploy", "--user", str(spec))
    assert rc == 0, data
    os.chown(home, NOBODY, NOBODY)
    racer = subprocess.Popen([sys.executable, "-I", "-c", RACER, str(models),
                              str(area / "vault"), "120"])
    try:
        reads = []
        for _ in range(15):
            box.systemctl("reset-failed", "pod-bindrace-backend.service")
            box.systemctl("restart", "pod-bindrace-backend.service", timeout=90)
            reads.append(in_container("pod-bindrace", "cat /models/secret").stdout)
    finally:
        racer.kill()
        racer.wait()
    assert not [r for r in reads if SECRET in r], "the container read the root-only file"
    assert containers("unitgen-pod-bindrace") == []
