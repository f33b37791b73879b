"""Swap groups on a real systemd user manager (issue 12): members take turns,
no request fails or is cut because of a swap, and the group follows deploy and
remove. Stand-in servers with a load time; states sampled every 50 ms."""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import custom_spec, get, prop, standin_exe, wait_for, write_spec
from unitgen.ops.systemd.sandbox import Sandbox

pytestmark = pytest.mark.systemd

LOAD = "0.3"


def cli(box: Sandbox, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "unitgen", *args],
                          env={**os.environ, **box.env}, capture_output=True, text=True,
                          timeout=timeout)


# Ports of this test run, by instance name. The default ports follow from the
# name, so another run of these tests on the same host (loopback is shared) would
# use the same ones: its clients, left connected or retrying, would then reach
# this run's members and keep them loaded (seen: an idle member that never
# unloads, an unloaded one started again). Random ports outside the ephemeral
# range keep runs apart; a name keeps its ports for the whole run.
_PORTS: dict[str, tuple[int, int]] = {}


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def run_ports(name: str) -> tuple[int, int]:
    """(public, private) ports of instance ``name`` for this test run."""
    if name not in _PORTS:
        taken = {p for pair in _PORTS.values() for p in pair}
        pair = []
        for lo, hi in ((10000, 19999), (20000, 29999)):
            port = random.randint(lo, hi)
            while port in taken or not _bindable(port):
                port = random.randint(lo, hi)
            pair.append(port)
        _PORTS[name] = (pair[0], pair[1])
    return _PORTS[name]


def member(directory: Path, name: str, *, group: str = "g", drain: str = "30s",
           extra: str = "", **env: str) -> Path:
    env = {"STANDIN_LOAD_SECONDS": LOAD, **env}
    public, private = run_ports(name)
    keys = (f'activation = "on-demand"\nswap_group = "{group}"\nswap_drain = "{drain}"\n'
            f"private_port = {private}\n{extra}")
    return write_spec(directory, name, custom_spec(name, port=public, env=env, extra=keys
                                                   + '[health]\ntimeout = "20s"\n'))


def deploy(box: Sandbox, *specs: Path) -> dict[str, int]:
    done = cli(box, "deploy", "--user", "--json", *map(str, specs))
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(done.stdout)
    return {i["name"]: int(i["public"].rsplit(":", 1)[1]) for i in data["instances"]}


@pytest.fixture
def box(sandbox: Sandbox) -> Iterator[Sandbox]:
    """The shared sandbox, emptied of instances after each test."""
    yield sandbox
    names = [p.stem for p in sandbox.unit_dir.glob("*.socket")
             if "unitgen-instance" in p.read_text()]
    if names:
        cli(sandbox, "remove", "--user", *names)
    for path in sorted(sandbox.unit_dir.rglob("*"), reverse=True):
        if path.is_symlink() or path.is_file():  # a dangling enable link too
            path.unlink()
        elif path.is_dir():
            path.rmdir()
    sandbox.systemctl("reset-failed")
    sandbox.systemctl("daemon-reload")


