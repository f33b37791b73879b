"""Containers offline (issue 21): the spec rules, the podman run the plan makes,
the rlimit wrapper, the explicit pull (progress, its own deadline) against a
stand-in podman, and the CDI check."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import pytest

from tests.helpers import GOLDEN_CTX, write_spec
from unitgen.errors import SpecError
from unitgen.features.container import podman
from unitgen.inunit.cgroupowner import unit_of_cgroup
from unitgen.inunit.podrun import with_limits
from unitgen.ops.systemd.specs import render_spec
from unitgen.plan.container import Container
from unitgen.plan.gpus import Placement
from unitgen.plan.instance import resolve
from unitgen.plan.record import parse_record
from unitgen.spec.model import parse_spec
from unitgen.targets.podman import run_words

VLLM = 'name = "c1"\nbackend = "vllm"\nmodel = "org/m"\nimage = "vllm/vllm-openai:v0.11.0"\n'


def problems(text: str) -> list[str]:
    with pytest.raises(SpecError) as err:
        resolve(parse_spec(text, "c.toml"))
    return [f"{p.key}: {p.message}" for p in err.value.problems]


def test_container_keys_without_image_are_refused_with_the_key():
    with pytest.raises(SpecError) as err:
        parse_spec('name = "c"\nbackend = "vllm"\nmodel = "m"\nvolumes = ["/a:/b"]\n'
                   'pull = "never"\n', "c.toml")
    keys = sorted(p.key for p in err.value.problems)
    assert keys == ["pull", "volumes"]
    assert all("needs image" in p.message for p in err.value.problems)


def test_image_refuses_user_and_a_malformed_volume():
    with pytest.raises(SpecError) as err:
        parse_spec(VLLM + 'user = "models"\nvolumes = ["relative:/x", "/a:/b:rx"]\n', "c.toml")
    keys = sorted(p.key for p in err.value.problems)
    assert keys == ["user", "volumes[0]", "volumes[1]"]
    with pytest.raises(SpecError) as err:
        parse_spec(VLLM.replace("vllm/vllm-openai:v0.11.0", "--privileged"), "c.toml")
    assert err.value.problems[0].key == "image"


@pytest.mark.parametrize("word", ["--network=host", "-p", "-p8000:8000", "--privileged",
                                  "--env=KEY=v", "--ulimit", "--name=x", "--entrypoint=sh",
                                  "--device=nvidia.com/gpu=all"])
def test_podman_args_that_unitgen_owns_are_refused(word):
    found = problems(VLLM + f'podman_args = ["{word}"]\n')
    assert found and found[0].startswith("podman_args[0]: "), found


def test_the_plan_wraps_the_same_server_in_podman_run():
    inst = resolve(parse_spec(VLLM + 'volumes = ["/srv/hf:/hf:ro"]\n'
                              'env = { HF_HOME = "/hf" }\nargs = ["--api-key", "k"]\n', "c.toml"),
                   placement=Placement(uuids=("GPU-1",), minors=None, share=False, notices=()))
    c = inst.container
    assert c is not None
    # the proxy and the probe reach the host path; the server is told the bound one
    assert inst.private is not None and inst.private.kind == "unix"
    at = c.argv.index("--uds")
    assert c.argv[at:at + 2] == ("--uds", "/run/unitgen/http.sock")
    words = run_words(c)
    assert f"--volume={inst.private.path.rpartition('/')[0]}:/run/unitgen" in words
    assert "--network=none" not in words  # a hub model id needs the network
    assert "--network=host" in words
    # values stay out of argv: the variables are passed by name
    assert "--env=HF_HOME" in words and "--env=VLLM_API_KEY" in words
    assert not [o for o in words if o.rpartition("=")[2] == "k"]
    assert "--device=nvidia.com/gpu=GPU-1" in words
    assert "--pull=never" in words and "--cgroups=split" in words
    assert words[words.index("--entrypoint") + 1:words.index("--entrypoint") + 4] == (
        "vllm", "vllm/vllm-openai:v0.11.0", "serve")


def test_no_network_where_the_model_is_on_disk_and_the_socket_is_unix():
    local = resolve(parse_spec(VLLM.replace('"org/m"', '"/models/m"'), "c.toml"))
    assert local.container is not None and local.container.network == "none"
    tcp = resolve(parse_spec(VLLM.replace('"vllm"', '"sglang"').replace('"org/m"', '"/m"'),
                             "c.toml"))
    assert tcp.container is not None and tcp.container.network == "host"


def test_the_rlimit_wrapper_passes_the_units_limits_after_run():
    argv = with_limits(["/usr/bin/podman", "run", "--rm", "img"])
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert argv[:2] == ["/usr/bin/podman", "run"] and argv[-2:] == ["--rm", "img"]
    assert f"--ulimit=nofile={hard}:{hard}" in argv
    nproc = [w for w in argv if w.startswith("--ulimit=nproc=")]
    assert nproc and int(nproc[0].rsplit(":", 1)[1]) <= 32768


def fake_podman(directory: Path, body: str) -> str:
    exe = directory / "podman"
    exe.write_text(f"#!/bin/sh\n{body}\n")
    exe.chmod(0o755)
    return str(exe)


def test_pull_shows_progress_and_keeps_its_own_deadline(tmp_path):
    said: list[str] = []
    ok = fake_podman(tmp_path, 'echo "Copying blob 1/2"; echo "Copying blob 2/2"; exit 0')
    assert podman.pull(ok, "img:1", 10, said.append) is None
    assert any("Copying blob 2/2" in s for s in said)
    slow = fake_podman(tmp_path, 'echo "Copying blob"; exec sleep 30')
    t0 = time.monotonic()
    why = podman.pull(slow, "img:1", 0.5, said.append)
    assert why is not None and "pull_timeout" in why
    assert time.monotonic() - t0 < 5
    bad = fake_podman(tmp_path, 'echo "Error: initializing source: no such host" >&2; exit 125')
    why = podman.pull(bad, "img:1", 10, said.append)
    assert why is not None and "exit 125" in why and "no such host" in why


def test_deploy_pulls_only_missing_images_and_a_dry_run_only_says_so(tmp_path):
    log = tmp_path / "calls"
    exe = fake_podman(tmp_path, f'echo "$@" >> {log}\n[ "$1" = image ] && exit 1\nexit 0')
    inst = resolve(parse_spec(VLLM, "c.toml"))
    said: list[str] = []
    assert podman.pull_missing([inst], exe, said.append, dry_run=True) == []
    assert "pull" not in log.read_text().split()
    assert said == ["c1: would pull vllm/vllm-openai:v0.11.0 (not on this host)"]
    assert podman.pull_missing([inst, inst], exe, said.append, dry_run=False) == []
    assert log.read_text().count("pull vllm/vllm-openai:v0.11.0") == 1


def test_a_gpu_without_a_cdi_spec_is_refused_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv(podman.CDI_DIRS_ENV, str(tmp_path))
    exe = fake_podman(tmp_path, "exit 0")
    inst = resolve(parse_spec(VLLM, "c.toml"),
                   placement=Placement(uuids=("GPU-abc",), minors=None, share=False, notices=()))
    [found] = podman.spec_problems(inst, exe)
    assert found.key == "gpus" and "nvidia-ctk cdi generate" in found.message
    (tmp_path / "nvidia.yaml").write_text("kind: nvidia.com/gpu\ndevices:\n  - name: GPU-abc\n")
    assert podman.spec_problems(inst, exe) == []
    assert podman.spec_problems(inst, str(tmp_path / "absent"))[0].message.startswith(
        f"{tmp_path}/absent is not there")


def test_the_unit_stops_and_removes_its_container(tmp_path):
    done = render_spec(write_spec(tmp_path, "c1", VLLM), GOLDEN_CTX)
    backend = next(f.text for f in done.files if f.name == "c1-backend.service")
    assert "ExecStop=/usr/bin/podman stop --ignore --time=50 unitgen-c1\n" in backend
    assert "ExecStopPost=-/usr/bin/podman rm --force --ignore --time=0 unitgen-c1\n" in backend
    record = parse_record(backend)
    assert record is not None
    assert (record.container, record.image) == ("unitgen-c1", "vllm/vllm-openai:v0.11.0")
    assert "\nDynamicUser=" not in backend  # podman needs root


def test_a_containers_gpu_processes_are_its_instances():
    """The container's processes are in a sub-cgroup of the unit (--cgroups=split):
    the GPU wait, status and `unitgen gpus` count them as the instance's."""
    payload = "/system.slice/qwen2-backend.service/libpod-payload-" + "a" * 64
    assert unit_of_cgroup(f"9:name=systemd:{payload}\n") == ("qwen2", "system")
    user = ("/user.slice/user-1000.slice/user@1000.service/app.slice/"
            "qwen2-backend.service/libpod-payload-b")
    assert unit_of_cgroup(f"0::{user}\n") == ("qwen2", "user@1000")


