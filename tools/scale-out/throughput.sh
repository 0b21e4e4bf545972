#!/usr/bin/env bash
# Cohort throughput of `segvol segment` on this machine (docs/scale-out.md):
#   one process using every core, then P parts at once (--num-parts P, RAYON_NUM_THREADS split
#   among them), then Ray Data with P actors (examples/ray_segment.py) when a Python with
#   segvol and ray is given.
#
#   tools/scale-out/throughput.sh MODEL_DIR COHORT_DIR [P] [PYTHON]
set -euo pipefail
MODEL=${1:?model directory}
COHORT=${2:?directory of NIfTI CTs}
P=${3:-2}
PY=${4:-}
SEGVOL=${SEGVOL_BIN:-$(cd "$(dirname "$0")/../.." && pwd)/target/release/segvol}
EXAMPLE=$(cd "$(dirname "$0")/../.." && pwd)/examples/ray_segment.py
CORES=$(nproc)
N=$(find "$COHORT" -maxdepth 1 -name '*.nii*' | wc -l)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
now() { date +%s.%N; }
report() { # label seconds
    awk -v l="$1" -v s="$2" -v n="$N" 'BEGIN { printf "%-34s %3d cases %8.1f s %7.1f s/case %6.0f cases/h\n", l, n, s, s / n, 3600 * n / s }'
}
echo "machine: $CORES cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
echo "segvol: $SEGVOL; model: $MODEL; cohort: $COHORT ($N CTs); prompt: text liver"

t0=$(now)
"$SEGVOL" segment "$COHORT" --model "$MODEL" --text liver --out-dir "$WORK/one" \
    --jsonl "$WORK/one.jsonl" 2>"$WORK/one.log"
report "1 process, $CORES threads" "$(echo "$(now) - $t0" | bc)"

t0=$(now)
for ((i = 0; i < P; i++)); do
    RAYON_NUM_THREADS=$(( CORES / P > 0 ? CORES / P : 1 )) "$SEGVOL" segment "$COHORT" \
        --model "$MODEL" --text liver --out-dir "$WORK/parts" --num-parts "$P" --part-id "$i" \
        --jsonl "$WORK/parts.jsonl" 2>"$WORK/part$i.log" &
done
wait
report "$P parts, $(( CORES / P > 0 ? CORES / P : 1 )) threads each" "$(echo "$(now) - $t0" | bc)"
[ "$(wc -l <"$WORK/parts.jsonl")" -eq "$N" ] || { echo "parts: report has $(wc -l <"$WORK/parts.jsonl") lines, not $N" >&2; exit 1; }
for f in "$WORK"/one/*; do cmp -s "$f" "$WORK/parts/$(basename "$f")" || { echo "parts: $f differs" >&2; exit 1; }; done

if [ -n "$PY" ]; then
    t0=$(now)
    RAYON_NUM_THREADS=$(( CORES / P > 0 ? CORES / P : 1 )) "$PY" "$EXAMPLE" "$COHORT" \
        --model "$MODEL" --text liver --out-dir "$WORK/ray" --jsonl "$WORK/ray.jsonl" \
        --num-cpus "$CORES" --concurrency "$P" --cpus-per-actor $(( CORES / P > 0 ? CORES / P : 1 )) 2>"$WORK/ray.log"
    report "Ray Data, $P actors (incl. ray.init)" "$(echo "$(now) - $t0" | bc)"
fi