class Sampler(threading.Thread):
    """Records the ActiveState of units every 50 ms."""

    def __init__(self, box: Sandbox, units: list[str]) -> None:
        super().__init__(daemon=True)
        self.box, self.units = box, units
        self.samples: list[dict[str, str]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            out = self.box.systemctl("show", "-p", "Id", "-p", "ActiveState", *self.units).stdout
            sample: dict[str, str] = {}
            unit = ""
            for line in out.splitlines():
                key, _, value = line.partition("=")
                if key == "Id":
                    unit = value
                elif key == "ActiveState":
                    sample[unit] = value
            self.samples.append(sample)
            self.done.wait(0.05)

    def stop(self) -> list[dict[str, str]]:
        self.done.set()
        self.join(10)
        return self.samples

    def overlaps(self) -> list[dict[str, str]]:
        """Samples where two servers were active at once."""
        return [s for s in self.samples if sum(v == "active" for v in s.values()) > 1]


def stream(port: int, path: str = "/generate", timeout: float = 90,
           first_chunk: threading.Event | None = None) -> dict[str, Any]:
    """GET a streamed answer; say whether every chunk and the final line came."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    out: dict[str, Any] = {"status": 0, "chunks": 0, "done": False, "pid": None,
                           "error": "", "sent": time.time()}
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        out["status"] = resp.status
        while line := resp.readline():
            data = json.loads(line)
            out["pid"] = data.get("pid")
            if "chunk" in data:
                out["chunks"] += 1
                if first_chunk is not None:
                    first_chunk.set()
            if data.get("done"):
                out["done"] = True
    except (OSError, ValueError, http.client.HTTPException) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        out["ended"] = time.time()
        out["ended_mono"] = time.monotonic()
        conn.close()
    return out


def failed_units(box: Sandbox) -> str:
    return box.systemctl("list-units", "--state=failed", "--plain", "--no-legend").stdout.strip()


def test_alternating_requests_never_two_loaded(box, tmp_path):
    ports = deploy(box, member(tmp_path, "a"), member(tmp_path, "b"))
    sampler = Sampler(box, ["a-backend.service", "b-backend.service"])
    sampler.start()
    pids = []
    try:
        for _ in range(10):
            for name in ("a", "b"):
                status, body = get(ports[name], "/v1/chat", timeout=60)
                assert status == 200, body
                pids.append(body["pid"])
    finally:
        samples = sampler.stop()
    assert len(samples) > 50
    assert sampler.overlaps() == []
    # every request after the first was a swap: a fresh load each time
    assert len(set(pids)) == 20
    assert failed_units(box) == ""
    assert prop(box, "a.socket", "ActiveState") == "active"
    # (b's own public probe may still be polling: the client's answer can come first)
    assert wait_for(lambda: prop(box, "b.service", "ActiveState") == "active", 10)
    assert prop(box, "a.service", "ActiveState") == "inactive"  # drained and exited, not failed


def test_concurrent_streaming_clients_are_served_in_turn(box, tmp_path):
    ports = deploy(box, *(member(tmp_path, n, STANDIN_STREAM_SECONDS="1") for n in ("a", "b")))
    sampler = Sampler(box, ["a-backend.service", "b-backend.service"])
    sampler.start()
    results: list[tuple[str, dict[str, Any]]] = []
    lock = threading.Lock()
    deadline = time.monotonic() + 20

    def client(name: str) -> None:
        while time.monotonic() < deadline:
            r = stream(ports[name])
            with lock:
                results.append((name, r))

    threads = [threading.Thread(target=client, args=(n,)) for n in ("a", "b") for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    sampler.stop()
    bad = [r for _, r in results if not (r["status"] == 200 and r["chunks"] == 10 and r["done"])]
    assert bad == []
    assert sampler.overlaps() == []
    loads = {n: {r["pid"] for m, r in results if m == n} for n in ("a", "b")}
    swaps = len(loads["a"]) + len(loads["b"]) - 1
    print(f"\n{len(results)} streamed requests in 20 s by 16 clients, {swaps} swaps, "
          f"none failed or cut")
    assert len(loads["a"]) >= 2 and len(loads["b"]) >= 2  # both kept getting turns
    assert failed_units(box) == ""
    assert prop(box, "a.socket", "ActiveState") == "active"
    assert prop(box, "b.socket", "ActiveState") == "active"


def test_request_in_flight_completes_before_the_next_member_loads(box, tmp_path):
    ports = deploy(box, member(tmp_path, "a", STANDIN_STREAM_SECONDS="4"), member(tmp_path, "b"))
    first = threading.Event()
    out: dict[str, dict[str, Any]] = {}
    long_a = threading.Thread(target=lambda: out.update(a1=stream(ports["a"], first_chunk=first)))
    long_a.start()
    assert first.wait(30)
    b = threading.Thread(target=lambda: out.update(b=stream(ports["b"], path="/health")))
    b.start()
    assert wait_for(lambda: prop(box, "a.service", "ActiveState") == "deactivating", 10, 0.05)
    # a new request for the draining member waits for its next turn
    a2 = threading.Thread(target=lambda: out.update(a2=stream(ports["a"])))
    a2.start()
    status = json.loads(cli(box, "status", "--user", "--json").stdout)
    doctor = cli(box, "doctor", "--user", "b").stdout
    for t in (long_a, b, a2):
        t.join(90)
    assert out["a1"]["status"] == 200 and out["a1"]["chunks"] == 10 and out["a1"]["done"]
    assert out["b"]["status"] == 200
    assert out["a2"]["status"] == 200 and out["a2"]["done"], out["a2"]
    assert out["a2"]["pid"] != out["a1"]["pid"]  # served in a's next turn
    assert out["a2"]["ended"] > out["b"]["ended"]
    # b's server started only after a's request had ended (both CLOCK_MONOTONIC)
    b_start = int(prop(box, "b-backend.service", "ExecMainStartTimestampMonotonic")) / 1e6
    assert b_start >= out["a1"]["ended_mono"] - 0.01, (b_start, out["a1"]["ended_mono"])
    group = status["swap_groups"][0]
    assert group["members"] == ["a", "b"] and group["loaded"] == "a"
    assert "b" in group["waiting"] and "a" in group["draining"]
    assert "waited" in doctor and "for its turn in swap group g" in doctor, doctor
    assert "a is finishing its requests first" in doctor, doctor


def test_kill_9_of_the_running_member_restarts_it_alone(box, tmp_path):
    ports = deploy(box, member(tmp_path, "a"), member(tmp_path, "b"))
    assert get(ports["a"], "/x", timeout=60)[0] == 200
    old = int(prop(box, "a-backend.service", "MainPID"))
    stop = threading.Event()
    answers: list[tuple[float, int]] = []

    def load() -> None:
        while not stop.is_set():
            try:
                answers.append((time.monotonic(), get(ports["a"], "/x", timeout=30)[0]))
            except OSError:
                answers.append((time.monotonic(), 0))
            time.sleep(0.05)

    sampler = Sampler(box, ["b-backend.service"])
    sampler.start()
    clients = [threading.Thread(target=load) for _ in range(3)]
    for t in clients:
        t.start()
    time.sleep(1)
    killed_at = time.monotonic()
    os.kill(old, signal.SIGKILL)
    assert wait_for(lambda: prop(box, "a-backend.service", "ActiveState") == "active"
                    and int(prop(box, "a-backend.service", "MainPID")) not in (0, old), 20)
    time.sleep(1)
    stop.set()
    for t in clients:
        t.join(60)
    samples = sampler.stop()
    assert int(prop(box, "a-backend.service", "NRestarts")) >= 1
    assert {s["b-backend.service"] for s in samples} == {"inactive"}
    assert prop(box, "a.service", "ActiveState") == "active"  # the proxy waited for it
    late = [code for at, code in answers if at > killed_at + 0.5]
    assert late and all(code == 200 for code in late), answers
    assert failed_units(box) == ""


def dropin(box: Sandbox, name: str) -> str:
    path = box.unit_dir / f"{name}-backend.service.d" / "unitgen-swap.conf"
    return path.read_text() if path.exists() else ""


def test_redeploy_and_remove_update_the_other_members(box, tmp_path):
    specs = {n: member(tmp_path, n) for n in ("a", "b", "c")}
    ports = deploy(box, specs["a"], specs["b"])
    assert "Conflicts=b-backend.service" in dropin(box, "a")
    ports.update(deploy(box, specs["c"]))  # a new member: a and b learn of it
    assert "Conflicts=c-backend.service" in dropin(box, "a")
    assert "Conflicts=c-backend.service" in dropin(box, "b")
    assert "a-backend.service" in prop(box, "c-backend.service", "Conflicts")
    assert "c-backend.service" in prop(box, "a-backend.service", "Conflicts")
    for name in ("a", "c", "b"):
        assert get(ports[name], "/x", timeout=60)[0] == 200
    before = dropin(box, "a")
    a_unit = (box.unit_dir / "a.service").read_text()

    member(tmp_path, "b", STANDIN_RECORD=str(tmp_path / "b.json"))  # a change to b only
    deploy(box, specs["a"], specs["b"])
    assert dropin(box, "a") == before and (box.unit_dir / "a.service").read_text() == a_unit
    for name in ("a", "b"):
        status, body = get(ports[name], "/x", timeout=60)
        assert status == 200
    assert json.loads((tmp_path / "b.json").read_text())["pid"] == body["pid"]

    done = cli(box, "remove", "--user", "c")
    assert done.returncode == 0, done.stderr
    assert "c-backend" not in dropin(box, "a") + dropin(box, "b")
    assert not (box.unit_dir / "c-backend.service.d").exists()
    assert "c-backend.service" not in prop(box, "a-backend.service", "Conflicts")
    sampler = Sampler(box, ["a-backend.service", "b-backend.service"])
    sampler.start()
    for name in ("a", "b", "a"):
        assert get(ports[name], "/x", timeout=60)[0] == 200
    sampler.stop()
    assert sampler.overlaps() == []
    assert failed_units(box) == ""


def test_idle_stop_unloads_the_running_member(box, tmp_path):
    ports = deploy(box, member(tmp_path, "a", extra='idle_stop = "1s"\n'), member(tmp_path, "b"))
    assert get(ports["a"], "/x", timeout=60)[0] == 200
    assert wait_for(lambda: prop(box, "a-backend.service", "ActiveState") == "inactive", 10)
    assert wait_for(lambda: prop(box, "a.service", "ActiveState") == "inactive", 10)
    assert prop(box, "a.socket", "ActiveState") == "active"
    assert get(ports["b"], "/x", timeout=60)[0] == 200
    assert failed_units(box) == ""


def test_members_on_private_unix_sockets(box, tmp_path):
    """llama-server style members (the stand-in plays it): the proxy forwards to
    the server's Unix socket in its RuntimeDirectory=, which goes with each unload."""
    exe = standin_exe(tmp_path)
    specs = [write_spec(tmp_path, n, f'name = "{n}"\nbackend = "llama-server"\nmodel = "/m.gguf"\n'
                        f'executable = "{exe}"\nactivation = "on-demand"\nswap_group = "u"\n'
                        f"port = {run_ports(n)[0]}\n"
                        f'env = {{ STANDIN_LOAD_SECONDS = "{LOAD}" }}\n') for n in ("ua", "ub")]
    ports = deploy(box, *specs)
    pids = []
    for name in ("ua", "ub", "ua"):
        status, body = get(ports[name], "/v1/models", timeout=60)
        assert status == 200
        pids.append(body["pid"])
    assert len(set(pids)) == 3
    assert prop(box, "ub-backend.service", "ActiveState") == "inactive"
    assert failed_units(box) == ""


def test_kept_alive_connections_do_not_hold_the_turn(box, tmp_path):
    """A client that reuses one connection (an SDK's pool) gets its answer in
    full, then Connection: close; it does not keep its member loaded for the
    whole drain bound, and none of its requests fails."""
    ports = deploy(box, member(tmp_path, "a", drain="60s", STANDIN_STREAM_SECONDS="0.5"),
                   member(tmp_path, "b"))
    stop = threading.Event()
    codes: list[int] = []
    errors: list[str] = []

    def keepalive_client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", ports["a"], timeout=90)
        while not stop.is_set():
            try:
                conn.request("GET", "/generate")
                resp = conn.getresponse()
                body = resp.read()
                codes.append(resp.status if body.endswith(b'"done": true, "path": "/generate", '
                                                          + b'"pid": ' + body.rsplit(b" ", 1)[1])
                             else -1)
            except (OSError, http.client.HTTPException) as exc:
                errors.append(repr(exc))
                conn.close()
        conn.close()

    client = threading.Thread(target=keepalive_client)
    client.start()
    assert wait_for(lambda: len(codes) >= 2, 30)
    t0 = time.monotonic()
    status, _ = get(ports["b"], "/x", timeout=60)
    took = time.monotonic() - t0
    time.sleep(1)
    stop.set()
    client.join(120)
    assert status == 200
    assert took < 10, (f"b waited {took:.1f} s: the kept-alive connection held a's turn\n"
                       + box.journal("a.service", lines=30))
    assert errors == [] and codes and all(c == 200 for c in codes), (codes, errors)


def test_the_drain_bound_ends_a_turn_that_would_starve_the_others(box, tmp_path):
    """Fairness: an answer longer than swap_drain does not keep the GPU; the
    waiting member loads once the bound is reached."""
    ports = deploy(box, member(tmp_path, "a", drain="1s", STANDIN_STREAM_SECONDS="8"),
                   member(tmp_path, "b"))
    first = threading.Event()
    out: dict[str, dict[str, Any]] = {}
    long_a = threading.Thread(target=lambda: out.update(a=stream(ports["a"], first_chunk=first)))
    long_a.start()
    assert first.wait(30)
    t0 = time.monotonic()
    status, _ = get(ports["b"], "/x", timeout=60)
    took = time.monotonic() - t0
    long_a.join(60)
    assert status == 200
    assert took < 5, f"b waited {took:.1f} s behind an 8 s answer with swap_drain = 1s"
    assert not out["a"]["done"] and out["a"]["chunks"] < 10  # cut at the bound, as documented
    assert "drain bound 1s reached" in box.journal("a.service", lines=20)


def _open(port: int, first: bytes = b"") -> socket.socket:
    """A loopback TCP connection to ``port`` that has sent ``first`` (maybe nothing)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    if first:
        sock.sendall(first)
    return sock


def _closed_by_peer(sock: socket.socket, within: float) -> bool:
    """True when the other end closed ``sock`` (EOF or reset) within ``within`` s;
    whatever the server answered before that is read and dropped."""
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return True


def _swap_time(box: Sandbox, ports: dict[str, int], held: list[socket.socket]) -> float:
    """Seconds from b's request to its answer while a holds ``held``."""
    t0 = time.monotonic()
    status, _ = get(ports["b"], "/x", timeout=60)
    took = time.monotonic() - t0
    assert status == 200
    print(f"\nswap with {len(held)} held connection(s) to a: {took:.2f} s")
    return took


def test_a_silent_connection_does_not_hold_the_turn(box, tmp_path):
    """Security review item 9: a TCP connection to the running member that never
    sends a byte held every swap for the whole swap_drain (20.26 s here). Once the
    drain begins it is closed after the grace (1 s), so b loads at once."""
    ports = deploy(box, member(tmp_path, "a", drain="20s"), member(tmp_path, "b"))
    assert get(ports["a"], "/x", timeout=60)[0] == 200
    silent = _open(ports["a"])
    try:
        time.sleep(0.5)  # accepted by a's proxy well before the drain begins
        took = _swap_time(box, ports, [silent])
        assert took < 5, (f"b waited {took:.1f} s behind a connection that sent nothing\n"
                          + box.journal("a.service", lines=30))
        assert _closed_by_peer(silent, 10)
    finally:
        silent.close()
    assert "closed 1 connection(s) that sent nothing" in box.journal("a.service", lines=30)
    assert failed_units(box) == ""


def test_stalled_and_trickled_requests_do_not_hold_the_turn(box, tmp_path):
    """Slowloris: a request head left unfinished, one sent a byte every half
    second, and a body that stops coming are closed 5 s after the drain begins
    (DRAIN_STALL), not at swap_drain (20 s)."""
    ports = deploy(box, member(tmp_path, "a", drain="20s"), member(tmp_path, "b"))
    assert get(ports["a"], "/x", timeout=60)[0] == 200
    stalled = _open(ports["a"], b"GET /x HTTP/1.1\r\nHost: a\r\n")
    body = _open(ports["a"], b"GET /x HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
    trickled = _open(ports["a"], b"G")
    stop = threading.Event()

    def trickle() -> None:
        for byte in b"ET /x HTTP/1.1\r\nHost: a\r\nX-Pad: " + b"y" * 200:
            if stop.wait(0.5):
                return
            try:
                trickled.send(bytes([byte]))
            except OSError:
                return

    sender = threading.Thread(target=trickle)
    sender.start()
    held = [stalled, body, trickled]
    try:
        time.sleep(0.5)
        took = _swap_time(box, ports, held)
        assert took < 10, (f"b waited {took:.1f} s behind stalled requests\n"
                           + box.journal("a.service", lines=30))
        assert all(_closed_by_peer(s, 10) for s in held)
    finally:
        stop.set()
        sender.join(10)
        for s in held:
            s.close()
    assert failed_units(box) == ""
