#!/usr/bin/env bash
# One check on a lent GPU machine (docs/gpu-validation.md). Two halves:
#
#   tools/gpu-check.sh --prepare [--dry-run]   here (cargo, nvcc, no GPU): build stripped binaries
#       (sm_90a cubin + PTX only) into target-gpu/, pack them with the fixtures they need, the
#       official-PyTorch baseline, the vendored official SegVol code and the monai wheel into ONE
#       gpu-bundle/bundle.tar.xz (ignored), fail if the tree that would travel exceeds 60 MiB, and
#       print the `run` call. --dry-run then runs the device half here (no GPU: it must stop at the
#       preflight with a clear line and still write one tarball and one summary).
#   tools/gpu-check.sh --device                 on the GPU machine (no cargo): untar, chmod +x,
#       preflight (<= 20 s), then every step in order of value within GPU_CHECK_BUDGET_S (360 s).
#       $OUT gets exactly logs.tar.gz and summary.txt; the summary table is printed last.
#
# Environment: OUT (default ./gpu-check-out), GPU_CHECK_BUDGET_S (default 360),
# SEGVOL_REFERENCE (official SegVol code; default /work/shared/reference/segvol-official),
# SEGVOL_SHARED_FIXTURES (default /work/shared/fixtures), MONAI_WHEEL (a monai wheel file).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
BUNDLE_DIR=gpu-bundle
BUNDLE=$BUNDLE_DIR/bundle.tar.xz
TRAVEL_LIMIT_MIB=60
# The GPU-relevant test binaries, in order of value (the self-tests live in cuda_device).
TESTS=(cuda_device backend_ops parity_attention parity_model_ops parity_volume_ops model_call pipeline_tiny)
MONAI_VERSION=1.4.0

die() { echo "gpu-check: $*" >&2; exit 2; }

# Bytes of the tree that would travel: tracked + untracked-not-ignored files, plus carried paths.
travel_bytes() {
    {
        git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null
        for c in "$@"; do find "$c" -type f -printf '%s\n'; done
        [ -d shared ] && find shared -type f -printf '%s\n'
    } | awk '{ s += $1 } END { print s + 0 }'
}

