#!/usr/bin/env bash
# A two-node Ray cluster on 127.0.0.1 with fake GPUs, for the scale-out tests and benchmark.
#
# Why: the ray backend of scripts/dispatch.py is tested through the real Jobs API (the head's
# dashboard serves it), not a mock. A head and a second node run on this machine, each declaring
# NGPUS GPUs (`--num-gpus`), so a job submitted with entrypoint_num_gpus=1 gets its own GPU id in
# CUDA_VISIBLE_DEVICES as on a real cluster. Lean on a shared 2-core box: one CPU per node, small
# object store. Everything Ray writes goes under RAY_LOCAL_ROOT (HOME and --temp-dir), and `down`
# stops exactly the processes started from that folder.
#
# Usage:
#     bash scripts/cluster/ray_local.sh up      # start head and worker node, wait for both
#     export RAY_ADDRESS=http://127.0.0.1:8265
#     bash scripts/cluster/ray_local.sh down
# Environment: RAY_LOCAL_ROOT (default /tmp/autoresearch-ray), NGPUS per node (2),
# RAY_LOCAL_PORT (GCS, 6390), RAY_LOCAL_DASHBOARD_PORT (Jobs API, 8265), RAY (the ray CLI, default
# .venv/bin/ray of this repository when it exists, else ray on PATH), RAY_LOCAL_ATTEMPTS (starts
# tried before giving up, 5).
set -euo pipefail
ROOT=${RAY_LOCAL_ROOT:-/tmp/autoresearch-ray}
NGPUS=${NGPUS:-2}
PORT=${RAY_LOCAL_PORT:-6390}
DASHBOARD_PORT=${RAY_LOCAL_DASHBOARD_PORT:-8265}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
RAY=${RAY:-$([ -x "$REPO/.venv/bin/ray" ] && echo "$REPO/.venv/bin/ray" || echo ray)}
# Ray's own temp dirs must stay short: it names Unix sockets after them (107-byte limit). Each node
# has its own, as on separate machines: two nodes sharing one unpack a job's working_dir into the
# same folder, and the second node's agent, not knowing the package, deletes and re-unpacks it
# under a job the first node has just started (its driver then has no working directory).
TEMP=$ROOT/t
WORKER_TEMP=$ROOT/w

