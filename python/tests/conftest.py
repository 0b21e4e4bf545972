"""Shared set-up: the repository's tiny fixtures and the CLI the wheel is compared with."""

import json
import os
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
TINY = FIXTURES / "tiny"
MODEL = TINY / "model"
CT = FIXTURES / "data" / "example_ct_sm.nii.gz"
CT_SUB64 = FIXTURES / "data" / "example_ct_sm_sub64.nii.gz"
# The CLI built by cargo (tools/ci/python.sh builds it before the wheel).
SEGVOL_BIN = Path(os.environ.get("SEGVOL_BIN", REPO / "target" / "release" / "segvol"))


def load_mask(path):
    return np.asarray(nib.load(str(path)).dataobj).astype(np.uint8)


def dice(a, b):
    a, b = a != 0, b != 0
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * (a & b).sum() / total


def cli_args(text=None, box=None, points=(), negative_points=(), mm=False):
    args = []
    if text is not None:
        args += ["--text", text]
    if box is not None:
        args += ["--box", ",".join(str(v) for v in box)]
    for p in points:
        args += ["--point", ",".join(str(v) for v in p)]
    for p in negative_points:
        args += ["--negative-point", ",".join(str(v) for v in p)]
    if mm:
        args.append("--mm")
    return args


@pytest.fixture
def cli(tmp_path):
    """Runs `segvol segment` on a file; returns (mask, stderr) or raises with its stderr."""
    if not SEGVOL_BIN.is_file():
        pytest.fail(f"{SEGVOL_BIN}: build the CLI first (cargo build --release)")

    def run(ct, *, batch=1, expect_ok=True, **prompt):
        out = tmp_path / f"cli-{len(list(tmp_path.iterdir()))}.nii.gz"
        cmd = [str(SEGVOL_BIN), "segment", str(ct), "--model", str(MODEL), "--out", str(out),
               "--batch", str(batch)] + cli_args(**prompt)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if expect_ok:
            assert r.returncode == 0, r.stderr
            return load_mask(out), r.stderr
        assert r.returncode != 0 and not out.exists(), r.stderr
        return r.returncode, r.stderr

    return run


def pipeline_case(case):
    """A tiny pipeline fixture: (CT path, prompt kwargs, reference mask path)."""
    meta = json.loads((TINY / f"pipeline-{case}.json").read_text())
    prompts = meta["prompts"]
    kw = {"text": prompts["text"]}
    if prompts.get("box_original_ijk") is not None:
        kw["box"] = prompts["box_original_ijk"]
    return TINY / meta["ct"], kw, TINY / meta["final"]["mask_nifti"]
