#!/usr/bin/env bash
# Load test on loopback: two workers and a coordinator as separate processes, then CLIENTS
# concurrent streaming clients (`realm load`) for DURATION seconds or MAX_REQUESTS requests,
# whichever comes first. Prints requests completed, rejected (admission control) and failed,
# time to first token p50/p99, tokens/s, and each worker's and the coordinator's peak RSS.
#
#   deploy/load.sh                                  # 32 clients, 60 s, 16 tokens each
#   CLIENTS=8 DURATION=10 MAX_TOKENS=8 deploy/load.sh
#
# Other knobs: MODEL, MAX_REQUESTS (10000), MAX_ACTIVE (16), MAX_QUEUED (64), THREADS (1 per
# process). Everything listens on 127.0.0.1 only and is stopped on exit.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
CLIENTS="${CLIENTS:-32}"
DURATION="${DURATION:-60}"
MAX_TOKENS="${MAX_TOKENS:-16}"
MAX_REQUESTS="${MAX_REQUESTS:-10000}"
MAX_ACTIVE="${MAX_ACTIVE:-16}"
MAX_QUEUED="${MAX_QUEUED:-64}"
THREADS="${THREADS:-1}"
MODEL="${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"

cargo build --release --quiet --bin realm-worker --bin realm-coordinator --bin realm
bin="$root/target/release"
work="$(mktemp -d)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# Starts a server in the background; its stdout goes to $work/$1.out.
launch() {
    local name="$1"
    shift
    "$@" >"$work/$name.out" 2>"$work/$name.err" &
    pids+=("$!")
}

# Waits for `<bin> listening on ADDR` in $work/$1.out and prints ADDR.
address_of() {
    local name="$1" line=""
    for _ in $(seq 1 600); do
        line="$(grep -m1 'listening on ' "$work/$name.out" 2>/dev/null || true)"
        if [[ -n "$line" ]]; then
            echo "${line##* }"
            return
        fi
        sleep 0.1
    done
    echo "load: $name did not start:" >&2
    cat "$work/$name.err" >&2
    exit 1
}

peak_rss_mib() {
    awk '/VmHWM/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"
}

launch worker1 "$bin/realm-worker" --listen 127.0.0.1:0 --model "$MODEL" --threads "$THREADS"
worker1_pid="${pids[-1]}"
launch worker2 "$bin/realm-worker" --listen 127.0.0.1:0 --model "$MODEL" --threads "$THREADS"
worker2_pid="${pids[-1]}"
w1="$(address_of worker1)"
w2="$(address_of worker2)"
launch coordinator env REALM_THREADS="$THREADS" "$bin/realm-coordinator" serve --model "$MODEL" \
    --listen 127.0.0.1:0 --worker "$w1" --worker "$w2" \
    --max-active "$MAX_ACTIVE" --max-queued "$MAX_QUEUED"
coordinator_pid="${pids[-1]}"
c="$(address_of coordinator)"

echo "load: $CLIENTS clients, ${DURATION}s or $MAX_REQUESTS requests, $MAX_TOKENS tokens each," \
    "max-active $MAX_ACTIVE, max-queued $MAX_QUEUED, $THREADS thread(s) per process" >&2
status=0
"$bin/realm" --coordinator "http://$c" load --clients "$CLIENTS" --duration-secs "$DURATION" \
    --max-requests "$MAX_REQUESTS" --max-tokens "$MAX_TOKENS" || status=$?
echo "peak RSS: worker 1 $(peak_rss_mib "$worker1_pid") MiB, worker 2 $(peak_rss_mib "$worker2_pid") MiB," \
    "coordinator $(peak_rss_mib "$coordinator_pid") MiB"
exit "$status"
