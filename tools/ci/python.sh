#!/usr/bin/env bash
# CI for `import segvol` (issue 14): builds the wheel with maturin, installs it fresh into the
# shared CI venv, runs the pytest suite (python/tests), then the Ray example on a local Ray
# with 2 CPUs (examples/ray_segment.py, checked against the CLI). Needs the release CLI, which
# the README's test command has built; REQUIRE_CUDA_KERNELS=1 as for every build here.
set -euo pipefail
cd "$(dirname "$0")/../.."
export REQUIRE_CUDA_KERNELS="${REQUIRE_CUDA_KERNELS:-1}"
VENV=${SEGVOL_CI_VENV:-$PWD/target/ci-venv}
step() { printf -- '-- python: %s (%s)\n' "$1" "$(date +%H:%M:%S)"; }

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
step "pip install maturin pytest numpy nibabel"
"$VENV/bin/pip" install -q --disable-pip-version-check maturin pytest numpy nibabel

step "cargo build --release (the CLI the tests compare with)"
cargo build --release -q
step "clippy on the binding crate"
cargo clippy --release -q -p segvol-python --features pyo3/extension-module -- -D warnings

step "maturin build --release"
rm -rf target/wheels
(cd python && "$VENV/bin/maturin" build --release --interpreter "$VENV/bin/python")
wheel=$(ls target/wheels/segvol-*.whl)
"$VENV/bin/pip" uninstall -q -y segvol 2>/dev/null || true
"$VENV/bin/pip" install -q --disable-pip-version-check "$wheel"

step "pytest python/tests"
# From outside the source tree: the installed wheel is what is imported.
(cd python/tests && timeout 900 "$VENV/bin/python" -m pytest -q -p no:cacheprovider)

if [ "${SEGVOL_CI_SKIP_RAY:-0}" != 1 ]; then
    step "pip install ray[data]"
    timeout 600 "$VENV/bin/pip" install -q --disable-pip-version-check "ray[data]"
    step "Ray example on a local Ray (2 CPUs, tiny weights, three CTs)"
    timeout 600 "$VENV/bin/python" -m pytest -q -p no:cacheprovider python/tests/ray_example_check.py
fi
step "done"
