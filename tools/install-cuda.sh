#!/usr/bin/env bash
# Installs nvcc 13.0 (with libcu++/CCCL headers) from PyPI into <repo>/.cuda, where build.rs
# looks for it (docs: toolchain.md §1, §4). Idempotent: does nothing when .cuda already holds a
# working nvcc. No root needed; ~100 MB download, ~270 MB on disk.
#
# Pinned to 13.0 on purpose: the GPU machines run driver 580 (CUDA 13.0), which cannot JIT the
# PTX of a newer nvcc. `cuda-toolkit==13.0.3.0` pins nvcc, nvvm, crt and runtime to 13.0.x (the
# split nvidia-cuda-nvcc wheel leaves them unpinned), and the `cccl` extra provides <nv/target>,
# without which cuda_fp16.h does not compile.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/.cuda"
nvcc="$dest/nvidia/cu13/bin/nvcc"
spec="cuda-toolkit[nvcc,cccl]==13.0.3.0"

if [ -x "$nvcc" ] && "$nvcc" --version >/dev/null 2>&1; then
    echo "install-cuda: $("$nvcc" --version | tail -n 2 | head -n 1) already in $dest"
    exit 0
fi

python="${PYTHON:-python3}"
if ! command -v "$python" >/dev/null 2>&1; then
    echo "install-cuda: $python not found (set PYTHON)" >&2
    exit 1
fi

echo "install-cuda: installing $spec into $dest"
rm -rf "$dest"
"$python" -m pip install -q --disable-pip-version-check --no-warn-script-location \
    --target "$dest" "$spec"

if ! "$nvcc" --version >/dev/null 2>&1; then
    echo "install-cuda: $nvcc does not run after the install" >&2
    exit 1
fi
echo "install-cuda: $("$nvcc" --version | tail -n 2 | head -n 1)"
echo "install-cuda: rebuild with 'touch kernels && cargo build' if a build without kernels was made before"
