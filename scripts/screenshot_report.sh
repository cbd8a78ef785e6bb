#!/usr/bin/env bash
# Render a run's HTML report in headless Chromium to a PNG (the picture in the README).
# usage: scripts/screenshot_report.sh artifacts/qwen2.5-coder-0.5b docs/report.png
set -euo pipefail
run=${1:?run folder}; out=${2:-docs/report.png}
mkdir -p "$(dirname "$out")"
profile=$(mktemp -d)
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$profile" --window-size=1400,2200 \
  --screenshot="$(realpath -m "$out")" "file://$(realpath "$run")/report/report.html" 2>/dev/null
rm -rf "$profile"
echo "$out"
