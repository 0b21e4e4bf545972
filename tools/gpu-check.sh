#!/usr/bin/env bash
# One check on a lent GPU machine (DESIGN.md, "Tests and checks"): build with the CUDA kernels,
# run the CUDA device, backend-parity and fixture tests on the GPU, the slow fixtures, and
# `segvol bench`, in under 8 minutes. Logs go to $OUT (else ./gpu-check-out/); a summary table
# is printed last. Every step runs even if an earlier one failed; the exit status is 1 if any
# step failed.
#
#   tools/gpu-check.sh                  with cargo on the GPU machine (offline: the registry and
#                                       target/ must be there, with .cuda/ holding nvcc)
#   tools/gpu-check.sh --prepare DIR    on a build machine: build with kernels and copy the test
#                                       binaries and `segvol` (debug info stripped) into DIR
#   tools/gpu-check.sh --bundle DIR     on the GPU machine without cargo: run what --prepare put
#                                       in DIR (used by default when ./gpu-bundle exists and
#                                       cargo does not)
#
# Environment: SEGVOL_FIXTURES (full fixtures; default ./shared/fixtures/full if present),
# GPU_CHECK_BUDGET_S (total seconds, default 470), SEGVOL_CUDA_SYNC=1 (name a faulting kernel).
set -uo pipefail

TESTS=(cuda_device parity_attention parity_model_ops parity_volume_ops model_call pipeline_tiny) # in this order, those that exist
SLOW_TESTS=(model_call pipeline_tiny)               # their #[ignore] full-size fixtures
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD

mode=cargo
bundle=""
case "${1:-}" in
--prepare) mode=prepare bundle=${2:?usage: $0 --prepare DIR} ;;
--bundle) mode=bundle bundle=${2:?usage: $0 --bundle DIR} ;;
"") if ! command -v cargo >/dev/null && [ -d gpu-bundle ]; then mode=bundle bundle=gpu-bundle; fi ;;
*) echo "usage: $0 [--prepare DIR | --bundle DIR]" >&2; exit 2 ;;
esac