prepare() {
    local dry=$1
    set -e
    local ref=${SEGVOL_REFERENCE:-/work/shared/reference/segvol-official}
    local shared=${SEGVOL_SHARED_FIXTURES:-/work/shared/fixtures}
    [ -d "$ref/segment_anything_volumetric" ] || die "official SegVol code not found at $ref (set SEGVOL_REFERENCE)"
    [ -f "$shared/data/example_ct_dicom_512x512x20.nii.gz" ] || die "CT not found under $shared/data (set SEGVOL_SHARED_FIXTURES)"
    local t0=$SECONDS
    # Separate target dir: the stripped, sm_90a-only flags would otherwise rebuild target/.
    export CARGO_TARGET_DIR=$ROOT/target-gpu REQUIRE_CUDA_KERNELS=1 SEGVOL_CUDA_ARCHS=sm_90a
    export RUSTFLAGS="-C strip=symbols -C debuginfo=0" CARGO_PROFILE_RELEASE_DEBUG=0
    local args=() t
    for t in "${TESTS[@]}"; do [ -f "tests/$t.rs" ] && args+=(--test "$t"); done
    cargo build --release --bin segvol
    local json
    json=$(cargo test --release --no-run --message-format=json "${args[@]}")
    echo "gpu-check: build took $((SECONDS - t0)) s"
    local stage=$CARGO_TARGET_DIR/bundle
    rm -rf "$stage" && mkdir -p "$stage/bin" "$stage/data" "$stage/python"
    cp "$CARGO_TARGET_DIR/release/segvol" "$stage/bin/segvol"
    for t in "${TESTS[@]}"; do
        local exe
        exe=$(printf '%s\n' "$json" | grep "\"name\":\"$t\",\"src_path\"" | grep -o '"executable":"[^"]*"' | tail -n1 | cut -d'"' -f4)
        [ -n "$exe" ] || continue
        cp "$exe" "$stage/bin/$t"
    done
    # Fixture paths are compiled in (CARGO_MANIFEST_DIR, CARGO_TARGET_TMPDIR): the device side
    # links them to its checkout.
    printf '%s\n%s\n' "$ROOT" "$CARGO_TARGET_DIR/tmp" >"$stage/built_paths"
    cp "$shared/data/example_ct_dicom_512x512x20.nii.gz" "$stage/data/"
    cp "$shared/full/config.json" "$stage/data/full-config.json"
    cp -r "$ref" "$stage/python/segvol-official"
    rm -rf "$stage/python/segvol-official/documents" "$stage/python/segvol-official/.git"
    cp tools/gpu/baseline_official.py "$stage/python/"
    local wheel=${MONAI_WHEEL:-$(ls "$ROOT"/target-gpu/wheels/monai-*.whl 2>/dev/null | head -n1)}
    if [ -z "$wheel" ] || [ ! -f "$wheel" ]; then
        mkdir -p target-gpu/wheels
        python3 -m pip download -q --no-deps --only-binary=:all: -d target-gpu/wheels "monai==$MONAI_VERSION" ||
            echo "gpu-check: warning: monai==$MONAI_VERSION wheel not downloadable: the baseline step will fail (set MONAI_WHEEL)" >&2
        wheel=$(ls "$ROOT"/target-gpu/wheels/monai-*.whl 2>/dev/null | head -n1)
    fi
    [ -n "$wheel" ] && cp "$wheel" "$stage/python/"
    mkdir -p "$BUNDLE_DIR"
    # One stream with a dictionary larger than the binaries: the kernel images and the library
    # code each binary embeds compress against each other (21 MB at -6 alone, 12 MB like this).
    tar -C "$stage" -cf - . | xz -T1 --lzma2=preset=6,dict=128MiB >"$BUNDLE.tmp" && mv "$BUNDLE.tmp" "$BUNDLE"
    set +e
    local bytes limit
    bytes=$(travel_bytes "$BUNDLE_DIR")
    limit=$((TRAVEL_LIMIT_MIB * 1024 * 1024))
    echo "gpu-check: bundle $(du -h "$BUNDLE" | cut -f1) ($(ls "$stage/bin" | wc -l) binaries); travelling tree $((bytes / 1024 / 1024)) MiB of $TRAVEL_LIMIT_MIB MiB allowed"
    if [ "$bytes" -gt "$limit" ]; then
        echo "gpu-check: FAIL: the tree that would travel is $bytes bytes > $TRAVEL_LIMIT_MIB MiB" >&2
        exit 1
    fi
    echo "gpu-check: run it with (from the checkout the session was started in):"
    echo "  run(command=\"bash tools/gpu-check.sh --device\", carry=[\"$BUNDLE_DIR\"], timeout_s=420)"
    if [ "$dry" = 1 ]; then
        echo "gpu-check: dry run of the device side (no GPU expected here)"
        local out=${OUT:-$ROOT/target-gpu/dry-out}
        rm -rf "$out" && mkdir -p "$out"
        OUT=$out bash "$ROOT/tools/gpu-check.sh" --device
        local rc=$? n
        n=$(ls -A "$out" | wc -l)
        if [ "$n" -ne 2 ] || [ ! -f "$out/logs.tar.gz" ] || [ ! -f "$out/summary.txt" ]; then
            echo "gpu-check: FAIL: dry run wrote $(ls -A "$out" | tr '\n' ' ') (want logs.tar.gz summary.txt)" >&2
            exit 1
        fi
        if [ "$rc" -ne 3 ]; then
            echo "gpu-check: FAIL: dry run exited $rc, want 3 (stopped at the preflight: no GPU)" >&2
            exit 1
        fi
        echo "gpu-check: dry run ok: stopped at the preflight, wrote logs.tar.gz + summary.txt"
    fi
    exit 0
}