def test_doctor_says_what_podman_says_of_the_container(tmp_path, monkeypatch):
    monkeypatch.setenv(podman.CDI_DIRS_ENV, str(tmp_path))
    # image missing, a container left over while the unit is not active
    exe = fake_podman(tmp_path, '[ "$1" = image ] && exit 1\n'
                                '[ "$1" = container ] && { echo exited; exit 0; }\nexit 0')
    found = podman.container_findings(exe, "unitgen-c1", "img:1", ("GPU-x",), False)
    texts = [(f.ok, f.text) for f in found]
    assert (False, 'image img:1 is not on this host: deploy again (it pulls when pull = '
                   '"missing") or podman pull img:1') in texts
    assert any(not ok and "a leftover; podman rm -f unitgen-c1" in t for ok, t in texts)
    assert any(not ok and "nvidia-ctk cdi generate" in t for ok, t in texts)
    [missing] = podman.container_findings(str(tmp_path / "none"), "unitgen-c1", "img:1", (),
                                          True)
    assert not missing.ok and "apt-get install podman runc" in missing.text


@pytest.mark.parametrize("words", [
    ["-qd"], ["-qeHF_TOKEN=x"], ["-qp80:80"],  # bundled short options
    ["--device", "nvidia.com/gpu=all"], ["--device=/dev/sda"], ["--gpus=all"],
    ["--pull=always"], ["--cap-add=ALL"], ["--security-opt=seccomp=unconfined"],
    ["--pid=host"], ["--mount=type=bind,src=/,dst=/h"], ["-v", "/:/h"], ["--volume=/:/h"],
    ["--root=/elsewhere"], ["--runtime=/bin/sh"], ["--userns=host"], ["--env-host"],
    ["alpine"],  # a word that is no option would become the image
    ["--read-only=/x"], ["--memory"],  # a value where none goes; none where one must
])
def test_podman_args_pass_only_the_allowed_options(words):
    found = problems(VLLM + f"podman_args = {json.dumps(words)}\n")
    assert found and found[0].startswith("podman_args["), found


