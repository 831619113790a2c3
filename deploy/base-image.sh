#!/usr/bin/env bash
# Builds a Debian bookworm base image locally, for machines that reach no image registry:
# debootstrap (minbase) from the Debian mirror apt already uses, slimmed like debian:*-slim
# (no docs, man pages, locales or apt lists), then `docker import`. Does nothing when the image
# exists. Needs root and debootstrap.
#
#   deploy/base-image.sh [IMAGE]        # default realm-base:bookworm
set -euo pipefail
image="${1:-realm-base:bookworm}"

if docker image inspect "$image" >/dev/null 2>&1; then
    echo "base-image: $image present"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "base-image: needs debootstrap (apt-get install debootstrap)" >&2; exit 1; }

# The first Debian mirror apt is configured with (deb822 or one-line format).
mirror="${DEBIAN_MIRROR:-}"
if [[ -z "$mirror" ]]; then
    mirror="$(grep -hsE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/*.sources \
                 /etc/apt/sources.list.d/*.list 2>/dev/null \
              | grep -v security | grep -oE 'https?://[^ ]+/debian/?' | head -n1 || true)"
fi
mirror="${mirror:-http://deb.debian.org/debian}"

root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
echo "base-image: debootstrap bookworm from $mirror"
debootstrap --variant=minbase bookworm "$root" "$mirror" >"$root.log" 2>&1 \
    || { tail -20 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"
rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
    "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/* "$root"/tmp/*
tar -C "$root" -c . | docker import -c 'CMD ["/bin/bash"]' - "$image" >/dev/null
echo "base-image: $image ready ($(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}'))"
