#!/usr/bin/env bash
# The kernels' NEON paths on an emulated aarch64 CPU (qemu user mode), each checked bit for bit
# against the portable code: with the dot product extension (qemu's `max` CPU) and without it
# (Cortex-A53). Installs what it needs: the Rust target, a cross linker and qemu.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'test-arm: %s\n' "$*" >&2; }

target=aarch64-unknown-linux-gnu
missing=()
command -v aarch64-linux-gnu-gcc >/dev/null || missing+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
command -v qemu-aarch64 >/dev/null || missing+=(qemu-user)
deploy/apt-install.sh test-arm "${missing[@]}"
if ! rustup target list --installed | grep -qx "$target"; then
    log "installing the Rust target $target"
    rustup target add "$target"
fi

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
# Each CPU with the paths it must offer: the tests check every path the CPU has, and
# the_emulated_cpu_runs_the_expected_neon_paths fails if the CPU lacks one named here.
for cpu_paths in max:dotprod,neon cortex-a53:neon; do
    cpu=${cpu_paths%%:*}
    log "kernels and attention on an emulated $cpu (paths ${cpu_paths#*:})"
    out=$(REALM_EXPECT_NEON_PATHS=${cpu_paths#*:} \
        CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -cpu $cpu -L /usr/aarch64-linux-gnu" \
        cargo test --release --target "$target" -p realm-common --lib -- kernels attention 2>&1) || {
        printf '%s\n' "$out"
        exit 1
    }
    printf '%s\n' "$out" | tail -3
    if ! grep -q "the_emulated_cpu_runs_the_expected_neon_paths ... ok" <<<"$out"; then
        log "the check of the emulated CPU's paths did not run"
        exit 1
    fi
done
