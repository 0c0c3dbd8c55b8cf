#!/usr/bin/env bash
# Run the foundation tests under transformers 4.x (users of steering-vectors pin <5) in .venv-tf4.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv-tf4/bin/python ] || "$PY" -m venv .venv-tf4
.venv-tf4/bin/python -m pip install --quiet --upgrade pip
.venv-tf4/bin/python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}" "transformers>=4.50,<5" pytest
.venv-tf4/bin/python -m pip install --quiet -e .
.venv-tf4/bin/python -m pytest -q tests/test_arch.py tests/test_sites.py tests/test_capture.py \
  tests/test_interventions.py tests/test_generation.py
