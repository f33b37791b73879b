"""Members behind the gateway that start and stop on their own: swap-group
members (a request for the other model waits while the group swaps, never a
503), and doctor explaining a route that points nowhere. Real HAProxy on a real
user manager, the OpenAI SDK as the client.

The swap test is systemd's alone: a swap group's members start on a connection
(activation = "on-demand"), which supervisord cannot do. The others are written
once for every target (tests/gateway_cases.py)."""

from __future__ import annotations

import threading

import pytest

from tests.gateway_cases import (  # noqa: F401 - collected here, with this tier's gw
    NEEDS_HAPROXY,
    client,
    gateway,
    member,
    test_doctor_explains_a_route_that_points_nowhere,
    test_streams_pass_as_produced_and_a_client_that_leaves_is_seen,
)
from tests.helpers import free_port
from tests.live.test_operate_live import cli_json

pytestmark = [pytest.mark.systemd, NEEDS_HAPROXY]

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
