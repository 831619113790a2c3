#!/usr/bin/env bash
# Prepares what the HTTP API tests drive Realm with: a Python virtual environment holding the
# official `openai` package (from PyPI) under target/python (or $REALM_PYTHON_VENV), and curl.
# Idempotent: an environment that already imports `openai` is left alone.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${REALM_PYTHON_VENV:-$root/target/python}"
python="${PYTHON:-python3}"

if ! command -v curl >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq curl >/dev/null
    else
        echo "setup: 'curl' is required by the HTTP API tests; install it (e.g. apt-get install curl)" >&2
        exit 1
    fi
fi

if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import openai' 2>/dev/null; then
    exit 0
fi
if ! "$python" -m venv "$venv" 2>/dev/null; then
    rm -rf "$venv"
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
    fi
    if ! "$python" -m venv "$venv"; then
        echo "setup: '$python -m venv' failed; install the venv module (e.g. apt-get install python3-venv)" >&2
        exit 1
    fi
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check 'openai>=1.40,<3'
"$venv/bin/python" -c 'import openai; print("setup: openai", openai.__version__, "in", "'"$venv"'")'
