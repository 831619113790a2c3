#!/usr/bin/env bash
# Runs the reference engine's llama-bench and Realm's benchmark alternately on the project models,
# on the same machine in the same run, and prints Realm's figures beside the reference's with the
# ratios. The reference is never vendored: point LLAMA_CPP_BIN at a folder holding a llama-bench
# you built yourself.
#
#   LLAMA_CPP_BIN=/path/to/llama.cpp/build/bin deploy/bench-vs-reference.sh
#
# Environment: THREADS (2), ROUNDS (2: each engine runs this many times, interleaved; the best
# run counts), WORKERS (Realm's worker counts, "0,2"), MODELS (GGUF files, space-separated; the
# two project models by default).
#
# Where the folder also holds ggml-rpc-server, the reference runs a second way too: its layers
# split over two RPC servers on loopback (one thread each), the counterpart of Realm's two
# workers, and Realm's worker figures are set beside that.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="${LLAMA_CPP_BIN:?set LLAMA_CPP_BIN to a folder holding llama-bench}"
threads="${THREADS:-2}"
rounds="${ROUNDS:-2}"
workers="${WORKERS:-0,2}"
[[ -x "$bin/llama-bench" ]] || { echo "bench-vs-reference: no llama-bench in $bin" >&2; exit 1; }

cd "$root"
cargo build --release --quiet --bin realm-coordinator
realm="$root/target/release/realm-coordinator"
out="$(mktemp -d)"
rpc_pids=()
trap 'kill "${rpc_pids[@]}" 2>/dev/null; rm -rf "$out"' EXIT

rpc=""
if [[ -x "$bin/ggml-rpc-server" ]]; then
    for port in 50061 50062; do
        "$bin/ggml-rpc-server" -H 127.0.0.1 -p "$port" -t 1 >/dev/null 2>&1 &
        rpc_pids+=("$!")
    done
    rpc="127.0.0.1:50061,127.0.0.1:50062"
    sleep 1
fi

models="${MODELS:-models/SmolLM2-135M-Instruct.Q4_1.gguf models/gemma-3-270m-q4_k_m.gguf}"
for model in $models; do
    [[ -f "$model" ]] || { echo "bench-vs-reference: $model missing: run deploy/fetch-models.sh" >&2; exit 1; }
    name="$(basename "$model" .gguf)"
    for round in $(seq "$rounds"); do
        "$bin/llama-bench" -m "$model" -p 128 -n 64 -t "$threads" -r 3 -o json 2>/dev/null \
            > "$out/$name.reference.$round.json"
        if [[ -n "$rpc" ]]; then
            "$bin/llama-bench" -m "$model" -p 128 -n 64 -r 3 --rpc "$rpc" -o json 2>/dev/null \
                > "$out/$name.rpc.$round.json"
        fi
        "$realm" --threads "$threads" bench --model "$model" --workers "$workers" \
            --prompt-tokens 128 --gen-tokens 64 --json 2>/dev/null > "$out/$name.realm.$round.jsonl"
    done
done

python3 - "$out" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
names = sorted({os.path.basename(p).split(".reference.")[0] for p in glob.glob(f"{out}/*.reference.*.json")})

def best(kind, name):
    pp = tg = 0.0
    for path in glob.glob(f"{out}/{name}.{kind}.*.json"):
        for row in json.load(open(path)):
            if row["n_prompt"] and not row["n_gen"]:
                pp = max(pp, row["avg_ts"])
            elif row["n_gen"] and not row["n_prompt"]:
                tg = max(tg, row["avg_ts"])
    return pp, tg

print(f"{'model':34} {'engine':28} {'prefill tok/s':>14} {'decode tok/s':>13} {'prefill ×':>10} {'decode ×':>9}")
for name in names:
    pp, tg = best("reference", name)
    rpc_pp, rpc_tg = best("rpc", name)
    print(f"{name:34} {'reference':28} {pp:14.1f} {tg:13.1f}")
    if rpc_tg:
        print(f"{'':34} {'reference, 2 RPC servers':28} {rpc_pp:14.1f} {rpc_tg:13.1f}")
    best_realm = {}
    for path in glob.glob(f"{out}/{name}.realm.*.jsonl"):
        for line in open(path):
            r = json.loads(line)
            b = best_realm.setdefault(r["workers"], {"prefill_tps": 0.0, "decode_tps": 0.0})
            b["prefill_tps"] = max(b["prefill_tps"], r["prefill_tps"])
            b["decode_tps"] = max(b["decode_tps"], r["decode_tps"])
    for workers, b in sorted(best_realm.items()):
        # Workers compare with the reference split over RPC servers where it ran.
        ref_pp, ref_tg = (rpc_pp, rpc_tg) if workers and rpc_tg else (pp, tg)
        label = "realm, single process" if workers == 0 else f"realm, {workers} workers"
        print(f"{'':34} {label:28} {b['prefill_tps']:14.1f} {b['decode_tps']:13.1f} "
              f"{b['prefill_tps'] / ref_pp:10.2f} {b['decode_tps'] / ref_tg:9.2f}")
PY
