#!/usr/bin/env bash
# Serving benchmark: concurrent streaming clients over the OpenAI-compatible HTTP API
# (`realm-coordinator bench --concurrency`), against a Realm cluster of processes on loopback in
# three shapes (1 worker with 2 threads; 1 worker with 1 thread; 2 workers with 1 thread each,
# set against the one-thread single worker) and, when LLAMA_CPP_BIN is
# set, against the reference engine's llama-server driven by the same client with the same
# prompts. The engines alternate over ROUNDS rounds in the same run; the table gives the medians
# over rounds, with Realm's aggregate tokens/s over the reference's and Realm's 2 workers over 1.
# The reference is never vendored: point LLAMA_CPP_BIN at a folder holding a llama-server you
# built yourself.
#
#   deploy/bench-serving.sh
#   LLAMA_CPP_BIN=/path/to/llama.cpp/build/bin deploy/bench-serving.sh
#
# Environment: MODEL (SmolLM2), ROUNDS (2), CONCURRENCY ("1,4,16"), REQUESTS (requests per
# client, 4), GEN_TOKENS (max_tokens, 64), COORDINATOR_THREADS (2), LONG_PROMPT_TOKENS (unset:
# none; e.g. 2000 injects one long prompt into every load once all clients stream, and adds its
# time to first token and the streams' inter-token p50/p99 during its prefill), ENGINES
# ("realm,reference": leave one out to measure only the other), OUT_DIR (unset: a temporary folder;
# else the folder that keeps every run's JSON lines and llama-server's logs).
#
# llama-server runs with `-np` slots (the highest concurrency, one more with a long prompt so it
# never waits for a slot) and -c 4096 per slot: with an explicit -np this llama.cpp splits -c
# evenly over the slots (its unified KV buffer is on only when the slot count is automatic), and
# --no-cache-prompt: the 16 prompts recur, and with its prompt cache on, a request whose prompt a
# slot saw before prefills one token (Realm has no prompt cache; both do the same work this way).
# Everything listens on 127.0.0.1 only and is stopped on exit.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
model="${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
rounds="${ROUNDS:-2}"
concurrency="${CONCURRENCY:-1,4,16}"
requests="${REQUESTS:-4}"
gen_tokens="${GEN_TOKENS:-64}"
coordinator_threads="${COORDINATOR_THREADS:-2}"
long_prompt="${LONG_PROMPT_TOKENS:-}"
engines="${ENGINES:-realm,reference}"
ctx_per_slot=4096
[[ -f "$model" ]] || { echo "bench-serving: $model missing: run deploy/fetch-models.sh" >&2; exit 1; }

reference=""
if [[ -n "${LLAMA_CPP_BIN:-}" && ",$engines," == *",reference,"* ]]; then
    reference="$LLAMA_CPP_BIN/llama-server"
    [[ -x "$reference" ]] || { echo "bench-serving: no llama-server in $LLAMA_CPP_BIN" >&2; exit 1; }
    command -v curl >/dev/null || { echo "bench-serving: needs curl to wait for llama-server" >&2; exit 1; }
    export LD_LIBRARY_PATH="$LLAMA_CPP_BIN${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
with_realm=""
[[ ",$engines," == *",realm,"* ]] && with_realm=1

cargo build --release --quiet --bin realm-coordinator --bin realm-worker
realm="$root/target/release/realm-coordinator"
out="${OUT_DIR:-$(mktemp -d)}"
mkdir -p "$out"
server_pid=""
cleanup() {
    [[ -n "$server_pid" ]] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
    [[ -n "${OUT_DIR:-}" ]] || rm -rf "$out"
}
trap cleanup EXIT

load_args=(--concurrency "$concurrency" --requests-per-client "$requests" --gen-tokens "$gen_tokens" --json)
[[ -n "$long_prompt" ]] && load_args+=(--long-prompt-tokens "$long_prompt")
slots="$(tr ',' '\n' <<<"$concurrency" | sort -n | tail -1)"
[[ -n "$long_prompt" ]] && slots=$((slots + 1))

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# One round of the reference: a fresh llama-server, driven by the same client, then stopped.
run_reference() {
    local round="$1" port
    port="$(free_port)"
    "$reference" -m "$model" -np "$slots" -c $((slots * ctx_per_slot)) -t 2 --no-cache-prompt \
        --host 127.0.0.1 --port "$port" --no-webui >"$out/llama-server.$round.log" 2>&1 &
    server_pid="$!"
    for _ in $(seq 1 300); do
        curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
        kill -0 "$server_pid" 2>/dev/null || { cat "$out/llama-server.$round.log" >&2; exit 1; }
        sleep 0.2
    done
    "$realm" bench --server "http://127.0.0.1:$port" "${load_args[@]}" >"$out/reference.$round.jsonl"
    kill "$server_pid"
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
}

