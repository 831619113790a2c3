#!/usr/bin/env bash
# Decode and prefill speed of every architecture Realm runs, beside the reference engine's on the
# same synthetic files (see `realm-coordinator synth`), through deploy/bench-vs-reference.sh:
# the agreement-fixture shapes in Q4_K_M, a model of Llama 2 7B's widths (4096 wide, 32 heads,
# an MLP of 11008; LAYERS_7B blocks, 32 in the real one) and a Mixtral-shaped mixture of experts
# (8 experts, 2 used, 1024 wide).
#
#   LLAMA_CPP_BIN=/path/to/llama.cpp/build/bin deploy/bench-architectures.sh
#
# Environment: as bench-vs-reference.sh (WORKERS defaults to 0 here), LAYERS_7B (8),
# ARCHS (the fixture architectures to include; all by default).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
cargo build --release --quiet --bin realm-coordinator
realm="$root/target/release/realm-coordinator"
dir="$root/target/synthetic"
mkdir -p "$dir"
models=()
synth() {
    local out="$dir/$1.gguf"
    shift
    [[ -f "$out" ]] || "$realm" synth --out "$out" "$@" >/dev/null
    models+=("$out")
}
for arch in ${ARCHS:-llama3 mixtral qwen2 qwen3 qwen3moe phi3 gemma2}; do
    synth "$arch-q4_k_m" --arch "$arch" --dtype q4_k_m
done
synth "llama-7b-widths-${LAYERS_7B:-8}l-q4_k_m" --arch llama --dtype q4_k_m --layers "${LAYERS_7B:-8}" \
    --d-model 4096 --heads 32 --kv-heads 32 --head-dim 128 --ffn 11008 --vocab 32000 --context 4096
synth "mixtral-8x-1024-q4_k_m" --arch mixtral --dtype q4_k_m --layers 8 --d-model 1024 --heads 16 \
    --kv-heads 4 --head-dim 64 --ffn 3584 --experts 8 --experts-used 2 --vocab 32000
MODELS="${models[*]}" WORKERS="${WORKERS:-0}" exec "$root/deploy/bench-vs-reference.sh"