# ---------------------------------------------------------------- prepare (build machine)
if [ "$mode" = prepare ]; then
    set -e
    mkdir -p "$bundle/tests"
    export REQUIRE_CUDA_KERNELS=1
    cargo build --release
    cp target/release/segvol "$bundle/segvol"
    for t in "${TESTS[@]}"; do
        [ -f "tests/$t.rs" ] || continue
        exe=$(cargo test --release --test "$t" --no-run --message-format=json 2>/dev/null |
            grep -o '"executable":"[^"]*"' | tail -n1 | cut -d'"' -f4)
        cp "$exe" "$bundle/tests/$t"
    done
    command -v strip >/dev/null && strip --strip-debug "$bundle/segvol" "$bundle"/tests/*
    # Tests may locate fixtures through the CARGO_MANIFEST_DIR compiled into them.
    echo "$ROOT" >"$bundle/manifest_dir"
    du -sh "$bundle"
    exit 0
fi

# ---------------------------------------------------------------- GPU machine
OUTDIR=${OUT:-$ROOT/gpu-check-out}
mkdir -p "$OUTDIR"
DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET_S:-470}))
export SEGVOL_TEST_DEVICES=${SEGVOL_TEST_DEVICES:-cuda:f32,cuda:bf16} RUST_BACKTRACE=1 CARGO_TERM_COLOR=never
SUMMARY=()
FAILED=0

# run NAME MAX_SECONDS LOG PROGRAM ARGS...: runs the program with a timeout that also respects the
# total budget, appends a summary row, and counts failures.
run() {
    local name=$1 max=$2 log=$3
    shift 3
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 20 ]; then
        SUMMARY+=("$(printf '%-34s %-6s %5s  %s' "$name" skip - "out of time budget")")
        return
    fi
    [ "$max" -gt "$left" ] && max=$left
    local t0=$SECONDS status
    timeout --kill-after=10 "$max" "$@" >"$log" 2>&1
    status=$?
    local dt=$((SECONDS - t0)) detail
    detail=$(details "$log")
    if [ $status -eq 0 ]; then
        SUMMARY+=("$(printf '%-34s %-6s %4ss  %s' "$name" ok "$dt" "$detail")")
    else
        [ $status -eq 124 ] && detail="timed out after ${max}s; $detail"
        SUMMARY+=("$(printf '%-34s %-6s %4ss  %s' "$name" FAIL "$dt" "exit $status; $detail")")
        FAILED=1
    fi
}

# details LOG: pass/fail counts of libtest output, else the last line.
details() {
    if grep -q '^test result:' "$1"; then
        awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) g += $i } }
             /^skipped:/ { s++ }
             END { printf "%d passed, %d failed, %d ignored, %d skipped-prints", p, f, g, s }' "$1"
    else
        tail -n 1 "$1" | cut -c1-100
    fi
}

# ---- environment: the driver, cuBLASLt and NVTX must be loadable (dlopen at run time)
{
    echo "== $(date -u) on $(hostname)"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv
    else
        echo "nvidia-smi not found"
    fi
    [ -x .cuda/nvidia/cu13/bin/nvcc ] && .cuda/nvidia/cu13/bin/nvcc --version | tail -n 2
    command -v nvcc >/dev/null && nvcc --version | tail -n 2
} >"$OUTDIR/env.log" 2>&1

# Directories holding a library, from the loader cache, the usual CUDA folders and Python's
# NVIDIA wheels.
libdirs() {
    local lib=$1
    {
        ldconfig -p 2>/dev/null | awk -v l="$lib" '$1 ~ "^"l { print $NF }' | xargs -r -n1 dirname
        for d in ${CUDA_HOME:-} /usr/local/cuda /usr/local/cuda-13* /usr/local/cuda/targets/x86_64-linux; do
            ls "$d"/lib64/"$lib"* "$d"/lib/"$lib"* 2>/dev/null | xargs -r -n1 dirname
        done
        timeout 20 find /opt /usr/local /usr/lib -maxdepth 10 -name "$lib*" 2>/dev/null | xargs -r -n1 dirname
    } | awk '!seen[$0]++'
}
for lib in libcublasLt.so.13 libnvToolsExt.so; do
    dir=$(libdirs "$lib" | head -n1)
    if [ -n "$dir" ]; then
        export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        echo "$lib: $dir" >>"$OUTDIR/env.log"
    else
        echo "$lib: NOT FOUND" >>"$OUTDIR/env.log"
    fi
done
cat "$OUTDIR/env.log"
grep -q 'libcublasLt.so.13: NOT FOUND' "$OUTDIR/env.log" &&
    echo "warning: libcublasLt.so.13 not found: CudaDevice::new will report cuBLASLt missing"

# ---- build, tests
if [ "$mode" = cargo ]; then
    export REQUIRE_CUDA_KERNELS=1
    run "build (release, kernels)" 240 "$OUTDIR/build.log" cargo build --release --offline
    tests=()
    for t in "${TESTS[@]}"; do [ -f "tests/$t.rs" ] && tests+=(--test "$t"); done
    run "build tests" 180 "$OUTDIR/build-tests.log" cargo test --release --offline --no-run "${tests[@]}"
    test_argv() { ARGV=(cargo test --release --offline --test "$1" -- --nocapture "${@:2}"); }
    has_test() { [ -f "tests/$1.rs" ]; }
    SEGVOL=target/release/segvol
else
    [ -d "$bundle" ] || { echo "no bundle at $bundle" >&2; exit 2; }
    # Fixture paths compiled into the tests point at the build machine's checkout.
    if [ -f "$bundle/manifest_dir" ]; then
        built=$(cat "$bundle/manifest_dir")
        if [ "$built" != "$ROOT" ] && [ ! -e "$built" ]; then
            mkdir -p "$(dirname "$built")" && ln -s "$ROOT" "$built" 2>/dev/null || true
        fi
    fi
    test_argv() { ARGV=("$bundle/tests/$1" --nocapture "${@:2}"); }
    has_test() { [ -x "$bundle/tests/$1" ]; }
    SEGVOL=$bundle/segvol
fi

for t in "${TESTS[@]}"; do
    has_test "$t" || continue
    test_argv "$t"
    run "test $t" 150 "$OUTDIR/test-$t.log" "${ARGV[@]}"
done

# Tests that need a GPU print "skipped: <reason>" and pass when the device cannot be opened; on
# this machine that is a failure of the check.
if [ -f "$OUTDIR/test-cuda_device.log" ]; then
    reason=$(grep -m1 '^skipped:' "$OUTDIR/test-cuda_device.log")
    if [ -n "$reason" ]; then
        SUMMARY+=("$(printf '%-34s %-6s %5s  %s' "cuda:0 opened" FAIL - "${reason:0:100}")")
        FAILED=1
    else
        SUMMARY+=("$(printf '%-34s %-6s %5s  %s' "cuda:0 opened" ok - "GPU tests ran")")
    fi
fi

FIX=${SEGVOL_FIXTURES:-}
[ -z "$FIX" ] && [ -d shared/fixtures/full ] && FIX=$ROOT/shared/fixtures/full
if [ -n "$FIX" ] && [ -d "$FIX" ]; then
    export SEGVOL_FIXTURES=$FIX
    for t in "${SLOW_TESTS[@]}"; do
        has_test "$t" || continue
        test_argv "$t" --ignored
        run "slow fixtures $t" 150 "$OUTDIR/slow-$t.log" "${ARGV[@]}"
    done
else
    SUMMARY+=("$(printf '%-34s %-6s %5s  %s' "slow fixtures" skip - "SEGVOL_FIXTURES not set and shared/fixtures/full absent")")
fi

# ---- bench
for b in 1 8; do
    if [ -x "$SEGVOL" ]; then
        run "bench bf16 batch $b" 90 "$OUTDIR/bench-b$b.log" "$SEGVOL" bench --device cuda --precision bf16 --batch "$b"
    else
        SUMMARY+=("$(printf '%-34s %-6s %5s  %s' "bench bf16 batch $b" FAIL - "no segvol binary")")
        FAILED=1
    fi
done

# ---- summary
{
    echo
    echo "== gpu-check summary ($((SECONDS))s, logs in $OUTDIR)"
    printf '%-34s %-6s %5s  %s\n' step status time detail
    printf '%s\n' "${SUMMARY[@]}"
    for b in 1 8; do
        [ -f "$OUTDIR/bench-b$b.log" ] && { echo "-- bench batch $b (last lines)"; tail -n 5 "$OUTDIR/bench-b$b.log"; }
    done
} | tee "$OUTDIR/summary.txt"
exit $FAILED
