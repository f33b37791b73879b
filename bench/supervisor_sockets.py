"""Who should own the public port under supervisord? Measured side by side:

* plain:      [program:x] the server listens on the public port itself
* one-owner:  what `unitgen deploy --target supervisor` writes: supervisord owns
              the port ([fcgi-program], fd 0); a wrapper waits for the server and
              runs systemd-socket-proxyd on it (fd 3); the server is private
* fd3:        a custom server with socket_activation = true: supervisord owns the
              port, a holder program keeps it and hands it to the server as fd 3

For each, with a stand-in server that loads for LOAD seconds (``refuse``: not
listening while loading, like vLLM and vox-box; ``503``: answering 503, like
llama-server, SGLang, TGI), a client sends GET /health every 100 ms (each
request waits up to 30 s) during the first start and after a kill -9 of the
server, and counts what it got.

    .venv/bin/python -m bench.supervisor_sockets [--load 3] [--window 8]
"""

from __future__ import annotations

import argparse
import http.client
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from tests.helpers import STANDIN, free_port, write_spec
from tests.supervisord import Supervisord
from unitgen.ops.interface import DeployOptions as Options
from unitgen.ops.supervisor.deploy import deploy


def one_request(port: int) -> tuple[str, float]:
    t0 = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/health")
        status = conn.getresponse().status
        outcome = str(status)
    except ConnectionRefusedError:
        outcome = "refused"
    except ConnectionResetError:
        outcome = "reset"
    except (http.client.RemoteDisconnected, http.client.BadStatusLine):
        outcome = "closed"
    except TimeoutError:
        outcome = "timeout"
    except OSError as exc:
        outcome = type(exc).__name__
    finally:
        conn.close()
    return outcome, time.monotonic() - t0


def client(port: int, window: float) -> list[tuple[float, str, float]]:
    """Start a request every 100 ms for ``window`` s, each in its own thread."""
    results: list[tuple[float, str, float]] = []
    lock = threading.Lock()
    start = time.monotonic()

    def go(at: float) -> None:
        outcome, took = one_request(port)
        with lock:
            results.append((at, outcome, took))

    threads = []
    while time.monotonic() - start < window:
        th = threading.Thread(target=go, args=(time.monotonic() - start,))
        th.start()
        threads.append(th)
        time.sleep(0.1)
    for th in threads:
        th.join()
    return sorted(results)


def summary(results: list[tuple[float, str, float]]) -> str:
    counts = Counter(o for _, o, _ in results)
    ok = [(at, took) for at, o, took in results if o == "200"]
    first = f"first 200 sent at {ok[0][0]:.1f} s" if ok else "no 200"
    waited = max((took for _, o, took in results if o == "200"), default=0.0)
    parts = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    return f"{len(results)} requests -> {parts}; {first}; longest wait for a 200 {waited:.1f} s"


def plain_conf(name: str, port: int, env: str, log: Path) -> str:
    return (f"[program:{name}]\ncommand={sys.executable} {STANDIN} --host 127.0.0.1 --port {port}\n"
            f"environment={env}\nautorestart=true\nstartsecs=0\nstopasgroup=true\n"
            f"killasgroup=true\nredirect_stderr=true\nstdout_logfile={log}\n")


def server_pid(sd: Supervisord, program: str) -> int:
    return int(sd.rpc().call("getProcessInfo", program)["pid"])


def wait_answer(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if one_request(port)[0] == "200":
            return
        time.sleep(0.05)


def measure(design: str, loading: str, load: float, window: float, root: Path) -> list[str]:
    sd = Supervisord.start(root)
    out: list[str] = []
    try:
        port = free_port()
        env = f'STANDIN_LOAD_SECONDS="{load}",STANDIN_LOADING="{loading}"'
        results: list[tuple[float, str, float]] = []
        if design == "plain":
            (sd.conf_dir / "x.conf").write_text(plain_conf("x", port, env, root / "x.log"))
            rpc = sd.rpc()
            rpc.reload_config()
            th = threading.Thread(target=lambda: results.extend(client(port, window)))
            th.start()
            rpc.add_group("x")
            th.join()
            program = "x"
        else:
            sock = design == "fd3"
            listen = '' if sock else '"--host", "{host}", "--port", "{port}"'
            text = (f'name = "x"\nbackend = "custom"\nport = {port}\n'
                    f'command = ["{sys.executable}", "{STANDIN}", {listen}]\n'
                    f'socket_activation = {"true" if sock else "false"}\n'
                    f'env = {{ STANDIN_LOAD_SECONDS = "{load}", STANDIN_LOADING = "{loading}" }}\n')
            spec = write_spec(root, "x", text.replace(", ]", "]"))
            th = threading.Thread(target=lambda: results.extend(client(port, window)))
            th.start()
            deploy([spec], sd.target(), Options(say=lambda line: None))
            th.join()
            program = "x-backend"
        out.append(f"{design:9} {loading:7} start:    {summary(results)}")
        wait_answer(port, 30)
        results = []
        pid = server_pid(sd, program)
        th = threading.Thread(target=lambda: results.extend(client(port, window)))
        th.start()
        time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)
        th.join()
        out.append(f"{design:9} {loading:7} kill -9:  {summary(results)} "
                   "(kill sent at 0.5 s)")
    finally:
        sd.stop()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--load", type=float, default=3.0)
    p.add_argument("--window", type=float, default=8.0)
    ns = p.parse_args()
    print(f"stand-in load time {ns.load:g} s; a request every 100 ms for {ns.window:g} s")
    with tempfile.TemporaryDirectory(prefix="unitgen-bench-") as tmp:
        for i, (design, loading) in enumerate(
            (d, m) for d in ("plain", "one-owner", "fd3") for m in ("refuse", "503")
        ):
            if design == "fd3" and loading == "refuse":
                continue  # a socket-activated server cannot refuse: the socket is already open
            for line in measure(design, loading, ns.load, ns.window, Path(tmp) / str(i)):
                print(line, flush=True)


if __name__ == "__main__":
    main()
