#!/usr/bin/env bash
# Prints the CMAKE_ARGS that scripts/setup.sh builds llama-cpp-python with: CUDA offload
# (-DGGML_CUDA=on) where a CUDA toolkit (nvcc on PATH, or under $CUDA_HOME/bin) and the NVIDIA
# driver (nvidia-smi on PATH) are both present, else the CPU build. The driver is asked for too
# because a CUDA build links libcuda: on a machine with the toolkit and no GPU (a CI image, say),
# `import llama_cpp` would fail. QUANTPIPE_LLAMA_CUDA=1 forces CUDA, =0 forces CPU. A CMAKE_ARGS
# already set wins.
# Decides only; builds nothing (tests/test_placement.py runs it with a fake PATH).
set -euo pipefail
if [ -n "${CMAKE_ARGS:-}" ]; then
  echo "$CMAKE_ARGS"
  exit 0
fi
base="-DGGML_NATIVE=OFF"  # portable code instead of -march=native
case "${QUANTPIPE_LLAMA_CUDA:-}" in
  1) cuda=1 ;;
  0) cuda=0 ;;
  "")
    cuda=0
    if command -v nvcc >/dev/null 2>&1 || [ -x "${CUDA_HOME:-/nonexistent}/bin/nvcc" ]; then
      if command -v nvidia-smi >/dev/null 2>&1; then cuda=1; fi
    fi ;;
  *)
    echo "QUANTPIPE_LLAMA_CUDA must be 0 (CPU build) or 1 (CUDA build), not '${QUANTPIPE_LLAMA_CUDA}'" >&2
    exit 2 ;;
esac
if [ "$cuda" = 1 ]; then
  echo "$base -DGGML_CUDA=on"
else
  echo "$base"
fi
