"""Issue 25, High 1, containers: a server in a container (root on the host,
without capabilities, its socket directory bound in read-write) replaces its
socket with a link to a socket only root may use. Real podman and runc under
the live tier's root-run manager (tests/live/test_containers_live.py). Failed
before the fix: systemd-socket-proxyd, as root, followed the link for every
client of the public port."""

from __future__ import annotations

import pytest

from tests.helpers import RecordingUnixListener, get, raw_get, wait_for
from tests.live.test_containers_live import box, image, pod_spec, port_of
from tests.live.test_operate_live import cli_json

pytestmark = pytest.mark.systemd

__all__ = ["box", "image"]  # the fixtures, shared with the container tests

# Inside the container: the stand-in as a child; once it has served for three
# seconds, its socket becomes a link to $RELINK_TO (a path of the host's).
RELINK = """
import os, subprocess, sys, time
path = sys.argv[sys.argv.index("--host") + 1]
child = subprocess.Popen(["/usr/bin/python3", "/srv/standin/demo_server.py", *sys.argv[1:]])
while not os.path.exists(path):
    time.sleep(0.05)
time.sleep(3)
os.symlink(os.environ["RELINK_TO"], path + ".new")
os.rename(path + ".new", path)
print("RELINKED uid", os.getuid(), flush=True)
sys.exit(child.wait())
"""





def test_a_container_cannot_point_its_proxy_at_a_root_only_socket(box, tmp_path):
    listener = RecordingUnixListener.root_only(tmp_path / "root-only")
    spec = pod_spec(tmp_path, "pod-relink", f'env = {{ RELINK_TO = "{listener.path}" }}\n')
    (tmp_path / "standin" / "relink.py").write_text(RELINK)
    spec.write_text(spec.read_text().replace("/srv/standin/demo_server.py",
                                             "/srv/standin/relink.py"))
    rc, data = cli_json(box, "deploy", "--user", str(spec))
    assert rc == 0, data
    port = port_of(data)
    assert get(port, "/v1/models")[0] == 200
    sock = box.root / "run" / "unitgen-pod-relink" / "http.sock"
    assert wait_for(sock.is_symlink, 20), box.journal("pod-relink-backend.service")
    assert "RELINKED uid 0" in box.journal("pod-relink-backend.service")  # root inside
    got = raw_get(port)
    assert b"ROOT-ONLY" not in got, got
    assert listener.received == [], listener.received
    assert "is a link" in box.journal("pod-relink.service")
