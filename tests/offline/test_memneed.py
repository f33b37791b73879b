"""A GPU pool member's memory need (issue 27), each source in its turn:
declared, the backend's own arguments, measured at its last load (the record
kept across restarts), estimated (a GGUF's size and KV cache); and deploy's
check that every member can fit."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.gguf import ARRAY, STRING, U32, llama_keys, write_gguf
from tests.nvml import GIB, eight_gpus, fake_nvml, uuid
from tests.offline.test_gpu_managers import sleepers, user_cgroups
from unitgen.errors import SpecError
from unitgen.inunit.gpuneed import Need, NeedSource
from unitgen.inunit.memrecord import Measured, main, measure, read_measured, record_path, write_measured
from unitgen.inunit.nvml import Gpu, GpuProcess
from unitgen.plan.gguf import MAX_HEADER_BYTES, read_gguf
from unitgen.plan.memneed import OVERHEAD, SIZE_FACTOR, fingerprint, memory_need
from unitgen.plan.poolcheck import PoolMember, pool_problems
from unitgen.spec.model import InstanceSpec, parse_spec

__all__ = ["fake_nvml", "sleepers", "user_cgroups"]  # fixtures, re-exported for pytest


def spec(backend: str, extra: str = "", model: str = "org/model", directory: Path | None = None
         ) -> InstanceSpec:
    source = str((directory or Path("/nonexistent")) / "m.toml")
    return parse_spec(f'name = "m"\nbackend = "{backend}"\nmodel = "{model}"\n{extra}', source)


def test_declared_comes_first():
    need = memory_need(spec("vllm", 'gpus = 1\ngpu_memory = "40GiB"\nargs = ["--gpu-memory-utilization", '
                                    '"0.5"]\n'), measured=Measured("m", (("G", 9),), 0, "f"))
    assert need == Need(NeedSource.DECLARED, bytes=40 * GIB, detail="gpu_memory")


@pytest.mark.parametrize(("args", "fraction", "detail"), [
    ([], 0.9, "--gpu-memory-utilization 0.9, vllm's default"),
    (["--gpu-memory-utilization", "0.5"], 0.5, "--gpu-memory-utilization 0.5"),
    (["--gpu_memory_utilization=0.6"], 0.6, "--gpu_memory_utilization=0.6"),  # vLLM's '_'
    (["--gpu-memory-util", "0.7"], 0.7, "--gpu-memory-util 0.7"),  # argparse's prefix
    (["--gpu-memory-utilization", "0.5", "--gpu-memory-utilization", "0.4"], 0.4,
     "--gpu-memory-utilization 0.4"),  # the last one wins
])
def test_vllm_takes_its_utilization_of_each_gpu(args, fraction, detail):
    need = memory_need(spec("vllm", f"args = {json.dumps(args)}\n"),
                       measured=Measured("m", (("G", 9),), 0, "f"))
    assert need == Need(NeedSource.BACKEND_ARGS, fraction=fraction, detail=detail)
    assert need.on(80 * GIB) == int(fraction * 80 * GIB + 0.999)


def test_sglang_takes_its_static_fraction_and_otherwise_what_was_measured():
    need = memory_need(spec("sglang", 'args = ["--mem-fraction", "0.8"]\n'))
    assert need == Need(NeedSource.BACKEND_ARGS, fraction=0.8, detail="--mem-fraction 0.8")
    bare = spec("sglang")
    record = Measured("m", (("GPU-a", 30 * GIB), ("GPU-b", 31 * GIB)), 1_700_000_000, "f")
    assert memory_need(bare, measured=record) == Need(
        NeedSource.MEASURED, bytes=31 * GIB, detail="its load of 2023-11-14 22:13 UTC")
    assert memory_need(bare) == Need(
        NeedSource.ESTIMATE, fraction=1.0,
        detail="nothing is known before its first load: the whole GPU (gpu_memory says less)")


@pytest.mark.parametrize("value", ["1.5", "0", "abc", "nan"])
def test_a_fraction_the_server_would_refuse_is_a_problem_with_file_and_key(value):
    with pytest.raises(SpecError) as info:
        memory_need(spec("vllm", f'args = ["--gpu-memory-utilization", "{value}"]\n'))
    assert [str(p) for p in info.value.problems] == [
        f"/nonexistent/m.toml: args: --gpu-memory-utilization {value}: the fraction of GPU "
        "memory must be a number above 0 and at most 1"]


# --- the estimate of a GGUF model ---------------------------------------------


def test_a_gguf_model_is_its_size_plus_its_kv_cache_plus_overhead(tmp_path):
    write_gguf(tmp_path / "llama.gguf", llama_keys(ctx=8192), size=4 * GIB)
    facts = read_gguf(tmp_path / "llama.gguf")
    assert facts is not None and (facts.block_count, facts.head_count_kv, facts.key_length) == (
        32, 8, 128)
    kv = 8192 * 32 * 8 * (128 + 128) * 2  # 1 GiB
    need = memory_need(spec("llama-server", model="llama.gguf", directory=tmp_path))
    assert need == Need(NeedSource.ESTIMATE, bytes=4 * GIB + kv + OVERHEAD, detail=(
        "GGUF 4.0 GiB + KV cache 1.0 GiB for 8192 tokens (32 layers, 8 KV heads of 128+128, f16) "
        "+ 1.0 GiB per GPU for CUDA and buffers"))
    # the context it is given; split over its GPUs (llama.cpp splits layers)
    need = memory_need(spec("llama-server", 'args = ["-c", "2048"]\ngpus = 2\n',
                            model=str(tmp_path / "llama.gguf")))
    assert need.bytes == (4 * GIB + kv // 4 + 2 * OVERHEAD) // 2
    assert need.detail.endswith("for CUDA and buffers, split over 2 GPUs")


def test_gguf_without_its_shape_split_models_and_missing_files(tmp_path):
    write_gguf(tmp_path / "odd.gguf", [("general.architecture", STRING, "mamba")], size=GIB)
    need = memory_need(spec("llama-box", model=str(tmp_path / "odd.gguf")))
    assert need == Need(NeedSource.ESTIMATE, bytes=int(GIB * SIZE_FACTOR), detail=(
        "GGUF 1.0 GiB x 1.25: its header does not say its shape"))
    for i in (1, 2, 3):
        write_gguf(tmp_path / f"big-0000{i}-of-00003.gguf",
                   llama_keys(ctx=4096, kv_heads=None) if i == 1 else [], size=2 * GIB)
    need = memory_need(spec("llama-server", model=str(tmp_path / "big-00001-of-00003.gguf")))
    kv = 4096 * 32 * 32 * 256 * 2  # no head_count_kv: every head has its own K and V
    assert need.bytes == 6 * GIB + kv + OVERHEAD
    need = memory_need(spec("llama-server", model=str(tmp_path / "gone.gguf")))
    assert (need.source, need.fraction) == (NeedSource.ESTIMATE, 1.0)
    assert need.detail.startswith(f"model file {tmp_path / 'gone.gguf'} is not here to size")


def test_the_gguf_reader_refuses_what_it_cannot_read(tmp_path):
    assert read_gguf(tmp_path / "none.gguf") is None
    assert read_gguf(write_gguf(tmp_path / "v1.gguf", llama_keys(), version=1)) is None
    (tmp_path / "text.gguf").write_text("not a model")
    assert read_gguf(tmp_path / "text.gguf") is None
    whole = write_gguf(tmp_path / "whole.gguf", llama_keys())
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[:100])
    assert read_gguf(cut) is None
    # the model's keys mean nothing before the architecture is known; a vocabulary
    # before them is read past; an array that claims more than the bound is not
    keys = llama_keys()
    huge = [("tokenizer.ggml.tokens", ARRAY, (STRING, ["x" * 1000] * 1000))]
    assert read_gguf(write_gguf(tmp_path / "late.gguf", huge + keys[1:] + [keys[0]])) is None
    assert read_gguf(write_gguf(tmp_path / "first.gguf", [keys[0], *huge, *keys[1:]])) is not None
    lie = [keys[0], ("tokenizer.ggml.tokens", ARRAY, (U32, []))]
    data = bytearray(write_gguf(tmp_path / "lie.gguf", lie).read_bytes())
    data[-8:] = (MAX_HEADER_BYTES).to_bytes(8, "little")  # an array that claims 256 MiB
    (tmp_path / "lie.gguf").write_bytes(bytes(data))
    assert read_gguf(tmp_path / "lie.gguf") is None


def test_per_layer_head_counts_take_the_largest(tmp_path):
    keys = [k for k in llama_keys() if k[0] != "llama.attention.head_count_kv"]
    keys.insert(6, ("llama.attention.head_count_kv", ARRAY, (U32, [2, 8, 4])))
    facts = read_gguf(write_gguf(tmp_path / "m.gguf", keys))
    assert facts is not None and facts.head_count_kv == 8


def test_the_fingerprint_follows_what_the_memory_depends_on():
    base = fingerprint(spec("vllm"))
    assert fingerprint(spec("vllm", "port = 9000\n")) == base
    assert fingerprint(spec("vllm", 'args = ["--max-model-len", "4096"]\n')) != base
    assert fingerprint(spec("vllm", model="org/other")) != base
    assert fingerprint(spec("vllm", "gpus = 2\n")) != base


# --- measured: the record kept across restarts -------------------------------


def test_the_record_round_trips_and_is_written_whole(tmp_path):
    m = Measured("qwen2", (("GPU-a", 30 * GIB), ("GPU-b", 29 * GIB)), 1_700_000_000.5, "abc")
    path = write_measured(tmp_path, m)
    assert path == tmp_path / "unitgen" / "gpu-memory" / "qwen2.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["qwen2.json"]  # no temporary left
    assert read_measured(tmp_path, "qwen2", "abc") == m and m.peak == 30 * GIB
    assert read_measured(tmp_path, "qwen2", "another spec") is None
    assert read_measured(tmp_path, "other", "abc") is None
    with pytest.raises(ValueError, match="not an instance name"):
        record_path(tmp_path, "../etc/passwd")


@pytest.mark.parametrize("text", [
    "{", "[]", '{"format": 2, "instance": "q", "at": 1, "fingerprint": "f", "gpus": {"G": 1}}',
    '{"format": 1, "instance": "q", "at": 1, "fingerprint": "f", "gpus": {}}',
    '{"format": 1, "instance": "q", "at": 1, "fingerprint": "f", "gpus": {"G": -1}}',
    '{"format": 1, "instance": "q", "at": 1, "fingerprint": "f", "gpus": ["G"]}',
    '{"format": 1, "instance": "q", "at": "x", "fingerprint": "f", "gpus": {"G": 1}}',
    '{"format": 1, "instance": "z", "at": 1, "fingerprint": "f", "gpus": {"G": 1}}',
])
def test_a_bad_record_is_no_record(tmp_path, text):
    path = record_path(tmp_path, "q")
    path.parent.mkdir(parents=True)
    path.write_text(text)
    assert read_measured(tmp_path, "q", "f") is None


def test_measure_counts_only_the_instances_own_processes():
    procs = (GpuProcess(10, 20 * GIB, "q", True, "system"), GpuProcess(11, 5 * GIB, "q", True,
                                                                        "system"),
             GpuProcess(12, 7 * GIB, "q", True, "user@1000"), GpuProcess(13, GIB, None))
    gpus = [Gpu(0, "GPU-a", "H100", 0, 80 * GIB, 33 * GIB, 47 * GIB, procs),
            Gpu(1, "GPU-b", "H100", 1, 80 * GIB, 0, 80 * GIB)]
    got = measure(gpus, "q", "system", {"GPU-a", "GPU-b"}, "f", 5.0)
    assert got == Measured("q", (("GPU-a", 25 * GIB), ("GPU-b", 0)), 5.0, "f")
    assert measure(gpus, "q", "system", {"GPU-b"}, "f", 5.0) is None


def test_the_recorder_never_fails_the_start(fake_nvml, tmp_path, capsys):
    fake_nvml(eight_gpus())  # nobody's process on the GPU
    assert main(["--instance", "q", "--gpus", uuid(0), "--state-dir", str(tmp_path),
                 "--fingerprint", "f"]) == 0
    assert "not measured: NVML shows no process of this instance" in capsys.readouterr().err
    assert not (tmp_path / "unitgen").exists()


def test_the_recorder_in_a_units_cgroup_writes_what_its_processes_hold(
        fake_nvml, user_cgroups, sleepers, tmp_path):
    fake_nvml(eight_gpus(processes={0: [{"pid": sleepers[1000], "used": 12 * GIB}],
                                    1: [{"pid": sleepers[1001], "used": 30 * GIB}]}))
    script = 'echo $$ > "$1" && shift && exec "$@"'
    done = subprocess.run(
        ["sh", "-c", script, "sh", str(user_cgroups[1000]), sys.executable, "-m",
         "unitgen.inunit.memrecord", "--instance", "qwen2", "--gpus", f"{uuid(0)},{uuid(1)}",
         "--state-dir", str(tmp_path), "--fingerprint", "f"],
        capture_output=True, text=True, timeout=60, env=os.environ.copy(), check=True)
    assert "gpu memory: 12.0 GiB per GPU at its peak, recorded in" in done.stderr
    got = read_measured(tmp_path, "qwen2", "f")
    assert got is not None and got.per_gpu == ((uuid(0), 12 * GIB), (uuid(1), 0))


# --- deploy's check: every member can fit -------------------------------------

G0, G1 = "GPU-a", "GPU-b"
TOTALS = {G0: 80 * GIB, G1: 80 * GIB}


def member(name: str, need: Need, *, gpus: tuple[str, ...] = (G0,), always_on: bool = False
           ) -> PoolMember:
    return PoolMember(f"{name}.toml", name, gpus, need, always_on)


def test_a_member_that_cannot_fit_even_alone_is_refused_with_its_key():
    big = member("big", Need(NeedSource.DECLARED, bytes=90 * GIB), gpus=(G0, G1))
    ok = member("ok", Need(NeedSource.BACKEND_ARGS, fraction=0.9, detail="--gpu-memory-utilization 0.9"))
    assert [str(p) for p in pool_problems([big, ok], TOTALS)] == [
        "big.toml: gpu_memory: needs 90.0 GiB on GPU GPU-a (90.0 GiB per GPU (declared)), more "
        "than the 80.0 GiB it has: it cannot run even alone",
        "big.toml: gpu_memory: needs 90.0 GiB on GPU GPU-b (90.0 GiB per GPU (declared)), more "
        "than the 80.0 GiB it has: it cannot run even alone"]
    outside = pool_problems([ok], TOTALS, outside={G0: 20 * GIB})
    assert [str(p) for p in outside] == [
        "ok.toml: args: needs 72.0 GiB on GPU GPU-a (0.9 of each GPU (backend-args: "
        "--gpu-memory-utilization 0.9)), more than the 60.0 GiB it has (20.0 GiB of it held by "
        "processes outside the pool): it cannot run even alone"]
    assert pool_problems([big], {}) == []  # GPU sizes unknown here: not checked


def test_always_on_members_that_leave_a_member_no_room():
    a = member("a", Need(NeedSource.DECLARED, bytes=30 * GIB), always_on=True)
    b = member("b", Need(NeedSource.MEASURED, bytes=30 * GIB, detail="x"), always_on=True)
    c = member("c", Need(NeedSource.ESTIMATE, bytes=25 * GIB, detail="y"))
    d = member("d", Need(NeedSource.DECLARED, bytes=20 * GIB))
    e = member("e", Need(NeedSource.DECLARED, bytes=60 * GIB), gpus=(G1,))
    assert [str(p) for p in pool_problems([a, b, c, d, e], TOTALS)] == [
        "c.toml: gpus: needs 25.0 GiB on GPU GPU-a (25.0 GiB per GPU (estimate: y)) but the "
        "always-on a (a.toml), b (b.toml) hold 60.0 GiB of its 80.0 GiB: it could never load"]
    f = member("f", Need(NeedSource.DECLARED, bytes=30 * GIB), always_on=True)
    problems = [str(p) for p in pool_problems([a, b, f], TOTALS)]
    assert len(problems) == 3 and problems[0] == (
        "a.toml: gpu_memory: needs 30.0 GiB on GPU GPU-a (30.0 GiB per GPU (declared)) but the "
        "always-on b (b.toml), f (f.toml) hold 60.0 GiB of its 80.0 GiB: they cannot all be "
        "loaded")
