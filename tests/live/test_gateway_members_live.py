"""Members behind the gateway that start and stop on their own: swap-group
members (a request for the other model waits while the group swaps, never a
503), and doctor explaining a route that points nowhere. Real HAProxy on a real
user manager, the OpenAI SDK as the client."""

from __future__ import annotations

import json
import socket
import threading
import time

from tests.helpers import free_port
from tests.live.test_gateway_live import client, gateway, member, pytestmark  # noqa: F401
from tests.live.test_operate_live import cli, cli_json

SWAP = 'activation = "on-demand"\nswap_group = "gsw"\nswap_drain = "5s"\n'


def test_swap_group_members_behind_the_gateway_wait_never_503(box, tmp_path):
    port = free_port()
    specs = [member(tmp_path, name, "gw5", extra=SWAP, STANDIN_LOAD_SECONDS="1",
                    STANDIN_LOADING="refuse") for name in ("swa", "swb")]
    rc, data = cli_json(box, "deploy", "--user", *map(str, specs),
                        str(gateway(tmp_path, "gw5", port)))
    assert rc == 0, data
    sdk = client(port)
    assert sorted(m.id for m in sdk.models.list()) == ["swa", "swb"]
    # one after the other: every request swaps the group
    for name in ("swa", "swb", "swa"):
        r = sdk.chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}])
        assert r.choices[0].message.content == f"{name} answers {name}"
    # both at once: one of them waits for the other's turn to end
    answers: dict[str, str] = {}
    errors: list[str] = []

    def ask(name: str) -> None:
        try:
            r = client(port).chat.completions.create(model=name, messages=[])
            answers[name] = r.choices[0].message.content or ""
        except Exception as exc:  # the assertion below names it
            errors.append(f"{name}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=ask, args=(n,)) for n in ("swa", "swb")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert answers == {"swa": "swa answers swa", "swb": "swb answers swb"}


def _findings(box, name: str) -> tuple[int, list[str]]:
    rc, data = cli_json(box, "doctor", "--user", name)
    return rc, [("ok   " if f["ok"] else "FAIL ") + f["text"] for f in data["findings"]]


def test_doctor_explains_a_route_that_points_nowhere(box, tmp_path):
    port = free_port()
    rc, data = cli_json(box, "deploy", "--user", str(member(tmp_path, "dra", "gw6")),
                        str(member(tmp_path, "drb", "gw6", aliases=("shared",))),
                        str(member(tmp_path, "drc", "gw6", aliases=("shared",))),
                        str(gateway(tmp_path, "gw6", port,
                                    f'metrics = "127.0.0.1:{free_port()}"\n')))
    assert rc == 0, data
    rc, said = _findings(box, "gw6")
    assert rc == 0, "\n".join(said)  # the exporter's port is the gateway's own, not a stray
    assert "ok   route dra -> dra" in said and "ok   route shared -> drb, drc" in said
    # a member's socket stopped: its route points nowhere, the shared one half-way
    box.systemctl("stop", "drb.socket", "drb.service", check=True)
    rc, said = _findings(box, "gw6")
    assert rc == 1
    nowhere = next(s for s in said if s.startswith("FAIL route drb points nowhere"))
    assert "drb.socket is inactive" in nowhere and "systemctl start drb.socket" in nowhere
    assert any(s.startswith("FAIL route shared -> drc; and drb.socket is inactive")
               for s in said), "\n".join(said)
    # a member's units deleted by hand: the configuration still names it
    box.systemctl("stop", "dra.socket", "dra.service", "dra-backend.service", check=True)
    for path in [*box.unit_dir.glob("dra.*"), *box.unit_dir.glob("dra-*"),
                 *box.unit_dir.glob("*.wants/dra*")]:  # its enable links too
        path.unlink()
    box.systemctl("daemon-reload", check=True)
    rc, said = _findings(box, "gw6")
    assert any(s.startswith("FAIL route dra points nowhere: dra is not installed")
               and "unitgen deploy" in s for s in said), "\n".join(said)
    # an instance joining a gateway that is not deployed
    rc, data = cli_json(box, "deploy", "--user", str(member(tmp_path, "drz", "nogw")))
    assert rc == 0, data
    rc, said = _findings(box, "drz")
    assert rc == 1
    assert any("drz joins gateway nogw, which is not deployed here" in s for s in said), "\n".join(said)
    assert cli(box, "remove", "--user", "drz").returncode == 0



def test_streams_pass_as_produced_and_a_client_that_leaves_is_seen(box, tmp_path):
    port = free_port()
    rc, data = cli_json(box, "deploy", "--user",
                        str(member(tmp_path, "sse", "gw7", STANDIN_STREAM_SECONDS="6")),
                        str(gateway(tmp_path, "gw7", port)))
    assert rc == 0, data
    body = json.dumps({"messages": [], "model": "sse", "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        t0 = time.monotonic()
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        got = b""
        while b"sse:1 " not in got:
            chunk = conn.recv(4096)
            assert chunk, got
            got += chunk
        # the second token of a 6 s stream: passed on as written, not buffered to the end
        assert time.monotonic() - t0 < 3.0, got
    # the client left after two tokens: the server's write fails, it stops generating
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if "client went away" in box.journal("sse-backend.service", lines=20):
            break
        time.sleep(0.3)
    else:
        raise AssertionError(box.journal("sse-backend.service", lines=20))
