#!/usr/bin/env bash
# One command, under 5 minutes on one H100: the reference/engine table on CUDA (fp32 reference,
# engine fp32 and bf16), then bf16 encoder throughput at batch 1/4/8, eager and compiled, with the
# fraction of the card's dense bf16 peak (H100 SXM: 989 TFLOPS; pass another as $1).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
PEAK=${1:-989}
OUT=${OUT:-.}
"$PY" benchmarks/bench.py --device cuda --precisions fp32 bf16 --slices 8 --json "$OUT/gpu_table.json"
"$PY" benchmarks/bench.py --device cuda --skip-table --batches 1 4 8 --peak-tflops "$PEAK" --json "$OUT/gpu_batches_eager.json"
timeout 150 "$PY" benchmarks/bench.py --device cuda --skip-table --compile --batches 1 4 8 --peak-tflops "$PEAK" \
    --json "$OUT/gpu_batches_compiled.json" || echo "compiled run skipped (timeout or error)"