# ================================================================ device side
device() {
    local OUTDIR=${OUT:-$ROOT/gpu-check-out}
    mkdir -p "$OUTDIR"
    local W=${GPU_CHECK_WORK:-/tmp/segvol-gpu-check}
    local LOGS=$W/logs
    rm -rf "$W" && mkdir -p "$LOGS"
    DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET_S:-360}))
    SUMMARY=()
    TABLE=()
    FAILED=0
    FAILED_TESTS=()

    row() { SUMMARY+=("$(printf '%-30s %-5s %5s  %s' "$1" "$2" "$3" "${4:0:110}")"); }
    finish() {
        local rc=$1
        {
            echo "== gpu-check summary ($SECONDS s; logs in logs.tar.gz)"
            printf '%-30s %-5s %5s  %s\n' step status time detail
            printf '%s\n' "${SUMMARY[@]}"
            if [ ${#TABLE[@]} -gt 0 ]; then
                echo "-- table"
                printf '%s\n' "${TABLE[@]}"
            fi
            echo "exit $rc"
        } >"$LOGS/summary.txt"
        cp "$LOGS/summary.txt" "$OUTDIR/summary.txt"
        tar -C "$W" -czf "$OUTDIR/logs.tar.gz" logs
        cat "$OUTDIR/summary.txt"
        exit "$rc"
    }

    # step NAME MAX LOG CMD...: one step under its own and the total budget.
    step() {
        local name=$1 max=$2 log=$3
        shift 3
        local left=$((DEADLINE - SECONDS))
        if [ "$left" -lt 10 ]; then row "$name" skip - "out of time budget"; return 1; fi
        [ "$max" -gt "$left" ] && max=$left
        local t0=$SECONDS st detail
        timeout --kill-after=5 "$max" "$@" >"$log" 2>&1
        st=$?
        detail=$(details "$log")
        # Full-size fixtures do not fit in the bundle: their skips are expected.
        if [ $st -eq 0 ] && ! grep '^skipped:' "$log" | grep -vq 'SEGVOL_FIXTURES'; then
            row "$name" ok "$((SECONDS - t0))s" "$detail"
            return 0
        fi
        # A "skipped" in a test this script expected to run is a failure here.
        [ $st -eq 0 ] && detail="skipped: $(grep '^skipped:' "$log" | grep -v SEGVOL_FIXTURES | head -n1 | cut -c10-); $detail"
        [ $st -eq 124 ] && detail="timed out after ${max}s; $detail"
        row "$name" FAIL "$((SECONDS - t0))s" "exit $st; $detail"
        FAILED=1
        return 1
    }
    details() {
        if grep -q '^test result:' "$1"; then
            awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) g += $i } }
                 /^skipped:/ { s++ }
                 END { printf "%d passed, %d failed, %d ignored, %d skipped", p, f, g, s }' "$1"
        else
            grep -v '^\s*$' "$1" | tail -n 1 | cut -c1-100
        fi
    }

    # ---- unpack
    local t0=$SECONDS
    [ -f "$BUNDLE" ] || { row unpack FAIL - "no $BUNDLE: carry [\"$BUNDLE_DIR\"]"; finish 2; }
    if ! xz -dc "$BUNDLE" | tar -C "$W" -xf - 2>"$LOGS/unpack.log"; then
        row unpack FAIL - "$(tail -n1 "$LOGS/unpack.log")"; finish 2
    fi
    chmod +x "$W"/bin/*
    local missing="" t
    for t in segvol "${TESTS[@]}"; do [ -x "$W/bin/$t" ] || missing+=" $t"; done
    if [ -n "$missing" ]; then row unpack FAIL "$((SECONDS - t0))s" "missing binaries:$missing"; finish 2; fi
    row unpack ok "$((SECONDS - t0))s" "$(ls "$W/bin" | wc -l) binaries"
    # Paths compiled into the tests point at the build checkout: link it to this one.
    local built tmpdir
    built=$(sed -n 1p "$W/built_paths")
    tmpdir=$(sed -n 2p "$W/built_paths")
    if [ "$built" != "$ROOT" ] && [ ! -e "$built/tests/fixtures" ]; then
        mkdir -p "$(dirname "$built")" 2>/dev/null && ln -sfn "$ROOT" "$built" 2>/dev/null
    fi
    mkdir -p "$tmpdir" 2>/dev/null || true
    export SEGVOL_BIN=$W/bin/segvol RUST_BACKTRACE=1
    SEGVOL=$W/bin/segvol
    CT=$W/data/example_ct_dicom_512x512x20.nii.gz

    # ---- preflight (<= 20 s): stops at the first missing piece with one clear line (exit 3)
    t0=$SECONDS
    {
        echo "== $(date -u) on $(hostname)"
        ldd --version 2>&1 | head -n1
        for t in segvol "${TESTS[@]}"; do echo "-- ldd $t"; ldd "$W/bin/$t" 2>&1; done
    } >"$LOGS/preflight.log" 2>&1
    if grep -q 'not found' "$LOGS/preflight.log"; then
        row preflight FAIL "$((SECONDS - t0))s" "ldd: $(grep -m1 'not found' "$LOGS/preflight.log" | tr -s ' \t' ' ')"
        finish 3
    fi
    if ! command -v nvidia-smi >/dev/null; then
        row preflight FAIL "$((SECONDS - t0))s" "no GPU: nvidia-smi not found (binaries unpacked and linked fine)"
        finish 3
    fi
    local q
    q=$(timeout 10 nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv,noheader 2>&1 | head -n1)
    echo "nvidia-smi: $q" >>"$LOGS/preflight.log"
    local drv=${q#*, }
    drv=${drv%%,*}
    if ! [[ "${drv%%.*}" =~ ^[0-9]+$ ]] || [ "${drv%%.*}" -lt 580 ]; then
        row preflight FAIL "$((SECONDS - t0))s" "no GPU or driver < 580: nvidia-smi says: $q"
        finish 3
    fi
    # cuBLASLt 13: torch's pip wheels (nvidia/cu13/lib) or the CUDA toolkit; its folder goes first.
    local lt=""
    lt=$( {
        python3 -c 'import nvidia, os; [print(os.path.join(p, d, "lib")) for p in nvidia.__path__ for d in os.listdir(p)]' 2>/dev/null
        echo /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib
        ldconfig -p 2>/dev/null | awk '/libcublasLt.so.13/ { print $NF }' | xargs -r -n1 dirname
    } | tr ' ' '\n' | while read -r d; do [ -e "$d/libcublasLt.so.13" ] && echo "$d"; done | head -n1)
    if [ -z "$lt" ]; then
        row preflight FAIL "$((SECONDS - t0))s" "libcublasLt.so.13 not found (torch wheels, /usr/local/cuda, ldconfig)"
        finish 3
    fi
    export LD_LIBRARY_PATH="$lt${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    local ltv
    ltv=$(readlink -f "$lt/libcublasLt.so.13")
    echo "cuBLASLt: $ltv" >>"$LOGS/preflight.log"
    # The device as segvol opens it; the kernel image it loaded, where it prints one.
    timeout 15 "$SEGVOL" bench --device cuda --precision bf16 --iters 1 --warmup 0 >"$LOGS/preflight-open.log" 2>&1
    local ost=$?
    if [ $ost -ne 0 ]; then
        row preflight FAIL "$((SECONDS - t0))s" "segvol cannot use cuda:0 (exit $ost): $(grep -v '^\s*$' "$LOGS/preflight-open.log" | tail -n1)"
        finish 3
    fi
    local img
    img=$(grep -o -m1 'cubin sm_90a\|ptx sm_90a (JIT)\|ptx sm_80 (JIT)' "$LOGS/preflight-open.log" || echo "image not printed by segvol")
    row preflight ok "$((SECONDS - t0))s" "$q; cuBLASLt ${ltv##*/}; $img"

    # ---- tests, in order of value: self-tests and device tests, then parity on each precision
    unset SEGVOL_FIXTURES
    step "selftest + cuda_device" 60 "$LOGS/test-cuda_device.log" "$W/bin/cuda_device" --nocapture ||
        FAILED_TESTS+=(cuda_device)
    local prec
    for prec in f32 bf16 f16; do
        for t in backend_ops parity_attention parity_model_ops parity_volume_ops model_call pipeline_tiny; do
            SEGVOL_TEST_DEVICES=cuda:$prec step "$t cuda:$prec" 40 "$LOGS/test-$t-$prec.log" "$W/bin/$t" ||
                FAILED_TESTS+=("$t:$prec")
        done
    done
    # Reruns: only the failed binaries' failed tests, serial, synchronous launches, no graphs.
    local f
    for f in "${FAILED_TESTS[@]}"; do
        t=${f%%:*} prec=${f#*:}
        [ "$prec" = "$f" ] && prec=bf16
        local names
        names=$(grep -o '^test [^ ]* \.\.\. FAILED' "$LOGS"/test-"$t"*.log | awk '{ print $2 }' | sort -u | head -n 5)
        SEGVOL_TEST_DEVICES=cuda:$prec SEGVOL_CUDA_SYNC=1 SEGVOL_CUDA_GRAPHS=0 \
            step "rerun $f (sync, no graphs)" 40 "$LOGS/rerun-$t-$prec.log" "$W/bin/$t" --test-threads=1 $names
        local p
        p=$(grep -m2 'panicked at' "$LOGS"/test-"$t"*.log "$LOGS/rerun-$t-$prec.log" 2>/dev/null | cut -c1-150)
        [ -n "$p" ] && SUMMARY+=("    $p")
    done

    # ---- timings and graphs: per kernel (the backend-op table's perf mode), then whole calls
    SEGVOL_TEST_DEVICES=cuda:bf16 SEGVOL_BACKEND_OPS_PERF=1 step "backend ops perf cuda:bf16" 60 \
        "$LOGS/perf-backend-ops-bf16.log" "$W/bin/backend_ops" --nocapture --test-threads=1
    local b
    for prec in bf16 f32; do
        for b in 1 8; do
            step "bench $prec batch $b" 45 "$LOGS/bench-$prec-b$b.log" "$SEGVOL" bench --device cuda --precision "$prec" --batch "$b" --top 20
        done
    done
    step "pipeline 512x512x20 graphs" 40 "$LOGS/pipeline-graphs.log" "$SEGVOL" segment "$CT" --device cuda --precision bf16 --text liver --out "$W/mask-graphs.nii.gz" --json "$W/logs/pipeline-graphs.json"
    SEGVOL_CUDA_GRAPHS=0 step "pipeline 512x512x20 no graphs" 40 "$LOGS/pipeline-nographs.log" "$SEGVOL" segment "$CT" --device cuda --precision bf16 --text liver --out "$W/mask-nographs.nii.gz" --json "$W/logs/pipeline-nographs.json"
    local graph="n/a"
    if [ -f "$W/mask-graphs.nii.gz" ] && [ -f "$W/mask-nographs.nii.gz" ]; then
        if cmp -s <(gzip -dc "$W/mask-graphs.nii.gz") <(gzip -dc "$W/mask-nographs.nii.gz"); then graph=match; else graph=DIFFER; FAILED=1; fi
        row "graphs vs SEGVOL_CUDA_GRAPHS=0" "$([ $graph = match ] && echo ok || echo FAIL)" - "mask checksum $graph"
    fi

    # ---- the official PyTorch SegVol on the same GPU
    if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$W/site" "$W"/python/monai-*.whl >"$LOGS/pip.log" 2>&1; then
        PYTHONUNBUFFERED=1 PYTHONPATH=$W/site step "official PyTorch baseline" 90 "$LOGS/baseline.log" \
            python3 "$W/python/baseline_official.py" --official "$W/python/segvol-official" --device cuda --ct "$CT" --batches 1,8 \
            --model "$W/model-full" --segvol "$SEGVOL" --tokenizer "$ROOT/tests/fixtures/tiny/model/tokenizer.json"
    else
        row "official PyTorch baseline" FAIL - "monai wheel did not install: $(tail -n1 "$LOGS/pip.log")"
    fi

    # ---- profilers, if time remains
    step "ncu SpeedOfLight" 60 "$LOGS/ncu.log" ncu --clock-control none --section SpeedOfLight \
        --kernel-name 'regex:attn|attention|conv_transpose|joint|layer_norm|epilogue|gemm' --launch-count 8 \
        "$SEGVOL" bench --device cuda --precision bf16 --iters 1 --warmup 0
    SEGVOL_TEST_DEVICES=cuda:bf16 step "compute-sanitizer memcheck" 60 "$LOGS/memcheck.log" \
        compute-sanitizer --tool memcheck --error-exitcode 9 "$W/bin/parity_attention" --test-threads=1 strided

    # ---- the table: segvol vs PyTorch per stage
    stage_s() { awk -v s="$2" 'index($0, s) == 3 { for (i = 1; i <= NF; i++) if ($(i+1) == "s") { print $i; exit } }' "$1" 2>/dev/null; }
    TABLE+=("$(printf '%-26s %10s %10s %8s' stage segvol_s torch_s ratio)")
    for prec in f32 bf16; do
        for b in 1 8; do
            local ours theirs
            ours=$(stage_s "$LOGS/bench-$prec-b$b.log" "model call")
            theirs=$(awk -v k="call $prec batch $b" 'index($0, k) == 1 { print $NF }' "$LOGS/baseline.log" 2>/dev/null)
            TABLE+=("$(printf '%-26s %10s %10s %8s' "call $prec batch $b" "${ours:--}" "${theirs:--}" \
                "$(awk -v a="$ours" -v b="$theirs" 'BEGIN { if (a > 0 && b > 0) printf "%.2f", a / b; else print "-" }')")")
        done
    done
    # The whole pipeline on the 512x512x20 CT (read to mask): segvol's --json total vs the official one.
    ours=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["seconds"]["total"])' "$LOGS/pipeline-graphs.json" 2>/dev/null)
    theirs=$(awk 'index($0, "pipeline bf16 ") == 1 { print $NF }' "$LOGS/baseline.log" 2>/dev/null)
    TABLE+=("$(printf '%-26s %10s %10s %8s' "pipeline bf16 512x512x20" "${ours:--}" "${theirs:--}" \
        "$(awk -v a="$ours" -v b="$theirs" 'BEGIN { if (a > 0 && b > 0) printf "%.2f", a / b; else print "-" }')")")
    TABLE+=("graph checksum: $graph; tests failed: ${#FAILED_TESTS[@]} (${FAILED_TESTS[*]:-none})")
    finish $FAILED
}

case "${1:-}" in
--prepare) prepare "$([ "${2:-}" = --dry-run ] && echo 1 || echo 0)" ;;
--device) device ;;
*) echo "usage: $0 --prepare [--dry-run] | --device" >&2; exit 2 ;;
esac
