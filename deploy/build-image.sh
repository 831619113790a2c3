#!/usr/bin/env bash
# Builds Realm's runtime image from the binaries in target/release (built here first), through
# deploy/Dockerfile.prebuilt with a build context of just the three stripped binaries.
#
#   deploy/build-image.sh [IMAGE]       # default realm:local
#
# Environment: BASE_IMAGE (debian:bookworm-slim; CI passes the local realm-base:bookworm).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
image="${1:-realm:local}"
base="${BASE_IMAGE:-debian:bookworm-slim}"

cd "$root"
cargo build --release --quiet --bins
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
for bin in realm-coordinator realm-worker realm; do
    # The host build keeps line tables for backtraces; the image does without.
    strip -o "$stage/$bin" "target/release/$bin"
done
cp deploy/Dockerfile.prebuilt "$stage/Dockerfile"
# The legacy builder works everywhere (BuildKit needs the buildx plugin, absent on some hosts).
DOCKER_BUILDKIT="${DOCKER_BUILDKIT:-0}" docker build --quiet --build-arg "BASE_IMAGE=$base" \
    -t "$image" "$stage" >/dev/null
echo "build-image: $image ready ($(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}'))"
