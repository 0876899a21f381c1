#!/usr/bin/env bash
# Start (or stop) a Flower SuperLink and N SuperNodes on this machine for flexmoe.
#
#   scripts/flower-deploy.sh start WORKDIR N [BASE_PORT] [CERTS_DIR]
#   scripts/flower-deploy.sh stop WORKDIR
#
# start: one SuperLink on 127.0.0.1:BASE_PORT (Flower 1.41 serves its Fleet, Control and runtime
# APIs over HTTP on one port) and N SuperNodes (ClientAppIo BASE_PORT+1+i); SuperNode i is client i
# (node config partition-id=i, num-partitions=N) and keeps its personal state in
# WORKDIR/node-i/state. If WORKDIR/node-i/data.jsonl exists, it is that node's own data
# (node config data-path). Without CERTS_DIR everything is --insecure; with it (holding ca.crt,
# server.pem, server.key) the SuperLink serves TLS and the SuperNodes verify it. Logs and pid
# files go to WORKDIR. Writes the Flower connection "flexmoe-deploy" into $FLWR_HOME/config.toml
# (default ~/.flwr), so that `flwr run . flexmoe-deploy` submits a run.
# stop: terminates every process whose pid file is in WORKDIR (SIGTERM, then SIGKILL).
set -euo pipefail

command=${1:-}
workdir=${2:-}
if [[ -z "$command" || -z "$workdir" ]]; then
    sed -n '2,17p' "$0" >&2
    exit 2
fi

stop_all() {
    shopt -s nullglob
    local pidfile pid
    for pidfile in "$workdir"/*.pid; do
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null || true
    done
    for pidfile in "$workdir"/*.pid; do
        pid=$(cat "$pidfile")
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$pidfile"
    done
}

case "$command" in
stop)
    stop_all
    exit 0
    ;;
start) ;;
*)
    echo "flower-deploy.sh: unknown command '$command' (start or stop)" >&2
    exit 2
    ;;
esac

count=${3:-2}
base=${4:-8000}
certs=${5:-}
link="127.0.0.1:$base"
mkdir -p "$workdir"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1  # never let the SuperLink pip-install the app's deps

if [[ -n "$certs" ]]; then
    link_security=(--ssl-ca-certfile "$certs/ca.crt" --ssl-certfile "$certs/server.pem" --ssl-keyfile "$certs/server.key")
    node_security=(--root-certificates "$certs/ca.crt")
    connection_security="root-certificates = \"$certs/ca.crt\""
else
    link_security=(--insecure)
    node_security=(--insecure)
    connection_security="insecure = true"
fi

flower-superlink "${link_security[@]}" --host 127.0.0.1 --port "$base" --database "$workdir/superlink.db" \
    >"$workdir/superlink.log" 2>&1 &
echo $! >"$workdir/superlink.pid"

for ((i = 0; i < count; i++)); do
    node="$workdir/node-$i"
    mkdir -p "$node/state"
    config="partition-id=$i num-partitions=$count state-dir='$node/state'"
    if [[ -f "$node/data.jsonl" ]]; then
        config="$config data-path='$node/data.jsonl'"
    fi
    flower-supernode "${node_security[@]}" --superlink "$link" --port $((base + 1 + i)) \
        --node-config "$config" >"$node/supernode.log" 2>&1 &
    echo $! >"$workdir/supernode-$i.pid"
done

flwr_home=${FLWR_HOME:-$HOME/.flwr}
mkdir -p "$flwr_home"
touch "$flwr_home/config.toml"
if ! grep -q '^\[superlink.flexmoe-deploy\]' "$flwr_home/config.toml"; then
    printf '\n[superlink.flexmoe-deploy]\naddress = "%s"\n%s\n' "$link" "$connection_security" \
        >>"$flwr_home/config.toml"
fi
echo "SuperLink $link and $count SuperNodes started; logs in $workdir"
echo "submit a run:  flwr run . flexmoe-deploy --stream --run-config \"output-dir='$workdir/run'\""
echo "stop them:     $0 stop $workdir"
