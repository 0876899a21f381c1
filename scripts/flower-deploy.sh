#!/usr/bin/env bash
# Start (or stop) a Flower SuperLink and N SuperNodes on this machine for flexmoe.
#
#   scripts/flower-deploy.sh start WORKDIR N [BASE_PORT] [CERTS_DIR] [auth]
#   scripts/flower-deploy.sh node WORKDIR I
#   scripts/flower-deploy.sh stop WORKDIR
#
# start: one SuperLink on 127.0.0.1:BASE_PORT (default 8000; Flower 1.41 serves its Fleet, Control
# and runtime APIs over HTTP on one port) and N SuperNodes (ClientAppIo BASE_PORT+1+i); SuperNode i
# is client i (node config partition-id=i, num-partitions=N) and keeps its personal state in
# WORKDIR/node-i/state. If WORKDIR/node-i/data.jsonl exists, it is that node's own data (node config
# data-path); with FLEXMOE_AUDIT=1 every node keeps a copy of what it sends in WORKDIR/node-i/audit.
# With FLEXMOE_START_NODES=K, `start` starts only SuperNodes 0..K-1 of the N (the others join later
# with `node WORKDIR I`: a client that first appears after the run began).
# With FLEXMOE_GPUS=G, SuperNode i (and the ClientApps it starts) sees only GPU i mod G
# (CUDA_VISIBLE_DEVICES), so N = G gives one SuperNode per GPU; runtime.device auto or cuda uses it.
# Without CERTS_DIR everything is --insecure; with it (holding ca.crt, server.pem, server.key) the
# SuperLink serves TLS and the SuperNodes verify it. `auth` (needs CERTS_DIR) turns on SuperNode
# authentication: each node gets an ECDSA key pair WORKDIR/node-i/key{,.pub} (made if missing),
# registered with `flwr supernode register`; unregistered SuperNodes are refused.
# Logs and pid files go to WORKDIR. Writes the Flower connection "flexmoe-deploy" into
# $FLWR_HOME/config.toml (default ~/.flwr), so that `flwr run . flexmoe-deploy` submits a run.
# node: (re)start SuperNode I with the settings of `start` (same node config, state and key),
# e.g. after it crashed; it continues with its personal state.
# stop: terminates every process whose pid file is in WORKDIR and every process below them (their
# SuperExecs and ClientApps, which outlive a SuperNode), SIGTERM, then SIGKILL.
set -euo pipefail

command=${1:-}
workdir=${2:-}
if [[ -z "$command" || -z "$workdir" ]]; then
    sed -n '2,26p' "$0" >&2
    exit 2
fi

# whether process $1 runs (an exited process its parent has not reaped yet does not)
alive() {
    local state
    state=$(ps -o stat= -p "$1" 2>/dev/null) && [[ "$state" != Z* ]]
}

# the pids of every process below process $1
descendants() {
    local child
    for child in $(ps -o pid= --ppid "$1"); do
        echo "$child"
        descendants "$child"
    done
}

