#!/usr/bin/env bash
# The fast suite with every jaxtyping annotation in interplab checked by beartype at run time
# (INTERPLAB_TYPECHECK=1 installs jaxtyping's import hook in tests/conftest.py before interplab loads).
set -euo pipefail
cd "$(dirname "$0")/.."
INTERPLAB_TYPECHECK=1 .venv/bin/python -m pytest -q -m "not slow" -p no:cacheprovider "$@"
