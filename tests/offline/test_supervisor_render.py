"""The supervisor target's conf files: what supervisord cannot do is refused
with file and key; what it can do reads back, through supervisor's own parser,
as exactly the argv and environment the plan resolved."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from tests.helpers import write_spec
from tests.nvml import eight_gpus, fake_nvml, uuid
from tests.supervisor_readback import read_back
from unitgen.errors import SpecError
from unitgen.ops.files import is_ours
from unitgen.ops.pipeline import placement_for
from unitgen.plan.instance import RUNTIME_DIR, resolve
from unitgen.spec.model import load_spec
from unitgen.targets.supervisor.render import SupervisorContext, render_instance

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CTX = SupervisorContext(python="/usr/bin/python3", proxyd="/usr/lib/systemd/systemd-socket-proxyd",
                        run_dir="/run/unitgen", log_dir=tempfile.gettempdir(),  # supervisor checks it exists
                        secrets_dir="/etc/unitgen/secrets")
__all__ = ["fake_nvml"]  # the fixture, re-exported for pytest
SUPPORTED = ["qwen2-vllm", "custom-socket-activated", "custom-tcp", "demo", "llama-box",
             "llama-server-1gpu", "vllm-2gpu"]


def _render(path: Path):
    inst = resolve(load_spec(path))
    return inst, render_instance(inst, CTX)


@pytest.mark.parametrize("example", SUPPORTED)
def test_examples_read_back_as_resolved(example):
    inst, files = _render(EXAMPLES / f"{example}.toml")
    conf = files[0]
    assert conf.name == f"unitgen-{inst.name}.conf"
    programs = {p.group: p for p in read_back(conf.text)}
    assert set(programs) == {inst.name, f"{inst.name}-backend"}
    server = programs[f"{inst.name}-backend"]
    argv = server.argv[server.argv.index("--") + 1:] if "--" in server.argv else server.argv
    assert argv == [w.replace(RUNTIME_DIR, "/run/unitgen") for w in inst.argv]
    assert server.environment == dict(inst.env)
    public = programs[inst.name]
    assert public.fcgi_socket == f"tcp://{inst.public.listen()}"
    if inst.uses_proxy:
        assert public.argv[-1] == inst.private.listen().replace(RUNTIME_DIR, "/run/unitgen")
        assert public.argv[-3].endswith("systemd-socket-proxyd")
    else:
        hold = public.argv[public.argv.index("--serve") + 1]
        assert server.argv[server.argv.index("--fd3-from") + 1] == hold


def test_marker_makes_files_ours(tmp_path):
    inst, files = _render(EXAMPLES / "demo.toml")
    path = tmp_path / files[0].name
    path.write_text(files[0].text)
    assert is_ours(path, inst.name)
    assert not is_ours(path, "other")


@pytest.mark.parametrize(("extra", "key", "words"), [
    ('activation = "on-demand"\n', "activation", "first connection"),
    ('activation = "on-demand"\nidle_stop = "5min"\n', "idle_stop", "when idle"),
    ('[systemd.service]\nNice = "5"\n', "systemd.service.Nice", "systemd directive"),
    ('group = "video"\n', "group", "no group setting"),
    ('host = "::1"\n', "host", "IPv4 only"),
])
def test_refused_with_file_and_key(tmp_path, extra, key, words):
    text = 'name = "x"\nbackend = "vllm"\nmodel = "m"\nport = 8000\n' + extra
    spec = write_spec(tmp_path, "x", text)
    with pytest.raises(SpecError) as err:
        _render(spec)
    hits = [p for p in err.value.problems if p.key == key]
    assert hits, err.value.problems
    assert hits[0].file == str(spec) and words in hits[0].message


def test_unrepresentable_env_names_the_key(tmp_path):
    spec = write_spec(tmp_path, "x", 'name = "x"\nbackend = "vllm"\nmodel = "m"\n'
                                     'env = { GOOD = "a b", BAD = "\\"quoted\\"" }\n')
    with pytest.raises(SpecError) as err:
        _render(spec)
    assert [p.key for p in err.value.problems] == ["env.BAD"]


def test_api_key_stays_out_of_the_conf_file(tmp_path):
    spec = write_spec(tmp_path, "x", 'name = "x"\nbackend = "vllm"\nmodel = "m"\n'
                                     'args = ["--api-key", "sk-secret-123"]\n')
    _, files = _render(spec)
    conf, secret = files
    assert "sk-secret-123" not in conf.text
    assert secret.secret and secret.text == "VLLM_API_KEY=sk-secret-123\n"
    programs = {p.group: p for p in read_back(conf.text)}
    assert "--env-file" in programs["x-backend"].argv
    assert "sk-secret-123" not in " ".join(programs["x-backend"].argv)
    assert programs["x"].argv[programs["x"].argv.index("--key-env") + 1] == "VLLM_API_KEY"


def test_gpu_pinning_as_systemd(fake_nvml):
    """The placement's CUDA_VISIBLE_DEVICES (UUIDs) and defaults reach the server."""
    fake_nvml(eight_gpus())
    spec = load_spec(EXAMPLES / "vllm-2gpu.toml")
    placement = placement_for(spec)
    assert placement is not None
    inst = resolve(spec, placement=placement)
    [server] = [p for p in read_back(render_instance(inst, CTX)[0].text)
                if p.group.endswith("-backend")]
    uuids = ",".join(placement.uuids)
    assert uuids == f"{uuid(0)},{uuid(1)}"
    assert server.environment["CUDA_VISIBLE_DEVICES"] == uuids
    assert server.environment["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert server.argv[-2:] == ["--tensor-parallel-size", "2"]
    assert f"# unitgen-gpus: {uuids} exclusive" in render_instance(inst, CTX)[0].text
