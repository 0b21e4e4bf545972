"""Bad input raises ValueError (or OSError for files) with the CLI's one-line message; the
engine's own failures are segvol.EngineError."""

import numpy as np
import pytest

import segvol
from conftest import CT, MODEL


@pytest.fixture(scope="module")
def session():
    return segvol.Engine(MODEL).open(CT)


@pytest.mark.parametrize(
    "prompt,message",
    [
        ({}, "no prompt: give a text, a box or a point"),
        ({"text": "  "}, "text is empty"),
        ({"box": [1, 2, 3]}, "box 1,2,3: expected 6 comma-separated numbers"),
        ({"box": [5, 0, 0, 4, 10, 10]}, "the first corner exceeds the second on axis i"),
        ({"box": [0, 0, 0, 1.5, 2, 2]}, "1.500 is not a voxel index"),
        ({"points": [[200, 1, 1]]}, "point 200,1,1: lies outside the volume of 122x101x30"),
        ({"points": [[1, 2]]}, "point 1,2: expected 3 comma-separated numbers"),
        ({"negative_points": [[-1, 0, 0]]}, "negative point -1,0,0: -1.000 is not a voxel index"),
        ({"box": [0, 0, 0, float("nan"), 1, 1]}, "expected 6 comma-separated numbers"),
        ({"box": "a,b"}, "box a,b: expected 6 comma-separated numbers"),
        ({"box": {"x": 1}}, "box must be numbers"),
    ],
)
def test_bad_prompts_raise_value_error(session, prompt, message):
    with pytest.raises(ValueError) as e:
        session.segment(**prompt)
    assert message in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "prompt",
    [{"box": [0, 0, 0, 200, 10, 10], "text": "liver"}, {"points": [[1, 2]]}, {"box": [5, 0, 0, 4, 1, 1]}],
)
def test_messages_are_the_clis(session, cli, prompt):
    with pytest.raises(ValueError) as e:
        session.segment(**prompt)
    code, stderr = cli(CT, expect_ok=False, **prompt)
    assert code == 2
    assert stderr.strip().splitlines()[-1] == f"segvol: error: {e.value}"


def nan_at(ijk):
    v = np.zeros((8, 9, 10), dtype=np.float32)
    v[ijk] = np.nan
    return v


def test_bad_volumes(tmp_path):
    engine = segvol.Engine(MODEL)
    cases = [
        (np.zeros((10, 10)), ValueError, "<array>: a volume of shape [10, 10]: expected 3-D"),
        (np.zeros((10, 10, 10, 2)), ValueError, "expected 3-D (i, j, k)"),
        # The voxel is named in (i, j, k): the array's axes are the file's.
        (nan_at((3, 5, 7)), ValueError, "<array>: voxel (i,j,k) = (3,5,7) is NaN"),
        ("not an array at all", FileNotFoundError, "not an array at all"),
        (tmp_path / "missing.nii.gz", FileNotFoundError, "missing.nii.gz"),
        ([[["x"]]], ValueError, "volume: expected a 3-D numpy array"),
    ]
    for volume, kind, message in cases:
        with pytest.raises(kind) as e:
            engine.open(volume)
        assert message in str(e.value), (volume, str(e.value))
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti file")
    with pytest.raises(ValueError) as e:
        engine.open(bad)
    assert "bad.nii.gz" in str(e.value)
    vol = np.zeros((8, 8, 8), dtype=np.float32)
    for geometry, message in [
        ({"affine": np.eye(3)}, "affine: expected a 4x4 array"),
        ({"affine": np.eye(4), "spacing": (1, 1, 1)}, "give affine or spacing, not both"),
        ({"spacing": (1, 0, 1)}, "spacing: expected three positive numbers"),
        ({"affine": [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]}, "last row"),
    ]:
        with pytest.raises(ValueError) as e:
            engine.open(vol, **geometry)
        assert message in str(e.value), (geometry, str(e.value))
    with pytest.raises(ValueError, match="a file brings its own geometry"):
        engine.open(CT, spacing=(1, 1, 1))


def test_bad_engines(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        segvol.Engine(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="device tpu: expected cpu, emu, cuda or cuda:N"):
        segvol.Engine(MODEL, device="tpu")
    with pytest.raises(ValueError, match="precision f8: expected f32, bf16 or f16"):
        segvol.Engine(MODEL, precision="f8")
    with pytest.raises(ValueError, match="batch"):
        segvol.Engine(MODEL, batch=0)
    with pytest.raises(ValueError, match="mem_limit"):
        segvol.Engine(MODEL, mem_limit=[1])
    (tmp_path / "model").mkdir()
    with pytest.raises((ValueError, OSError)) as e:
        segvol.Engine(tmp_path / "model")
    assert "model" in str(e.value)


def test_device_failures_are_engine_errors():
    assert issubclass(segvol.EngineError, RuntimeError)
    # A CUDA device on a machine without one: the device is unavailable (an engine error).
    try:
        segvol.Engine(MODEL, device="cuda:7")
    except segvol.EngineError as e:
        assert str(e).startswith("device cuda:7"), str(e)
    # A budget too small for any plan fails at open with the engine's memory message.
    tiny_budget = segvol.Engine(MODEL, mem_limit="1M")
    with pytest.raises(segvol.EngineError) as e:
        tiny_budget.open(CT)
    assert str(e.value).startswith("memory:"), str(e.value)
