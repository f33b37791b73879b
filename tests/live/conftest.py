"""The live tier's shared fixtures (the private manager itself: tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import prop
from tests.live.test_operate_live import cli, cli_json
from unitgen.ops.interface import Where
from unitgen.ops.systemd.sandbox import Sandbox


@pytest.fixture
def box(sandbox: Sandbox) -> Iterator[Sandbox]:
    """The shared sandbox; instances a test deployed are removed afterwards (and
    the manager forgets failed units), whatever the test's outcome."""
    before = {p.name for p in sandbox.unit_dir.glob("*")}
    yield sandbox
    names = sorted({p.stem for p in sandbox.unit_dir.glob("*.socket")
                    if p.name not in before and "unitgen-instance" in p.read_text()})
    if names:
        cli(sandbox, "remove", "--user", *names)
    sandbox.systemctl("reset-failed")


class SystemdGateways:
    """The gateway tests' host (tests/gateway_cases.py) on the sandbox's user manager."""

    on_demand = True
    target = "systemd"
    where = Where(user=True)

    def __init__(self, box: Sandbox) -> None:
        self.box = box
        self.env = box.env

    def cli(self, verb: str, *args: str) -> tuple[int, Any]:
        return cli_json(self.box, verb, "--user", *args)

    def master(self, gateway: str) -> int:
        return int(prop(self.box, f"{gateway}.service", "MainPID"))

    def loaded(self, name: str) -> bool:
        return prop(self.box, f"{name}-backend.service", "ActiveState") != "inactive"

    def gateway_dir(self, gateway: str) -> Path:
        return Path(self.box.env["HOME"]) / ".config" / "unitgen" / "gateways" / gateway

    def stop_socket(self, name: str) -> tuple[str, str]:
        self.box.systemctl("stop", f"{name}.socket", f"{name}.service", check=True)
        return f"{name}.socket is inactive", f"systemctl start {name}.socket"

    def delete_by_hand(self, name: str) -> None:
        box = self.box
        box.systemctl("stop", f"{name}.socket", f"{name}.service", f"{name}-backend.service",
                      check=True)
        for path in [*box.unit_dir.glob(f"{name}.*"), *box.unit_dir.glob(f"{name}-*"),
                     *box.unit_dir.glob(f"*.wants/{name}*")]:  # its enable links too
            path.unlink()
        box.systemctl("daemon-reload", check=True)

    def server_log(self, name: str) -> str:
        return self.box.journal(f"{name}-backend.service", lines=20)

    def gateway_log(self, gateway: str) -> str:
        return self.box.journal(f"{gateway}.service", lines=2000)


@pytest.fixture
def gw(box: Sandbox) -> SystemdGateways:
    """The gateway tests' host: the sandbox's user manager (``unitgen ... --user``)."""
    return SystemdGateways(box)
