#!/usr/bin/env bash
# Fuzzes what a file or a peer hands Realm, each target for a bounded time: `gguf` (the GGUF
# reader, model configuration and tokenizer) and `wire` (a forward request's tensor decoding).
# Seeds: the kept regressions, and a tiny synthetic model. An input that crashes a target is
# copied into common/fuzz/regressions/<target>/, where common/tests/fuzz_regressions.rs replays
# it on every test run; fix the crash, then commit the file.
#
#   deploy/fuzz.sh            # 60 s per target
#   SECONDS_PER_TARGET=600 deploy/fuzz.sh gguf
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`) and a C++ compiler; on a stable toolchain the
# sanitizer flags are allowed through RUSTC_BOOTSTRAP=1.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
SECONDS_PER_TARGET="${SECONDS_PER_TARGET:-60}"
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(gguf wire)
fuzz="$root/common/fuzz"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: cargo-fuzz is not installed (cargo install cargo-fuzz)" >&2
    exit 1
fi
export RUSTC_BOOTSTRAP=1

mkdir -p "$fuzz/corpus/gguf" "$fuzz/corpus/wire"
cargo build --release --quiet --bin realm-coordinator
target/release/realm-coordinator synth --out "$fuzz/corpus/gguf/synthetic-tiny.gguf" --layers 1 \
    --d-model 32 --ffn 32 --heads 1 --kv-heads 1 --vocab 257 --context 64 >/dev/null

status=0
for target in "${targets[@]}"; do
    echo "fuzz: $target for ${SECONDS_PER_TARGET}s" >&2
    artifacts="$fuzz/artifacts/$target"
    mkdir -p "$artifacts"
    if ! cargo fuzz run --fuzz-dir "$fuzz" --release --debug-assertions "$target" \
        "$fuzz/corpus/$target" "$fuzz/regressions/$target" -- \
        -max_total_time="$SECONDS_PER_TARGET" -max_len=1048576 -rss_limit_mb=4096 \
        -artifact_prefix="$artifacts/"; then
        status=1
    fi
    for crash in "$artifacts"/crash-* "$artifacts"/oom-* "$artifacts"/timeout-*; do
        [[ -e "$crash" ]] || continue
        cp "$crash" "$fuzz/regressions/$target/"
        echo "fuzz: $target found $(basename "$crash"); kept in common/fuzz/regressions/$target/" >&2
    done
done
exit "$status"
