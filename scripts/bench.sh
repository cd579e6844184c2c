#!/usr/bin/env bash
# Run every benchmark (CPU; about 20 minutes on 2 cores). `--quick` passes through for a smoke run.
# Each prints a table of ratios against its baseline and writes JSON + a plotly chart to bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --dev
PY=${PYTHON:-python3}
for bench in train_throughput host_overhead swap_latency chat_overhead ui_cost; do
  echo "=== bench/$bench.py $*"
  "$PY" "bench/$bench.py" "$@"
done
