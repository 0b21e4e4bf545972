"""numpy arrays (any layout and dtype), nibabel images, str and Path inputs give the CLI's mask
on the same file; millimetre prompts go through the image's affine."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import segvol
from conftest import CT, MODEL

BOX = [41, 25, 0, 105, 86, 29]


@pytest.fixture(scope="module")
def engine():
    return segvol.Engine(MODEL)


@pytest.fixture(scope="module")
def cli_box_mask(tmp_path_factory):
    import subprocess
    from conftest import SEGVOL_BIN, load_mask

    out = tmp_path_factory.mktemp("cli") / "m.nii.gz"
    r = subprocess.run([str(SEGVOL_BIN), "segment", str(CT), "--model", str(MODEL), "--out",
                        str(out), "--text", "liver", "--box", ",".join(map(str, BOX))],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return load_mask(out)


def img():
    return nib.load(str(CT))


def variants():
    raw = np.asarray(img().dataobj)  # int16, Fortran order, as stored
    aff = img().affine
    yield "path str", str(CT), {}
    yield "pathlib", Path(CT), {}
    yield "nibabel", img(), {}
    yield "int16 F-order", raw, {"affine": aff}
    yield "float32 C-order", np.ascontiguousarray(raw, dtype=np.float32), {"affine": aff}
    yield "float64", raw.astype(np.float64), {"affine": aff}
    # A strided view: every voxel of a twice-as-large array, neither C nor F contiguous.
    big = np.zeros((raw.shape[0] * 2,) + raw.shape[1:], dtype=np.float32)
    big[::2] = raw
    yield "strided view", big[::2], {"spacing": (3.0, 3.0, 3.0)}
    yield "4-D, one volume", raw[..., None], {"affine": aff}


@pytest.mark.parametrize("name,volume,geometry", list(variants()), ids=[v[0] for v in variants()])
def test_inputs_give_the_cli_mask(name, volume, geometry, engine, cli_box_mask):
    mask, report = engine.open(volume, **geometry).segment(text="liver", box=BOX)
    assert mask.shape == cli_box_mask.shape, name
    assert np.array_equal(mask, cli_box_mask), name
    assert report["ml"] == pytest.approx(report["voxels"] * 27 / 1000)


def test_one_shot_on_an_array(cli_box_mask):
    raw = np.asarray(img().dataobj)
    mask, _ = segvol.segment(raw, MODEL, text="liver", box=BOX, affine=img().affine)
    assert np.array_equal(mask, cli_box_mask)


def test_millimetre_prompts_match_the_cli(engine, cli):
    image = img()
    # The box's corners in world mm through the file's affine.
    corners = [np.asarray(BOX[:3] + [1]), np.asarray(BOX[3:] + [1])]
    mm = [float(v) for c in corners for v in (image.affine @ c)[:3]]
    lo, hi = np.minimum(mm[:3], mm[3:]), np.maximum(mm[:3], mm[3:])
    box_mm = [*lo, *hi]
    mask, _ = engine.open(image).segment(text="liver", box=box_mm, mm=True)
    cli_mask, _ = cli(CT, text="liver", box=box_mm, mm=True)
    assert np.array_equal(mask, cli_mask)
    assert mask.sum() > 0


def test_points_and_strings(engine, cli):
    session = engine.open(CT)
    a, _ = session.segment(points=[[70, 50, 15]], negative_points=[10, 10, 1])
    b, _ = session.segment(points=["70,50,15"], negative_points="10,10,1")
    assert np.array_equal(a, b)
    cli_mask, _ = cli(CT, points=[[70, 50, 15]], negative_points=[[10, 10, 1]])
    assert np.array_equal(a, cli_mask)
