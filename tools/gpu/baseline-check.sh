#!/usr/bin/env bash
# Proves tools/gpu/baseline_official.py here on the CPU, with every path the GPU run takes: the
# official PyTorch SegVol on segvol-random-v1 (full, seed 2) must reproduce ../shared/fixtures/full
# call-text stage by stage and pipeline-text (the zoom-out-zoom-in pipeline on the 512x512x20 CT),
# then prints its `call` and `pipeline` timing lines in f32 and bf16. About 6 minutes on 2 cores.
# Needs torch, transformers, safetensors, einops and monai in $BASELINE_VENV (docs/gpu-validation.md
# gives the install commands); not part of CI (too heavy).
#
# Environment: BASELINE_VENV (default /work/venv-baseline), SEGVOL_SHARED (default /work/shared),
# BASELINE_MODEL (model dir; default target/segvol-full-seed2, made with $SEGVOL_BIN gen-weights
# when absent), SEGVOL_BIN (default target/release/segvol), BASELINE_THREADS (default 2).
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${BASELINE_VENV:-/work/venv-baseline}
SHARED=${SEGVOL_SHARED:-/work/shared}
MODEL=${BASELINE_MODEL:-target/segvol-full-seed2}
SEGVOL=${SEGVOL_BIN:-target/release/segvol}
THREADS=${BASELINE_THREADS:-2}
[ -x "$VENV/bin/python" ] || { echo "baseline-check: no venv at $VENV (set BASELINE_VENV)" >&2; exit 2; }
if [ ! -f "$MODEL/model.safetensors" ] && [ ! -x "$SEGVOL" ]; then
    echo "baseline-check: no $MODEL/model.safetensors and no segvol at $SEGVOL to make it (cargo build --release --bin segvol, or set SEGVOL_BIN / BASELINE_MODEL)" >&2
    exit 2
fi
OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS PYTHONUNBUFFERED=1 "$VENV/bin/python" tools/gpu/baseline_official.py \
    --official "$SHARED/reference/segvol-official" --model "$MODEL" --segvol "$SEGVOL" --threads "$THREADS" \
    --tokenizer tests/fixtures/tiny/model/tokenizer.json --check "$SHARED/fixtures/full" --batches 1 --iters 1 \
    --ct "$SHARED/fixtures/data/example_ct_dicom_512x512x20.nii.gz" --pipeline-runs 1