stop_all() {
    shopt -s nullglob
    local pidfile pid pids=()
    for pidfile in "$workdir"/*.pid; do
        pid=$(cat "$pidfile")
        pids+=("$pid" $(descendants "$pid"))
    done
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 50); do alive "$pid" || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done
    rm -f "$workdir"/*.pid
}

# SuperNode $1 in the background, its pid in WORKDIR/supernode-$1.pid
start_node() {
    local i=$1 node="$workdir/node-$1" pidfile="$workdir/supernode-$1.pid"
    if [[ -f "$pidfile" ]] && alive "$(cat "$pidfile")"; then
        echo "flower-deploy.sh: SuperNode $i is running (pid $(cat "$pidfile"))" >&2
        exit 2
    fi
    mkdir -p "$node/state"
    local config="partition-id=$i num-partitions=$count state-dir='$node/state'"
    if [[ -f "$node/data.jsonl" ]]; then
        config="$config data-path='$node/data.jsonl'"
    fi
    if [[ "${FLEXMOE_AUDIT:-}" == 1 ]]; then
        config="$config audit-dir='$node/audit'"
    fi
    local auth=()
    if [[ "$use_auth" == auth ]]; then
        [[ -f "$node/key" ]] || ssh-keygen -q -t ecdsa -b 384 -N "" -C "flexmoe-node-$i" -f "$node/key"
        auth=(--auth-supernode-private-key "$node/key")
    fi
    local gpu=()
    if [[ -n "${FLEXMOE_GPUS:-}" ]]; then
        gpu=(env "CUDA_VISIBLE_DEVICES=$((i % FLEXMOE_GPUS))")
    fi
    "${gpu[@]}" flower-supernode "${node_security[@]}" "${auth[@]}" --superlink "$link" --port $((base + 1 + i)) \
        --node-config "$config" >>"$node/supernode.log" 2>&1 &
    echo $! >"$pidfile"
}

# register SuperNode $1's public key, retrying while the SuperLink starts
register_node() {
    local key="$workdir/node-$1/key.pub"
    for _ in $(seq 60); do
        if flwr supernode register "$key" flexmoe-deploy >>"$workdir/register.log" 2>&1; then
            return 0
        fi
        sleep 1
    done
    echo "flower-deploy.sh: could not register $key (see $workdir/register.log)" >&2
    exit 1
}

case "$command" in
stop)
    stop_all
    exit 0
    ;;
node)
    # shellcheck source=/dev/null
    source "$workdir/deploy.env"
    ;;
start)
    count=${3:-2}
    base=${4:-8000}
    certs=${5:-}
    use_auth=${6:-}
    if [[ "$use_auth" == auth && -z "$certs" ]]; then
        echo "flower-deploy.sh: SuperNode authentication needs TLS (give CERTS_DIR)" >&2
        exit 2
    fi
    mkdir -p "$workdir"
    printf 'count=%q\nbase=%q\ncerts=%q\nuse_auth=%q\n' "$count" "$base" "$certs" "$use_auth" >"$workdir/deploy.env"
    ;;
*)
    echo "flower-deploy.sh: unknown command '$command' (start, node or stop)" >&2
    exit 2
    ;;
esac

link="127.0.0.1:$base"
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
if [[ "$use_auth" == auth ]]; then
    link_security+=(--enable-supernode-auth)
fi

if [[ "$command" == node ]]; then
    start_node "$3"
    echo "SuperNode $3 started; log in $workdir/node-$3/supernode.log"
    exit 0
fi

flower-superlink "${link_security[@]}" --host 127.0.0.1 --port "$base" --database "$workdir/superlink.db" \
    >"$workdir/superlink.log" 2>&1 &
echo $! >"$workdir/superlink.pid"

# the connection `flwr` uses (replacing an older one of the same name)
flwr_home=${FLWR_HOME:-$HOME/.flwr}
mkdir -p "$flwr_home"
touch "$flwr_home/config.toml"
awk '/^\[/ { skip = ($0 == "[superlink.flexmoe-deploy]") } !skip' "$flwr_home/config.toml" >"$flwr_home/config.toml.tmp"
printf '\n[superlink.flexmoe-deploy]\naddress = "%s"\n%s\n' "$link" "$connection_security" >>"$flwr_home/config.toml.tmp"
mv "$flwr_home/config.toml.tmp" "$flwr_home/config.toml"

for ((i = 0; i < ${FLEXMOE_START_NODES:-$count}; i++)); do
    if [[ "$use_auth" == auth ]]; then
        mkdir -p "$workdir/node-$i"
        [[ -f "$workdir/node-$i/key" ]] || ssh-keygen -q -t ecdsa -b 384 -N "" -C "flexmoe-node-$i" -f "$workdir/node-$i/key"
        register_node "$i"
    fi
    start_node "$i"
done
echo "SuperLink $link and ${FLEXMOE_START_NODES:-$count} of $count SuperNodes started; logs in $workdir"
echo "submit a run:  flwr run . flexmoe-deploy --stream --run-config \"output-dir='$workdir/run'\""
echo "stop them:     $0 stop $workdir"
