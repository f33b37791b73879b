#!/bin/sh
# The demo under supervisord instead of systemd: starts a private supervisord
# in a temp dir (what a container runs as its main process), deploys
# examples/demo.toml with --target supervisor (on port 8766: 8765 is the systemd
# demo's), shows it answering through supervisord's socket, then stops that
# supervisord by its pid.
# Run from the repo after ./setup:   sh examples/demo-supervisor.sh
set -eu
here=$(cd "$(dirname "$0")" && pwd)
bin=${UNITGEN_BIN:-$here/../.venv/bin}
dir=$(mktemp -d /tmp/unitgen-supervisor-demo.XXXXXX)
mkdir -p "$dir/conf.d"
cat > "$dir/supervisord.conf" <<EOF_CONF
[supervisord]
nodaemon=true
logfile=$dir/supervisord.log
pidfile=$dir/supervisord.pid
childlogdir=$dir

[unix_http_server]
file=$dir/supervisor.sock
chmod=0700

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://$dir/supervisor.sock

[include]
files=$dir/conf.d/*.conf
EOF_CONF
"$bin/supervisord" -c "$dir/supervisord.conf" >/dev/null 2>&1 &
pid=$!
trap 'kill -TERM $pid; wait $pid 2>/dev/null || true; rm -rf "$dir"' EXIT
i=0
until [ -S "$dir/supervisor.sock" ] || [ $i -ge 100 ]; do sleep 0.1; i=$((i + 1)); done

# Set once (a container image would put these in its environment):
export UNITGEN_TARGET=supervisor
export UNITGEN_SUPERVISOR_URL="unix://$dir/supervisor.sock"
export UNITGEN_SUPERVISOR_CONF_DIR="$dir/conf.d"
export UNITGEN_SUPERVISOR_RUN_DIR="$dir/run" UNITGEN_SUPERVISOR_LOG_DIR="$dir/log"
export UNITGEN_SUPERVISOR_SECRETS_DIR="$dir/secrets"

sed -e 's/^port = 8765$/port = 8766/' -e "s|{spec_dir}|$here|" "$here/demo.toml" > "$dir/demo.toml"
"$bin/unitgen" deploy "$dir/demo.toml"
echo
echo "GET http://127.0.0.1:8766/v1/models through supervisord's socket:"
python3 -c 'import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:8766/v1/models", timeout=30).read().decode())'
echo
"$bin/unitgen" status
echo
"$bin/unitgen" doctor demo
echo
"$bin/supervisorctl" -c "$dir/supervisord.conf" status
