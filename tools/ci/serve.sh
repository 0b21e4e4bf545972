#!/usr/bin/env bash
# segvol serve against MONAI Label's real clients (monailabel 0.8.5 --no-deps and the Slicer
# module's client.py from the same wheel), loopback only, tiny weights: identity with
# `segvol segment`, bad requests, auth, SIGTERM drain and a bounded load test.
# Usage: bash tools/ci/serve.sh   (builds target/release/segvol first unless SEGVOL_BIN is set)
set -euo pipefail
cd "$(dirname "$0")/../.."
export REQUIRE_CUDA_KERNELS="${REQUIRE_CUDA_KERNELS:-1}"
VENV=${SEGVOL_CI_VENV:-$PWD/target/ci-venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --no-deps "monailabel==0.8.5"
"$VENV/bin/pip" install -q requests pynrrd nibabel numpy pytest
if [ -z "${SEGVOL_BIN:-}" ]; then
    cargo build --release 2>&1 | { grep -v "ptxas\|CUDA kernels" || true; }
    export SEGVOL_BIN="$PWD/target/release/segvol"
fi
timeout 1500 "$VENV/bin/python" -m pytest -q -s tests/python/test_serve_monailabel.py "$@"