def _planned(text: str) -> Container:
    container = resolve(parse_spec(text, "c.toml")).container
    assert container is not None
    return container


def test_allowed_podman_args_pass_in_both_spellings():
    words = ("--memory", "8g", "--tmpfs=/scratch", "-u", "1000", "--read-only", "--label=team=ml")
    # as written, last: after unitgen's own options, before the image
    c = _planned(VLLM + f"podman_args = {json.dumps(words)}\n")
    run = run_words(c)
    at = run.index("--entrypoint")
    assert c.extra == words and run[at - len(words):at] == words


def test_podman_args_and_volumes_reach_the_unit(tmp_path):
    text = (VLLM + 'podman_args = ["--memory", "8g", "--read-only", "--label=team=ml"]\n'
            'volumes = ["/srv/hf:/hf:ro", "/srv/out:/out"]\n')
    done = render_spec(write_spec(tmp_path, "c1", text), GOLDEN_CTX)
    backend = next(f.text for f in done.files if f.name == "c1-backend.service")
    [start] = [ln for ln in backend.splitlines() if ln.startswith("ExecStart=")]
    assert " --memory 8g --read-only --label=team=ml --entrypoint vllm " in start, start
    # the binds go to the wrapper, which walks each source before it hands them to podman
    assert (" -m unitgen.inunit.podrun --volume=/srv/hf:/hf:ro --volume=/srv/out:/out -- "
            "/usr/bin/podman run ") in start, start


@pytest.mark.parametrize("volume", ["/:/host", "/etc:/e:ro", "/run/podman/podman.sock:/s",
                                    "/etc/unitgen/secrets:/s:ro", "/srv/../proc:/p:ro",
                                    "/var:/v:ro", "/usr:/usr",
                                    # a leading // is / on Linux (normpath keeps it)
                                    "//etc:/x", "//root:/r:ro", "//run/dbus:/d:ro",
                                    "//usr/lib:/l"])
def test_binds_that_hand_over_the_host_are_refused(volume):
    found = problems(VLLM + f'volumes = ["{volume}"]\n')
    assert found and found[0].startswith("volumes[0]: "), found


def test_model_and_read_only_system_binds_pass():
    binds = ("/srv/models:/models:ro", "/usr:/usr:ro", "/var/lib/models:/m:ro",
             "/home/me/.cache/huggingface:/root/.cache/huggingface")
    container = _planned(VLLM + f"volumes = {json.dumps(binds)}\n")
    assert container.volumes == binds
    assert not [o for o in run_words(container) if o.startswith("--volume=/srv")]
