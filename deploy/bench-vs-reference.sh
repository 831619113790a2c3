#!/usr/bin/env bash
# Runs the reference engine's llama-bench and Realm's benchmark alternately on the project models,
# on the same machine in the same run, and prints Realm's figures beside the reference's with the
# ratios: medians over the rounds, with the spread (min–max) of the ratios taken round by round.
# The reference is never vendored: point LLAMA_CPP_BIN at a folder holding a llama-bench you
# built yourself.
#
#   LLAMA_CPP_BIN=/path/to/llama.cpp/build/bin deploy/bench-vs-reference.sh
#
# Environment: THREADS (2), ROUNDS (3: each engine runs this many times, interleaved), WORKERS
# (Realm's worker counts, "0,2"), MODELS (GGUF files, space-separated; the two project models by
# default).
#
# Where the folder also holds ggml-rpc-server, the reference runs a second way too: its layers
# split over two RPC servers on loopback (one thread each), the counterpart of Realm's two
# workers, and Realm's worker figures are set beside that; Realm's two-worker decode is also
# given over its own single-process decode of the same round (the cost of the hops).
#
# Where it also holds llama-completion, each round measures the peak RSS of both engines
# generating 64 tokens greedily from the benchmark's prompt in one process (the reference with a
# 256-token context, as Realm's KV cache grows with the sequence).
#
# Realm's rows also give the bytes of weights a decode step reads and the share of the
# machine's read bandwidth (measured by the benchmark, same threads) that decode achieves.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="${LLAMA_CPP_BIN:?set LLAMA_CPP_BIN to a folder holding llama-bench}"
threads="${THREADS:-2}"
rounds="${ROUNDS:-3}"
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

# The benchmark's prompt text, about 130 tokens.
prompt="$(printf 'The quick brown fox jumps over the lazy dog while the river runs past the old mill, and the village wakes to the smell of bread. %.0s' 1 2 3 4 5)"

# peak_rss FILE COMMAND...: runs the command and writes its peak RSS in MiB to FILE; where the
# command fails (a synthetic vocabulary can make the prompt too long for the reference's
# 256-token context), writes nothing, says so, and the round goes on without that figure.
peak_rss() {
    local file="$1"
    shift
    if ! python3 -c '
import resource, subprocess, sys
subprocess.run(sys.argv[1:], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
               stderr=subprocess.DEVNULL, check=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)' "$@" > "$file.part" 2>/dev/null; then
        echo "bench-vs-reference: no peak RSS for $(basename "$file"): $(basename "$1") failed" >&2
        rm -f "$file.part"
        return 0
    fi
    mv "$file.part" "$file"
}

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
        if [[ -x "$bin/llama-completion" ]]; then
            peak_rss "$out/$name.rss.reference.$round" "$bin/llama-completion" -m "$model" \
                -p "$prompt" -n 64 --temp 0 --ignore-eos -no-cnv -t "$threads" -c 256 -b 256
            peak_rss "$out/$name.rss.realm.$round" "$realm" --threads "$threads" run --workers 0 \
                --model "$model" --prompt "$prompt" --max-tokens 64
        fi
    done
done

python3 - "$out" <<'PY'
import glob, json, os, statistics, sys
out = sys.argv[1]
names = sorted({os.path.basename(p).split(".reference.")[0] for p in glob.glob(f"{out}/*.reference.*.json")})

def rounds(kind, name):
    """Per round: the reference's (prefill, decode) tok/s, mean of llama-bench's repetitions."""
    by_round = {}
    for path in glob.glob(f"{out}/{name}.{kind}.*.json"):
        r = int(path.rsplit(".", 2)[1])
        pp = tg = 0.0
        for row in json.load(open(path)):
            if row["n_prompt"] and not row["n_gen"]:
                pp = row["avg_ts"]
            elif row["n_gen"] and not row["n_prompt"]:
                tg = row["avg_ts"]
        by_round[r] = (pp, tg)
    return by_round

def realm_rounds(name):
    """Per round and worker count: Realm's result."""
    by_round = {}
    for path in glob.glob(f"{out}/{name}.realm.*.jsonl"):
        r = int(path.rsplit(".", 2)[1])
        for line in open(path):
            row = json.loads(line)
            by_round.setdefault(r, {})[row["workers"]] = row
    return by_round

def med(values):
    """Median, and the spread as min–max."""
    values = [v for v in values if v is not None]
    if not values:
        return None, ""
    return statistics.median(values), f"{min(values):.2f}–{max(values):.2f}"

def show(label, values, digits=1):
    m, spread = med(values)
    return f"{label} {m:.{digits}f} ({spread})" if m is not None else f"{label} n/a"

for name in names:
    ref, rpc, realm = rounds("reference", name), rounds("rpc", name), realm_rounds(name)
    common = sorted(set(ref) & set(realm))
    print(f"\n{name}: {len(common)} alternated rounds, median (min–max)")
    print("  reference:                " + show("prefill", [ref[r][0] for r in common])
          + ", " + show("decode", [ref[r][1] for r in common]))
    if rpc:
        print("  reference, 2 RPC servers: " + show("prefill", [rpc[r][0] for r in common if r in rpc])
              + ", " + show("decode", [rpc[r][1] for r in common if r in rpc]))
    workers = sorted({w for r in common for w in realm[r]})
    for w in workers:
        rows = [(r, realm[r][w]) for r in common if w in realm[r]]
        # Workers compare with the reference split over RPC servers where it ran.
        base = rpc if w and rpc else ref
        label = "realm, single process" if w == 0 else f"realm, {w} workers"
        print(f"  {label}:" + " " * (25 - len(label))
              + show("prefill", [x["prefill_tps"] for _, x in rows]) + ", "
              + show("decode", [x["decode_tps"] for _, x in rows]))
        against = "the RPC split" if w and rpc else "the reference"
        print(f"      × {against}: "
              + show("prefill", [x["prefill_tps"] / base[r][0] for r, x in rows if r in base], 2) + ", "
              + show("decode", [x["decode_tps"] / base[r][1] for r, x in rows if r in base], 2))
        print("      " + show("a decode step reads MB", [x.get("step_mb") for _, x in rows])
              + "; " + show("read bandwidth GB/s", [x.get("read_gbs") for _, x in rows])
              + "; " + show("decode's share of it", [x.get("bandwidth_fraction") for _, x in rows], 3))
        if w:
            print("      " + show("hop overhead µs", [x.get("hop_us") for _, x in rows], 0)
                  + "; " + show("decode over Realm's single-process decode",
                                [x["decode_tps"] / realm[r][0]["decode_tps"] for r, x in rows if 0 in realm[r]], 3))
    rss = {}
    for engine in ("reference", "realm"):
        for path in glob.glob(f"{out}/{name}.rss.{engine}.*"):
            rss.setdefault(engine, {})[int(path.rsplit(".", 1)[1])] = float(open(path).read())
    if len(rss) == 2:
        both = sorted(set(rss["reference"]) & set(rss["realm"]))
        print("  peak RSS, 64 tokens greedy, MiB: " + show("reference", [rss["reference"][r] for r in both])
              + ", " + show("realm", [rss["realm"][r] for r in both])
              + "; " + show("realm over reference", [rss["realm"][r] / rss["reference"][r] for r in both], 3))
PY
