#!/usr/bin/env bash
# Proves tools/gpu/baseline_official.py here on the CPU: the official PyTorch SegVol on
# segvol-random-v1 (full, seed 2) must reproduce ../shared/fixtures/full call-text, then prints its
# timings. Needs torch, transformers, safetensors and monai in $BASELINE_VENV (docs/gpu-validation.md
# gives the install commands); not part of CI (too heavy).
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${BASELINE_VENV:-/work/venv-baseline}
SHARED=${SEGVOL_SHARED:-/work/shared}
SEGVOL=${SEGVOL_BIN:-target/release/segvol}
[ -x "$VENV/bin/python" ] || { echo "baseline-check: no venv at $VENV (set BASELINE_VENV)" >&2; exit 2; }
[ -x "$SEGVOL" ] || cargo build --release --bin segvol
PYTHONUNBUFFERED=1 "$VENV/bin/python" tools/gpu/baseline_official.py \
    --official "$SHARED/reference/segvol-official" --model target/segvol-full-seed2 --segvol "$SEGVOL" \
    --tokenizer tests/fixtures/tiny/model/tokenizer.json --check "$SHARED/fixtures/full" --batches 1 --iters 1
