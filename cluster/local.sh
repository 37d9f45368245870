#!/usr/bin/env bash
# The path from laptop to cluster, on one machine: a real two-node Ray cluster on loopback,
# training submitted as a Ray job, serving deployed from the config file, HTTP requests, teardown;
# checkpoints and the bundle registry on an S3-compatible server on loopback, no shared directory.
#
#   cluster/local.sh            # from anywhere; uses <repo>/.venv (override: VENV_BIN=/path/bin)
#
# What it does (the same commands you run against a cloud or KubeRay head, see cluster/README.md):
#  0. a loopback S3 server (moto's standalone server, bench/kit/s3.py) with a bucket `cotrr`; its
#     endpoint and credentials are exported (AWS_ENDPOINT_URL etc.) before the nodes start, so every
#     Ray process inherits them, as pods inherit them from a secret on a real cluster;
#  1. `ray start --head` (1 CPU, resource {"head": 1}, label cotrr-role=head) and a second node
#     `ray start --address ...` (2 CPUs, resource {"worker": 1}, label cotrr-role=worker), each
#     with --node-ip-address 127.0.0.1, its own free ports and this run's own --temp-dir, so it
#     never touches another Ray instance on the host (no `ray stop`: that kills every Ray process
#     of the user), and each with its own bundle cache (COTRR_BUNDLE_CACHE=<out>/cache-<node>);
#  2. the training data written to the object store as Parquet (s3://cotrr/datasets/demo-300); a
#     check that two Train workers on two nodes read disjoint shards of it through the job's Ray Data
#     path (`localctl.py shards`: the query ids each saw); then `ray job submit --working-dir . --
#     python train_job.py --config configs/demo.yaml ...` with tiny overrides, the data read from
#     S3, and 2 Ray Train workers placed one per node (STRICT_SPREAD): DDP really spans both nodes;
#     checkpoints go to s3://cotrr/registry/_runs and the bundle is published to
#     s3://cotrr/registry/demo with `--alias production`;
#  3. `serve deploy` of serve_config.yaml (a copy serving s3://cotrr/registry/demo@production, HTTP
#     on 127.0.0.1, the Router and Calibrator pinned to the head node and the Scorer to the worker
#     node by label); waits until the app is RUNNING and prints `serve status`;
#  4. HTTP requests to 127.0.0.1:<serve port>; the registry, the checkpoints and both nodes' caches
#     are checked (each node downloaded the bundle from S3); which actors ran on which node;
#  5. a trap on EXIT kills exactly the process groups it started (the two nodes, then S3).
#
# Token authentication: the cluster always runs with RAY_AUTH_MODE=token and a fresh token written
# to this run's temp dir (RAY_AUTH_TOKEN_PATH); every `ray`/`serve` CLI call and the Python
# clients inherit both variables. We do not rely on ~/.ray/auth_token: `ray start --head` turns
# auth on only if that file exists, so a laptop and a fresh container would behave differently,
# and the file may belong to other clusters on the host. `RAY_AUTH_MODE=disabled cluster/local.sh`
# opts out (dev only).
#
# Environment knobs: SERVE_PORT (default 8000; if busy, a free port is used instead),
# COTRR_LOCAL_OUT (default artifacts/cluster-local/<run id>: the driver's data cache, the nodes'
# bundle caches, logs), KEEP_RAY_TMP=1 (keep the Ray temp dir and its logs after a successful run).
# The S3 server keeps its objects in memory: they go with it at teardown.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
VENV_BIN="${VENV_BIN:-$REPO/.venv/bin}"
export PATH="$VENV_BIN:$PATH"   # the nodes' job drivers and workers use this python too
PY="$VENV_BIN/python"
CTL=("$PY" "$REPO/cluster/localctl.py")
# Never attach to someone else's cluster through the environment.
unset RAY_ADDRESS RAY_API_SERVER_ADDRESS RAY_DASHBOARD_ADDRESS RAY_AUTH_TOKEN
export RAY_USAGE_STATS_ENABLED=0
# On SIGTERM a Ray 2.60 node first asks the GCS to drain it (for up to 30 s, meant for k8s pod
# deletion during a RayService upgrade). For a throwaway local cluster, stop at once.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0

T0=$SECONDS
step() { printf '\n== [%3ds] %s\n' "$((SECONDS - T0))" "$*"; }

