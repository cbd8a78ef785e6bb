#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: a virtual environment in .venv with quantpipe and every
# dependency, pinned by constraints.txt. Nothing else needs installing by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, from the CPU build pinned in constraints.txt: an unconstrained resolve would
# pull a multi-GB CUDA torch. Everything after is resolved against the same constraints.
.venv/bin/python -m pip install -q -c constraints.txt "$(grep -E '^torch==' constraints.txt)"
# llama-cpp-python compiles llama.cpp from source (~2-13 min on 2 cores, cached by pip as a
# wheel afterwards): portable CPU code, or with CUDA offload where a CUDA toolkit and driver are
# found (QUANTPIPE_LLAMA_CUDA=0/1 forces either way; scripts/llama-cmake-args.sh decides).
LLAMA_ARGS="$(bash scripts/llama-cmake-args.sh)"
CMAKE_ARGS="$LLAMA_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[test,gguf,ray]"
# pip reuses an installed or cached CPU build whatever CMAKE_ARGS says: rebuild when CUDA was asked for
if [[ "$LLAMA_ARGS" == *GGML_CUDA=on* ]] &&
  ! .venv/bin/python -c 'import llama_cpp, sys; sys.exit(not llama_cpp.llama_supports_gpu_offload())' 2>/dev/null; then
  CMAKE_ARGS="$LLAMA_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
    .venv/bin/python -m pip install -q -c constraints.txt --no-cache-dir --force-reinstall --no-deps llama-cpp-python
fi
.venv/bin/quantpipe stages >/dev/null
echo "quantpipe installed in .venv ($(.venv/bin/python -c 'import pipeline; print(pipeline.__version__)'))"
