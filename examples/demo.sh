#!/bin/sh
# Deploy the demo instance, show it answering through its socket, show status
# and doctor. Run it where a systemd user manager is reachable, or inside
# `unitgen sandbox run -- sh examples/demo.sh` (what ./setup demo does).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
unitgen deploy --user "$here/demo.toml"
echo
echo "GET http://127.0.0.1:8765/v1/models through the socket:"
python3 -c 'import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:8765/v1/models", timeout=30).read().decode())'
echo
unitgen status --user demo
echo
unitgen doctor --user demo
