#!/usr/bin/env bash
# One command, under 5 minutes on one H100: for MedSAM ViT-B and LiteMedSAM, the reference/engine
# table on CUDA (fp32 reference, engine fp32 and bf16), then bf16 encoder throughput at batch 1/4/8,
# eager and compiled, with the fraction of the card's dense bf16 peak (H100 SXM: 989 TFLOPS; pass
# another as $1).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
PEAK=${1:-989}
OUT=${OUT:-.}
for MODEL in medsam litemedsam; do
    "$PY" benchmarks/bench.py --model $MODEL --device cuda --precisions fp32 bf16 --slices 8 --json "$OUT/gpu_table_$MODEL.json"
    "$PY" benchmarks/bench.py --model $MODEL --device cuda --skip-table --batches 1 4 8 --peak-tflops "$PEAK" \
        --json "$OUT/gpu_batches_eager_$MODEL.json"
    timeout 120 "$PY" benchmarks/bench.py --model $MODEL --device cuda --skip-table --compile --batches 1 4 8 \
        --peak-tflops "$PEAK" --json "$OUT/gpu_batches_compiled_$MODEL.json" || echo "compiled $MODEL run skipped (timeout or error)"
done