ray_pids() {  # every process of ours: the two sessions `up` started, and whatever names our folders
    local sessions stat pid
    sessions=" $(cat "$ROOT"/*.pid 2>/dev/null | tr '\n' ' ') "
    for stat in /proc/[0-9]*/stat; do
        pid=${stat#/proc/}; pid=${pid%/stat}
        { read -r -a fields <"$stat"; } 2>/dev/null || continue
        # Ray renames its agents (their command line and environment are overwritten), so the
        # session id (field 6) is what still ties them to `ray start`; job drivers run in sessions
        # of their own, but keep our HOME in their environment.
        if [[ "$sessions" == *" ${fields[5]} "* ]] ||
           { tr '\0' '\n' <"/proc/$pid/cmdline"; tr '\0' '\n' <"/proc/$pid/environ"; } 2>/dev/null |
               grep -q -e "$TEMP" -e "$WORKER_TEMP" -e "^HOME=$ROOT/home$"; then
            echo "$pid"
        fi
    done
}

# The raylet gives its dashboard agent a hard-coded 15 s to write the agent's listen-port file
# (Ray 2.60: `ray start` hands the raylet every other agent port, but not this one, and the raylet
# skips the wait only when it has all of them: NodeManager::WaitForDashboardAgentPorts in the
# raylet binary), and then aborts the node; on this box the agent has taken 25-30 s to get there. The listen port is fixed here, so the file's content is known: write it for the
# raylet as soon as the raylet is up. The agent, when it is up, writes the same number again.
answer_listen_port() {  # $1: the node's --dashboard-agent-grpc-port, $2: its listen port, $3: its temp dir
    local pid args session node file
    for _ in $(seq 3000); do
        pid=$(pgrep -f -- "raylet/raylet .*--temp_dir=$3 .*--metrics-agent-port=$1( |$)" | head -1)
        if [ -n "$pid" ] && args=$(tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null); then
            session=$(sed -n 's/^--session_dir=//p' <<<"$args")
            node=$(sed -n 's/^--node_id=//p' <<<"$args")
            file=$session/dashboard_agent_listen_port_$node
            if [ -n "$session" ] && [ -n "$node" ]; then
                [ -e "$file" ] || { printf %s "$2" >"$file.$$" && mv -f "$file.$$" "$file"; }
                return 0
            fi
        fi
        sleep 0.2
    done
}

up() {
    mkdir -p "$ROOT/home" "$TEMP" "$WORKER_TEMP"
    # Ray gives its dashboard 60 s to register before `ray start` gives up; a CI box busy with
    # installs has taken longer (the dashboard imports ~10 modules, each a subprocess). Give it 5 min.
    export HOME=$ROOT/home RAY_USAGE_STATS_ENABLED=0 PATH=$(dirname "$RAY"):$PATH \
        RAY_DASHBOARD_STARTUP_TIMEOUT_S=${RAY_DASHBOARD_STARTUP_TIMEOUT_S:-300}
    # The agent ports are fixed, each node its own, so the two nodes on one machine never collide.
    # Both nodes take the address Ray itself picks for this machine: `ray start --address
    # 127.0.0.1:PORT` rewrites a loopback address to that one, so a head bound to 127.0.0.1 is
    # unreachable from the second node whenever the machine has a routed interface.
    # Ray's agents import slowly on a loaded box (25-30 s seen here), so compile Ray's modules
    # first (the set-up's `uv sync --compile-bytecode` has; a venv made otherwise may have none) and
    # import them once...
    local python site
    python="$(dirname "$(command -v "$RAY")")/python"
    [ -x "$python" ] || python=python3
    site=$("$python" -c 'import importlib.util as u; print(u.find_spec("ray").submodule_search_locations[0])' 2>/dev/null) \
        && "$python" -m compileall -q -j 0 "$site" >/dev/null 2>&1 || true
    # ...which puts those files in the page cache.
    "$python" -c 'import ray.dashboard.agent, ray.dashboard.modules.reporter.reporter_agent, ray.dashboard.modules.job.job_agent, ray.dashboard.modules.log.log_agent, ray.dashboard.modules.event.event_agent, ray.dashboard.modules.aggregator.aggregator_agent, ray._private.runtime_env.agent.main' >/dev/null 2>&1 || true
    local ip
    ip=$("$python" -c 'from ray._private.services import get_node_ip_address as g; print(g())' 2>/dev/null || echo 127.0.0.1)
    local common=(--node-ip-address "$ip" --num-cpus 1 --num-gpus "$NGPUS"
                  --object-store-memory 100000000 --disable-usage-stats)
    answer_listen_port 52375 52365 "$TEMP" &
    local answer_head=$!
    # --block keeps one supervisor per node in the foreground of its own process group.
    setsid "$RAY" start --head --block --port "$PORT" --temp-dir "$TEMP" --include-dashboard true \
        --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" "${common[@]}" \
        --dashboard-agent-listen-port 52365 --dashboard-agent-grpc-port 52375 \
        --runtime-env-agent-port 52385 --metrics-export-port 52395 \
        >"$ROOT/head.log" 2>&1 &
    echo $! >"$ROOT/head.pid"
    for _ in $(seq 720); do
        curl -sf "http://127.0.0.1:$DASHBOARD_PORT/api/version" >/dev/null 2>&1 && break
        kill -0 "$(cat "$ROOT/head.pid")" 2>/dev/null || break   # `ray start` gave up: no use waiting
        sleep 0.5
    done
    curl -sf "http://127.0.0.1:$DASHBOARD_PORT/api/version" >/dev/null || { kill $answer_head 2>/dev/null; tail -20 "$ROOT/head.log" >&2; return 1; }
    # A second node on the same machine needs its own agent ports, else its job logs fail.
    answer_listen_port 52376 52366 "$WORKER_TEMP" &
    local answer_worker=$!
    setsid "$RAY" start --block --address "$ip:$PORT" --temp-dir "$WORKER_TEMP" "${common[@]}" \
        --dashboard-agent-listen-port 52366 --dashboard-agent-grpc-port 52376 \
        --runtime-env-agent-port 52386 --metrics-export-port 52396 \
        >"$ROOT/worker.log" 2>&1 &
    echo $! >"$ROOT/worker.pid"
    local gpus=0
    for _ in $(seq 240); do
        gpus=$(curl -sf "http://127.0.0.1:$DASHBOARD_PORT/nodes?view=summary" 2>/dev/null |
               python3 -c 'import json,sys; n=json.load(sys.stdin)["data"]["summary"]; print(sum(1 for x in n if x["raylet"]["state"]=="ALIVE"))' 2>/dev/null || echo 0)
        [ "$gpus" = 2 ] && break
        kill -0 "$(cat "$ROOT/worker.pid")" 2>/dev/null && kill -0 "$(cat "$ROOT/head.pid")" 2>/dev/null || break
        sleep 0.5
    done
    kill $answer_head $answer_worker 2>/dev/null || true
    [ "$gpus" = 2 ] || { tail -20 "$ROOT/worker.log" >&2; echo "ray_local: second node did not join" >&2; return 1; }
    echo "ray up: 2 nodes x $NGPUS fake GPUs; export RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT"
}

down() {
    local pids alive pid state
    pids=$(ray_pids)
    [ -n "$pids" ] && kill $pids 2>/dev/null
    # SIGTERM gets the raylets and workers to exit, but the two `ray start --block` supervisors and
    # the GCS were still running 8 s later, their exited children left unreaped (zombies, which no
    # signal removes), and waiting for all of it took this command 18-22 s. Wait 3 s for what does
    # exit, then kill the rest: the cluster is a throw-away one.
    for _ in $(seq 15); do
        alive=""
        for pid in $pids; do
            state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || continue
            [ "$state" != Z ] && alive="$alive $pid"
        done
        [ -z "$alive" ] && break
        sleep 0.2
    done
    pids=$(ray_pids)  # again: whatever started while the first ones stopped (a job's driver)
    [ -n "$pids" ] && kill -9 $pids 2>/dev/null
    rm -f "$ROOT"/*.pid
    echo "ray down"
}

attempts() {  # on a loaded box an agent that missed the raylet's deadline once starts faster the next time
    local k
    for k in $(seq "${RAY_LOCAL_ATTEMPTS:-5}"); do
        up && return 0
        echo "ray_local: start $k failed; stopping it and starting again" >&2
        down
    done
    echo "ray_local: Ray did not start in ${RAY_LOCAL_ATTEMPTS:-5} attempts (logs: $TEMP/session_latest/logs, $WORKER_TEMP/session_latest/logs)" >&2
    return 1
}

case "${1:-}" in
    up) attempts ;;
    down) down ;;
    *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
