"""The walk of a container's bind sources that every start runs as root
(``unitgen.inunit.binds``, docs/containers.md): which paths a user other than
root could swap after the check, on real directories made here. The attack
itself, with a real attacker and real podman, is in
tests/live/test_container_binds_live.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from unitgen.inunit import binds
from unitgen.inunit.podrun import checked_volumes, main

NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the walk is root's, "
                                "and the directories are given to uid 65534")


def refusal(path: str, mode: str) -> str:
    why = binds.why_not(path, mode)
    assert why is not None, f"{path} passed"
    return why


@pytest.fixture
def root_dir(tmp_path: Path) -> Path:
    """A directory whose every parent is root's alone (pytest's own, under /tmp)."""
    assert binds.why_not(str(tmp_path), "rw") is None
    return tmp_path


def test_a_users_own_directory_under_roots_directories_may_be_bound(root_dir):
    models = root_dir / "models"
    models.mkdir()
    os.chown(models, NOBODY, NOBODY)
    (models / "link").symlink_to("/etc")  # inside: resolved in the container
    assert binds.why_not(str(models), "rw") is None
    assert binds.why_not(f"/{models}/", "ro") is None  # spelled loosely, judged normalised


def test_a_directory_of_another_user_on_the_way_is_refused(root_dir):
    home = root_dir / "home"
    (home / "hf").mkdir(parents=True)
    os.chown(home, NOBODY, NOBODY)
    assert binds.why_not(str(home / "hf"), "ro") == (
        f"{home} is uid {NOBODY} (nobody)'s: they could put a link at {home}/hf after this "
        "check, and the container (root inside) would get what it points to; bind a path "
        "whose directories are root's alone (e.g. /srv/models/NAME; it may be the user's own "
        "directory)")


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o777])
def test_a_directory_others_may_write_on_the_way_is_refused(root_dir, mode):
    shared = root_dir / "shared"
    (shared / "m").mkdir(parents=True)
    shared.chmod(mode)  # a group's (or an ACL's: its mask shows in the group bits)
    assert refusal(str(shared / "m"), "ro").startswith(
        f"{shared} is writable by users other than root: they could put a link at {shared}/m")


def test_a_sticky_directory_protects_roots_entries_only(root_dir):
    tmp = root_dir / "tmp"
    tmp.mkdir()
    tmp.chmod(0o1777)
    (tmp / "roots").mkdir()
    (tmp / "users").mkdir()
    os.chown(tmp / "users", NOBODY, NOBODY)  # its owner may rename it away
    assert binds.why_not(str(tmp / "roots"), "rw") is None
    assert "is writable by users other than root" in refusal(str(tmp / "users"), "rw")


def test_a_link_on_the_way_is_refused_with_its_target(root_dir):
    (root_dir / "real" / "m").mkdir(parents=True)
    (root_dir / "alias").symlink_to(root_dir / "real")
    assert binds.why_not(str(root_dir / "alias" / "m"), "ro") == (
        f"{root_dir}/alias is a symbolic link (to {root_dir}/real), which podman would follow "
        "at every start wherever it then points; bind the path it points to")
    (root_dir / "last").symlink_to("/root")
    assert "is a symbolic link (to /root)" in refusal(str(root_dir / "last"), "ro")


def test_a_file_with_another_name_is_refused(root_dir):
    (root_dir / "a").write_text("x")
    assert binds.why_not(str(root_dir / "a"), "ro") is None
    os.link(root_dir / "a", root_dir / "b")
    assert binds.why_not(str(root_dir / "a"), "ro") == (
        f"{root_dir}/a has 2 names (hard links), and may be any of them; bind a file with one "
        "name, or its directory")


def test_what_is_missing_or_listed_is_refused(root_dir):
    assert binds.why_not(str(root_dir / "none" / "x"), "ro") == f"{root_dir}/none does not exist"
    (root_dir / "f").write_text("")
    assert binds.why_not(str(root_dir / "f" / "x"), "ro") == f"{root_dir}/f is not a directory"
    assert binds.why_not("//usr/lib", "rw") == ("/usr/lib is a system directory: bind it "
                                                "read-only (HOST:CONTAINER:ro)")
    assert "is or holds /root" in refusal("//root", "ro")


def test_a_directory_on_fuse_is_refused(root_dir, monkeypatch):
    (root_dir / "fs" / "m").mkdir(parents=True)
    fd = os.open(root_dir, os.O_PATH)
    try:
        here = binds._mount_id(fd)
    finally:
        os.close(fd)
    monkeypatch.setattr(binds, "_fuse_mounts", lambda: {here})  # as if tmp were a FUSE mount
    assert refusal(str(root_dir / "fs" / "m"), "ro").endswith(
        "is on a FUSE file system, whose owner answers for what it holds")


def test_the_wrapper_passes_checked_binds_and_refuses_naming_the_volume(root_dir):
    (root_dir / "m").mkdir()
    assert checked_volumes([f"/{root_dir}/./m:/models:ro", f"{root_dir}/m:/w"]) == [
        f"--volume={root_dir}/m:/models:ro", f"--volume={root_dir}/m:/w"]
    (root_dir / "l").symlink_to(root_dir / "m")
    with pytest.raises(SystemExit, match=f"^unitgen podrun: volume {root_dir}/l:/x refused: "
                                         f"{root_dir}/l is a symbolic link"):
        checked_volumes([f"{root_dir}/l:/x"])
    with pytest.raises(SystemExit, match="unknown option '--net=host'"):
        main(["--net=host", "--", "/usr/bin/podman", "run", "img"])
