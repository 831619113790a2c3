#!/usr/bin/env bash
# Fetches the reference tokenizer test suite into models/vocab/ (or $REALM_VOCAB_DIR): the
# vocabulary-only GGUF files `ggml-vocab-*.gguf` and their `.inp`/`.out` test vectors that
# llama.cpp ships under models/, taken from the sdist of llama-cpp-python on PyPI (which vendors
# llama.cpp). tests/tests/vocab_suite.rs runs every vector against Realm's tokenizers.
#
# Idempotent: when every file is already present, nothing is downloaded. Set
# REALM_VOCAB_SDIST=/path/to/llama_cpp_python-0.3.36.tar.gz to use a tarball at hand instead of
# downloading it.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${REALM_VOCAB_DIR:-$root/models/vocab}"
python="${PYTHON:-python3}"

PKG="llama-cpp-python"
VERSION="0.3.36"
SDIST="llama_cpp_python-$VERSION.tar.gz"
SDIST_SHA256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
# Only the files of the sdist's vendor/llama.cpp/models/ whose names start with this.
PREFIX="ggml-vocab-"
# Vocabularies with test vectors in this release; the directory is complete when all are there.
VECTOR_VOCABS=(bert-bge command-r deepseek-coder deepseek-llm falcon gemma-4 gpt-2 llama-bpe
    llama-spm mpt phi-3 qwen2 qwen35 refact starcoder)

complete() {
    local name ext
    for name in "${VECTOR_VOCABS[@]}"; do
        for ext in "" .inp .out; do
            [[ -f "$dest/$PREFIX$name.gguf$ext" ]] || return 1
        done
    done
}

if complete; then
    echo "fetch-vocabs: $dest present"
    exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

sdist="${REALM_VOCAB_SDIST:-}"
if [[ -z "$sdist" ]]; then
    echo "fetch-vocabs: downloading $PKG==$VERSION (sdist, 77 MB)"
    # Only this package must come as an sdist: `--no-binary :all:` would also build pip's
    # metadata backend dependencies (ninja) from source, which takes many minutes.
    "$python" -m pip download --quiet --no-deps --no-binary "$PKG" --disable-pip-version-check \
        -d "$work" "$PKG==$VERSION"
    sdist="$work/$SDIST"
fi
if [[ ! -f "$sdist" ]]; then
    echo "fetch-vocabs: $sdist not found" >&2
    exit 1
fi
got="$(sha256sum "$sdist" | cut -d' ' -f1)"
if [[ "$got" != "$SDIST_SHA256" ]]; then
    echo "fetch-vocabs: $sdist sha256 mismatch: got $got, want $SDIST_SHA256" >&2
    exit 1
fi

mkdir -p "$dest"
# Extracts only vendor/llama.cpp/models/ggml-vocab-* (flat, no directories), each file through a
# .partial name so that an interrupted run never leaves a truncated file looking complete.
"$python" - "$sdist" "$dest" "$PREFIX" <<'PY'
import os, shutil, sys, tarfile
sdist, dest, prefix = sys.argv[1:4]
count = 0
with tarfile.open(sdist) as t:
    for member in t.getmembers():
        parts = member.name.split("/")
        if not (member.isfile() and parts[-4:-1] == ["vendor", "llama.cpp", "models"]
                and parts[-1].startswith(prefix)):
            continue
        target = os.path.join(dest, parts[-1])
        with t.extractfile(member) as src, open(target + ".partial", "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        os.replace(target + ".partial", target)
        count += 1
if count == 0:
    sys.exit(f"{sdist}: no vendor/llama.cpp/models/{prefix}* members")
print(f"fetch-vocabs: {count} files in {dest}")
PY

if ! complete; then
    echo "fetch-vocabs: $dest is still missing vocabularies after extraction" >&2
    exit 1
fi