RUN_ID="$(date +%Y%m%d-%H%M%S)-$$"
OUT="${COTRR_LOCAL_OUT:-$REPO/artifacts/cluster-local/$RUN_ID}"
mkdir -p "$OUT/logs"
OUT="$(cd "$OUT" && pwd)"
# Short path: Ray's Unix sockets live under it (108-byte limit).
RAY_TMP="$(mktemp -d /tmp/cotrr-ray-XXXXXX)"

# ------------------------------------------------------------------------------------ teardown
NODE_PGIDS=()   # process groups of the nodes we started (worker first at teardown)
S3_PGID=""      # the loopback S3 server's process group (stopped after the nodes)
teardown() {
    local rc=$?
    trap - EXIT INT TERM
    step "teardown (exit status so far: $rc)"
    local i pgid pid
    # Worker node first, then the head: SIGTERM to each `ray start --block` (the group leader),
    # which stops its node's processes (drain disabled below, so no 30 s wait); then whatever is
    # left in the node's process group gets SIGTERM, and SIGKILL 5 s later.
    for ((i = ${#NODE_PGIDS[@]} - 1; i >= 0; i--)); do
        pgid="${NODE_PGIDS[$i]}"
        pgrep -g "$pgid" >/dev/null || continue
        echo "  stopping node process group $pgid ($(pgrep -g "$pgid" | wc -l) processes)"
        kill -TERM "$pgid" 2>/dev/null || true
        for _ in $(seq 1 20); do pgrep -g "$pgid" >/dev/null || break; sleep 1; done
        if pgrep -g "$pgid" >/dev/null; then
            kill -TERM -- "-$pgid" 2>/dev/null || true
            for _ in $(seq 1 5); do pgrep -g "$pgid" >/dev/null || break; sleep 1; done
        fi
        if pgrep -g "$pgid" >/dev/null; then
            echo "  SIGKILL to what is left of process group $pgid"
            kill -KILL -- "-$pgid" 2>/dev/null || true
        fi
    done
    if [[ -n "$S3_PGID" ]] && pgrep -g "$S3_PGID" >/dev/null; then
        echo "  stopping the loopback S3 server (process group $S3_PGID)"
        kill -TERM -- "-$S3_PGID" 2>/dev/null || true
        for _ in $(seq 1 10); do pgrep -g "$S3_PGID" >/dev/null || break; sleep 1; done
        if pgrep -g "$S3_PGID" >/dev/null; then kill -KILL -- "-$S3_PGID" 2>/dev/null || true; fi
    fi
    # Anything of this cluster that left those process groups: only processes whose command line
    # names this run's temp dir (unique to this run), each killed by its PID.
    for pid in $(grep -lsF -- "$RAY_TMP" /proc/[0-9]*/cmdline 2>/dev/null | cut -d/ -f3); do
        [[ "$pid" == "$$" ]] && continue
        grep -qsF -- "$RAY_TMP" "/proc/$pid/cmdline" || continue   # gone (e.g. that grep itself)
        echo "  SIGKILL to straggler $pid: $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | cut -c1-100)"
        kill -KILL "$pid" 2>/dev/null || true
    done
    if ((rc == 0)) && [[ -z "${KEEP_RAY_TMP:-}" ]]; then
        rm -rf "$RAY_TMP"
    else
        echo "  Ray logs kept: $RAY_TMP/session_latest/logs"
    fi
    echo "  artifacts: $OUT"
    echo "== local.sh finished with status $rc after $((SECONDS - T0)) s"
    exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------- auth, ports
if [[ "${RAY_AUTH_MODE:-token}" != "disabled" ]]; then
    export RAY_AUTH_MODE=token
    export RAY_AUTH_TOKEN_PATH="$RAY_TMP/auth_token"
    (umask 077 && "$PY" -c 'import secrets; print(secrets.token_hex(32), end="")' >"$RAY_AUTH_TOKEN_PATH")
fi

read -r GCS_PORT DASH_PORT CLIENT_PORT HEAD_AGENT_PORT WORKER_AGENT_PORT HEAD_METRICS_PORT WORKER_METRICS_PORT S3_PORT \
    <<<"$("${CTL[@]}" ports 8)"
SERVE_PORT="${SERVE_PORT:-8000}"
if ! "${CTL[@]}" port-free "$SERVE_PORT"; then
    busy="$SERVE_PORT"
    read -r SERVE_PORT <<<"$("${CTL[@]}" ports 1)"
    echo "port $busy is in use on this host (another Serve?); serving on $SERVE_PORT instead"
fi
GCS="127.0.0.1:$GCS_PORT"
DASH="http://127.0.0.1:$DASH_PORT"

step "run $RUN_ID: auth=$RAY_AUTH_MODE, GCS $GCS, dashboard $DASH, serve :$SERVE_PORT, temp dir $RAY_TMP"

# ------------------------------------------------------------------------------ object storage
BUCKET=cotrr
REGISTRY="s3://$BUCKET/registry"
step "loopback S3 server (moto) on 127.0.0.1:$S3_PORT, bucket $BUCKET"
setsid "$PY" bench/kit/s3.py --port "$S3_PORT" --bucket "$BUCKET" --log "$OUT/logs/s3-server.log" \
    >"$OUT/logs/s3.log" 2>&1 &
S3_PGID=$!
for _ in $(seq 1 60); do
    grep -qs "loopback S3 on" "$OUT/logs/s3.log" && break
    kill -0 "$S3_PGID" 2>/dev/null || { cat "$OUT/logs/s3.log" >&2; echo "S3 server exited" >&2; exit 1; }
    sleep 1
done
grep -qs "loopback S3 on" "$OUT/logs/s3.log" || { echo "S3 server did not start within 60 s" >&2; exit 1; }
sed 's/^/  /' "$OUT/logs/s3.log"
# The client side: endpoint + credentials, inherited by the nodes (and so by every job driver,
# Train worker and Serve replica) and by the CLI calls below.
eval "$("$PY" bench/kit/s3.py --port "$S3_PORT" --print-env)"

# --------------------------------------------------------------------------------------- nodes
# `ray start --block` in its own session (setsid): the node's processes (GCS, raylet, dashboard,
# workers, Serve actors) are all in that process group, which is what teardown stops.
# Note: Ray 2.60 rewrites `--node-ip-address 127.0.0.1` to the host's primary address
# (services.resolve_ip_for_localhost: "make sure localhost isn't resolved to the loopback ip"), so
# the nodes talk to each other on that address, which never leaves the host. Everything this
# script sends (job submission, serve deploy, HTTP) goes to 127.0.0.1, where the dashboard and the
# Serve proxies listen.
start_node() {   # start_node NAME ray-start-args...
    local name="$1"; shift
    COTRR_BUNDLE_CACHE="$OUT/cache-$name" setsid "$VENV_BIN/ray" start --block --disable-usage-stats --node-ip-address 127.0.0.1 \
        --temp-dir "$RAY_TMP" --num-gpus 0 --object-store-memory 268435456 "$@" \
        >"$OUT/logs/$name.log" 2>&1 &
    local pid=$!
    NODE_PGIDS+=("$pid")
    for _ in $(seq 1 180); do
        if grep -qs "Ray runtime started" "$OUT/logs/$name.log"; then
            echo "  $name node up (process group $pid), log $OUT/logs/$name.log"
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 30 "$OUT/logs/$name.log"
            echo "$name node exited during start" >&2
            return 1
        fi
        sleep 1
    done
    echo "$name node did not start within 180 s" >&2
    return 1
}

step "start the head node (1 CPU, {head: 1}, label cotrr-role=head)"
start_node head --head --port "$GCS_PORT" --num-cpus 1 --resources '{"head": 1}' --labels cotrr-role=head \
    --dashboard-host 127.0.0.1 --dashboard-port "$DASH_PORT" --ray-client-server-port "$CLIENT_PORT" \
    --dashboard-agent-listen-port "$HEAD_AGENT_PORT" --metrics-export-port "$HEAD_METRICS_PORT"

step "start the worker node (2 CPUs, {worker: 1}, label cotrr-role=worker)"
start_node worker --address "$GCS" --num-cpus 2 --resources '{"worker": 1}' --labels cotrr-role=worker \
    --dashboard-agent-listen-port "$WORKER_AGENT_PORT" --metrics-export-port "$WORKER_METRICS_PORT"

"${CTL[@]}" wait-nodes --address "$GCS" --count 2 --timeout 120

# ------------------------------------------------------------------------------------ training
DATASET="s3://$BUCKET/datasets/demo-300"
step "the training data on the object store: 300 synthetic queries as Parquet -> $DATASET"
python -m cotrr_ray.data.synthetic --format parquet --shards 3 --queries 300 --output "$DATASET" --overwrite \
    | sed 's/^/  /'

step "two Train workers on two nodes read disjoint shards of $DATASET (the job's Ray Data path)"
"${CTL[@]}" shards --address "$GCS" --dataset "$DATASET" --storage "$REGISTRY/_runs"

step "ray job submit: train_job.py on 2 Ray Train workers, one per node, reading $DATASET -> $REGISTRY/demo (@production)"
# Data, checkpoints (storage_path defaults to <registry>/_runs) and the bundle are all on the object
# store: nothing the job needs is on the driver's disk. STRICT_SPREAD puts one worker on each node,
# so DDP really spans both; each streams its own shard through Ray Data (data.cache_max_mb=0).
ray job submit --address "$DASH" --working-dir . --submission-id "cotrr-train-$RUN_ID" \
    --runtime-env-json '{"env_vars": {"OMP_NUM_THREADS": "1"}}' \
    -- python train_job.py --config configs/demo.yaml --output "$REGISTRY/demo" --alias production \
    data.format=parquet "data.path=$DATASET" data.cache_max_mb=0 optim.max_epochs=2 model.d_model=64 \
    optim.amp=none scaling.num_workers=2 scaling.cpus_per_worker=0.5 scaling.placement_strategy=STRICT_SPREAD \
    "scaling.run_name=local-$RUN_ID" bootstrap_samples=200 >"$OUT/logs/train-job.log" 2>&1 || true
# The driver's own output (the worker lines are in the log file).
grep -vE "RayTrainWorker|PreemptionWatcher|packaging.py|working_dir.py|^\s*$" "$OUT/logs/train-job.log" \
    | sed -n '/submitted successfully/,$p' | tail -n 22 | sed 's/^/  /'
ray job status --address "$DASH" "cotrr-train-$RUN_ID" >"$OUT/logs/train-job-status.log" 2>&1 || true
if ! grep -qiE "succeeded" "$OUT/logs/train-job-status.log"; then
    cat "$OUT/logs/train-job-status.log" >&2
    echo "training job did not succeed (log: $OUT/logs/train-job.log)" >&2
    exit 1
fi
echo "  ray job status: $(grep -oiE "Job .* succeeded" "$OUT/logs/train-job-status.log" | head -n 1)"
BUNDLE_ID="$("${CTL[@]}" last-bundle --log "$OUT/logs/train-job.log")"
echo "  published $REGISTRY/demo/$BUNDLE_ID"
python -m cotrr_ray.registry list "$REGISTRY/demo" | sed 's/^/  /'

# ------------------------------------------------------------------------------------- serving
SERVE_CFG="$OUT/serve_config.local.yaml"
"${CTL[@]}" serve-config --src serve_config.yaml --dst "$SERVE_CFG" --bundle "$REGISTRY/demo@production" --port "$SERVE_PORT"
step "serve deploy $SERVE_CFG (serve_config.yaml serving $REGISTRY/demo@production, 127.0.0.1:$SERVE_PORT, placement labels)"
serve deploy "$SERVE_CFG" --address "$DASH"
"${CTL[@]}" wait-serve --dashboard "$DASH" --app rerank --timeout 300
serve status --address "$DASH" | sed 's/^/  /'

step "HTTP requests to 127.0.0.1:$SERVE_PORT"
"${CTL[@]}" requests --port "$SERVE_PORT" --expect-id "$BUNDLE_ID" --n 3

step "object storage: registry, checkpoints, and the bundle in each node's cache"
"${CTL[@]}" storage --registry "$REGISTRY" --model demo --bundle-id "$BUNDLE_ID" \
    --cache "$OUT/cache-head" --cache "$OUT/cache-worker"

step "where the work ran (ray state API: actors per node) and ray status"
"${CTL[@]}" placement --address "$GCS"
ray status --address "$GCS" | sed -n '/^Node status/,/^From request_resources/p' | sed 's/^/  /'
step "all steps passed"
