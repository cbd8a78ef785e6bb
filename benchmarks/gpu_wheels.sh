#!/usr/bin/env bash
# Fetch, here, the wheels benchmarks/gpu_scale.py needs on the GPU machine (which has torch,
# transformers, accelerate, datasets' pyarrow... but no lm-eval or llm-compressor, and no network):
# the pinned versions from constraints.txt, for CPython 3.12 on x86-64, into .whl (git-ignored
# through .git/info/exclude). Carry .whl with the device run (64 MiB at most, data included).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >>"$(git rev-parse --git-common-dir)/info/exclude"
pin() { grep -iE "^$1==" constraints.txt || echo "$1"; }
mkdir -p .whl
for name in lm-eval llmcompressor compressed-tensors datasets evaluate sqlitedict word2number pytablewriter \
  jsonlines more-itertools zstandard dill multiprocess xxhash loguru rouge-score tqdm-multiprocess \
  dataproperty mbstrdecoder pathvalidate tabledata tcolorpy typepy chardet nltk absl-py; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$(pin "$name")" || echo "gpu_wheels: no wheel for $name" >&2
done
du -sh .whl
