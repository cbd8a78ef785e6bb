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
# wheel afterwards). GGML_NATIVE=OFF builds portable code instead of -march=native.
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[test,gguf,ray]"
.venv/bin/quantpipe stages >/dev/null
echo "quantpipe installed in .venv ($(.venv/bin/python -c 'import pipeline; print(pipeline.__version__)'))"