echo "bench-serving: $(basename "$model"), concurrency $concurrency, $requests requests per client," \
    "$gen_tokens tokens each, $rounds rounds; load average before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
for round in $(seq "$rounds"); do
    if [[ -n "$reference" ]]; then
        echo "bench-serving: $(date +%T) round $round: llama-server" >&2
        run_reference "$round"
    fi
    if [[ -n "$with_realm" ]]; then
        echo "bench-serving: $(date +%T) round $round: realm" >&2
        "$realm" --threads 2 bench --model "$model" --workers 1 \
            --coordinator-threads "$coordinator_threads" "${load_args[@]}" >"$out/realm1.$round.jsonl"
        "$realm" --threads 1 bench --model "$model" --workers 1 \
            --coordinator-threads "$coordinator_threads" "${load_args[@]}" >"$out/realm1x1.$round.jsonl"
        "$realm" --threads 1 bench --model "$model" --workers 2 \
            --coordinator-threads "$coordinator_threads" "${load_args[@]}" >"$out/realm2.$round.jsonl"
    fi
done
echo "bench-serving: load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

python3 - "$out" "$slots" <<'PY'
import glob, json, os, statistics, sys
out, slots = sys.argv[1], sys.argv[2]
engines = [
    ("reference", f"llama-server -np {slots} -t 2"),
    ("realm1", "realm 1 worker x 2 threads"),
    ("realm1x1", "realm 1 worker x 1 thread"),
    ("realm2", "realm 2 workers x 1 thread"),
]
rows = {}  # (engine, concurrency) -> list of results over rounds
for kind, _ in engines:
    for path in sorted(glob.glob(f"{out}/{kind}.*.jsonl")):
        for line in open(path):
            r = json.loads(line)
            rows.setdefault((kind, r["concurrency"]), []).append(r)

def median(results, *keys):
    values = []
    for r in results:
        v = r
        for k in keys:
            v = v.get(k) if isinstance(v, dict) else None
        if v is not None:
            values.append(v)
    return statistics.median(values) if values else None

def fmt(v, width, digits=1):
    return f"{'n/a':>{width}}" if v is None else f"{v:{width}.{digits}f}"

long = any(r.get("long_prompt") for results in rows.values() for r in results)
header = f"{'conc':>4} {'engine':28} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8}"
if long:
    header += f" {'long TTFT':>10} {'ITL@pf p50':>11} {'ITL@pf p99':>11}"
header += f" {'x ref':>6} {'x alone':>8} {'x 1 wkr':>8}"
print(header)
failed = {}
# Each engine's single stream, for its throughput under load over its own alone.
alone = {kind: median(rows.get((kind, 1), []), "tokens_per_s") for kind, _ in engines}
for conc in sorted({c for _, c in rows}):
    tps = {}
    for kind, label in engines:
        results = rows.get((kind, conc))
        if not results:
            continue
        failed[label] = failed.get(label, 0) + sum(r["failed"] for r in results)
        tps[kind] = median(results, "tokens_per_s")
        line = (f"{conc:>4} {label:28} {fmt(tps[kind], 8)} {fmt(median(results, 'ttft_p50_ms'), 9)} "
                f"{fmt(median(results, 'ttft_p99_ms'), 9)} {fmt(median(results, 'itl_p50_ms'), 8)} "
                f"{fmt(median(results, 'itl_p99_ms'), 8)}")
        if long:
            line += (f" {fmt(median(results, 'long_prompt', 'ttft_ms'), 10, 0)}"
                     f" {fmt(median(results, 'long_prompt', 'itl_p50_ms'), 11)}"
                     f" {fmt(median(results, 'long_prompt', 'itl_p99_ms'), 11)}")
        ref = tps.get("reference")
        ratio = tps[kind] / ref if kind != "reference" and ref else None
        per_worker = tps[kind] / tps["realm1x1"] if kind == "realm2" and tps.get("realm1x1") else None
        over_alone = tps[kind] / alone[kind] if alone.get(kind) else None
        line += f" {fmt(ratio, 6, 2)} {fmt(over_alone, 8, 2)} {fmt(per_worker, 8, 2)}"
        print(line)
print("(medians over rounds; times in ms; tok/s: all completion tokens over the wall time;"
      " x ref: Realm tok/s over llama-server's; x alone: over the same engine's single stream;"
      " x 1 wkr: 2 workers over 1 worker, one thread each"
      + ("; ITL@pf: the streams' gaps during the long prompt's prefill" if long else "") + ")")
for label, n in failed.items():
    if n:
        errors = {r["first_error"] for (kind, _), results in rows.items() for r in results
                  if r.get("first_error") and dict(engines)[kind] == label}
        print(f"bench-serving: {label}: {n} requests failed; first errors: {sorted(errors)}",
              file=sys.stderr)
PY
