#!/usr/bin/env python3
"""The benchmarks' fast server: nginx answering a static 16-byte body, started
the way llama-server is (``-m MODEL --host PATH.sock``), so unitgen deploys it
as a real llama-server instance (private Unix socket + socket-proxyd).

It listens on the private Unix socket unitgen gives it (what the proxy forwards
to) and on ``127.0.0.1:$BENCH_DIRECT_PORT`` (the baseline: the same server hit
directly). Standard library only; it writes an nginx config into
``$BENCH_DIR`` and execs nginx in the foreground (systemd stops it by its pid).

Environment: BENCH_DIR (required), BENCH_DIRECT_PORT (required),
BENCH_NGINX_WORKERS (default 1).
"""

from __future__ import annotations

import os
import sys

BODY = "0123456789abcdef"  # 16 bytes: the "tiny request" row

CONFIG = """\
daemon off;
master_process on;
worker_processes {workers};
pid {dir}/nginx-{tag}.pid;
error_log stderr warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_temp_path {dir}/nginx-{tag}-body;
    default_type text/plain;
    server {{
        {unix_listen}
        listen 127.0.0.1:{port} backlog=4096;
        location = /health {{ return 200 '{{"status":"ok"}}'; }}
        location / {{ return 200 '{body}'; }}
    }}
}}
"""


def host_arg(argv: list[str]) -> str | None:
    """The value of ``--host`` (a Unix socket path when unitgen deploys it)."""
    for i, word in enumerate(argv):
        if word == "--host" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def main() -> None:
    """Write the config and exec nginx."""
    directory = os.environ["BENCH_DIR"]
    port = int(os.environ["BENCH_DIRECT_PORT"])
    sock = host_arg(sys.argv[1:])
    unix_listen = f"listen unix:{sock} backlog=4096;" if sock and sock.startswith("/") else ""
    tag = str(port)
    conf = os.path.join(directory, f"nginx-{tag}.conf")
    with open(conf, "w", encoding="utf-8") as fh:
        fh.write(CONFIG.format(workers=int(os.environ.get("BENCH_NGINX_WORKERS", "1")),
                               dir=directory, tag=tag, unix_listen=unix_listen, port=port,
                               body=BODY))
    os.execv("/usr/sbin/nginx", ["nginx", "-e", "stderr", "-p", directory, "-c", conf])  # noqa: S606 - replaces this wrapper, like exec in sh


if __name__ == "__main__":
    main()
