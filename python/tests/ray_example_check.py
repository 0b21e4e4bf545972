"""examples/ray_segment.py on a local Ray (2 CPUs, tiny weights, three CTs): its masks equal
`segvol segment --out-dir`'s. Run by tools/ci/python.sh after `pip install "ray[data]"`."""

import json
import shutil
import subprocess
import sys

import numpy as np

from conftest import CT, MODEL, REPO, SEGVOL_BIN, load_mask


def test_ray_example_masks_equal_the_cli(tmp_path):
    cts = tmp_path / "cts"
    cts.mkdir()
    for n in "abc":
        shutil.copy(CT, cts / f"ct_{n}.nii.gz")
    prompt = ["--text", "liver", "--box", "41,25,0,105,86,29"]
    r = subprocess.run([sys.executable, str(REPO / "examples" / "ray_segment.py"), "--model",
                        str(MODEL), "--out-dir", str(tmp_path / "ray"), "--jsonl",
                        str(tmp_path / "r.jsonl"), "--num-cpus", "2", "--concurrency", "2",
                        str(cts)] + prompt, capture_output=True, text=True, timeout=500)
    assert r.returncode == 0, r.stderr[-4000:]
    r = subprocess.run([str(SEGVOL_BIN), "segment", str(cts), "--model", str(MODEL),
                        "--out-dir", str(tmp_path / "cli")] + prompt,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(l) for l in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(l["status"] == "done" for l in lines), lines
    for n in "abc":
        name = f"ct_{n}_mask.nii.gz"
        ours, cli = load_mask(tmp_path / "ray" / name), load_mask(tmp_path / "cli" / name)
        assert ours.sum() > 0 and np.array_equal(ours, cli), name
