"""The tiny pipeline fixtures (tests/fixtures/README.md §4) through `segvol.segment` and
through a `Session`: the reference masks, and the CLI's masks bit for bit."""

import nibabel as nib
import numpy as np
import pytest

import segvol
from conftest import MODEL, dice, load_mask, pipeline_case

CASES = ["text", "box-text", "box-text-1win"]


@pytest.fixture(scope="module")
def engine():
    # batch 4 as tests/pipeline_tiny.rs runs the CLI.
    return segvol.Engine(MODEL, batch=4)


@pytest.mark.parametrize("case", CASES)
def test_one_shot_gives_the_reference_mask(case, cli):
    ct, prompt, ref = pipeline_case(case)
    mask, report = segvol.segment(ct, MODEL, batch=4, **prompt)
    reference = load_mask(ref)
    assert mask.dtype == np.uint8 and mask.shape == reference.shape
    assert set(np.unique(mask)) <= {0, 1}
    d = dice(mask, reference)
    print(f"{case}: Dice {d:.6f} vs the reference pipeline")
    # The threshold of tests/pipeline_tiny.rs (f32): logits within 1e-4 of PyTorch's can flip
    # a voxel on the boundary (the text case differs in 1 of 83,646).
    assert d >= 0.999, d
    # ... and exactly the CLI's mask on the same file.
    cli_mask, _ = cli(ct, batch=4, **prompt)
    assert np.array_equal(mask, cli_mask)
    assert report["voxels"] == int(mask.sum())
    assert report["windows"] > 0 and report["seconds"]["total"] > 0


@pytest.mark.parametrize("case", CASES)
def test_session_gives_the_reference_mask(case, engine, cli):
    ct, prompt, ref = pipeline_case(case)
    session = engine.open(ct)
    mask, report = session.segment(**prompt)
    assert dice(mask, load_mask(ref)) >= 0.999
    cli_mask, _ = cli(ct, batch=4, **prompt)
    assert np.array_equal(mask, cli_mask)
    # A second prompt on the same session hits the cache and gives the same mask.
    again, report2 = session.segment(**prompt)
    assert np.array_equal(again, mask)
    assert report2["cached_windows"] == report2["windows"] > 0
    assert session.cache_bytes > 0


def test_identify_ranks_names(engine):
    ct, prompt, _ = pipeline_case("box-text")
    ranked = engine.open(ct).identify(box=prompt["box"], candidates=["liver", "spleen", "aorta"])
    assert sorted(n for n, _, _ in ranked) == ["aorta", "liver", "spleen"]
    scores = [s for _, s, _ in ranked]
    assert scores == sorted(scores, reverse=True)
    assert abs(sum(sh for _, _, sh in ranked) - 1.0) < 1e-9


def test_mask_writes_back_with_nibabel(engine, tmp_path):
    ct, prompt, ref = pipeline_case("box-text")
    img = nib.load(str(ct))
    mask, _ = engine.open(img).segment(**prompt)
    out = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(mask, img.affine), str(out))
    assert dice(load_mask(out), load_mask(ref)) == 1.0
