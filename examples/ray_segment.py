#!/usr/bin/env python3
"""Segment a cohort of CTs with Ray Data: one `segvol.Engine` per actor, loaded once.

    # a laptop: a local Ray with 4 CPUs, two actors
    python examples/ray_segment.py --model MODEL_DIR --text liver --out-dir masks \\
        --jsonl report.jsonl --num-cpus 4 --concurrency 2 cts/
    # a cluster: one actor per GPU (Ray sets CUDA_VISIBLE_DEVICES for each)
    python examples/ray_segment.py --address auto --device cuda --gpus-per-actor 1 \\
        --concurrency 8 --model MODEL_DIR --text liver --out-dir /shared/masks \\
        --jsonl /shared/report.jsonl /shared/cts/

Inputs are NIfTI files or directories of them (sorted). Each mask is written next to the others
as `<stem>_mask.nii.gz`, the name `segvol segment --out-dir` gives, through a temporary file
and a rename, so a killed job leaves no half-written mask; `--skip-existing` skips inputs
whose mask exists. The driver writes one JSON line per case (input, output, status, error,
voxels, seconds). On a cluster, the inputs and --out-dir must be on a file system every node
sees (docs/scale-out.md).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def stem(path):
    name = Path(path).name
    for ext in (".nii.gz", ".nii"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def mask_path(out_dir, path):
    return str(Path(out_dir) / f"{stem(path)}_mask.nii.gz")


class Segmenter:
    """A Ray Data callable class: the engine loads once per actor, then serves every batch."""

    def __init__(self, model, out_dir, device, precision, prompt):
        import segvol

        self.engine = segvol.Engine(model, device=device, precision=precision)
        self.out_dir = out_dir
        self.prompt = prompt

    def __call__(self, batch):
        rows = {k: [] for k in ("input", "output", "status", "error", "voxels", "seconds")}
        for path in batch["path"]:
            path = str(path)
            out = mask_path(self.out_dir, path)
            t0 = time.perf_counter()
            try:
                voxels = self.segment(path, out)
                status, error = "done", ""
            except Exception as e:  # one bad case must not stop the cohort
                voxels, status, error = -1, "failed", f"{type(e).__name__}: {e}"
            for k, v in zip(rows, (path, out, status, error, voxels, time.perf_counter() - t0)):
                rows[k].append(v)
        return rows

    def segment(self, path, out):
        import nibabel as nib

        img = nib.load(path)
        mask, report = self.engine.open(path).segment(**self.prompt)
        header = img.header.copy()
        header.set_data_dtype(np.uint8)
        header.set_slope_inter(1, 0)
        # Temporary name + rename: the mask is whole or absent.
        tmp = str(Path(out).parent / f".{Path(out).name}.tmp-{os.getpid()}.nii.gz")
        try:
            nib.save(nib.Nifti1Image(mask, img.affine, header), tmp)
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return int(report["voxels"])


def inputs(paths):
    found = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(str(f) for f in p.iterdir()
                            if f.is_file() and f.name.lower().endswith((".nii", ".nii.gz")))
        else:
            found.append(str(p))
    return found


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("inputs", nargs="+", help="NIfTI files or directories of them")
    ap.add_argument("--model", required=True, help="segvol model directory")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--jsonl", required=True, help="report: one JSON line per case")
    ap.add_argument("--text")
    ap.add_argument("--box", help="i0,j0,k0,i1,j1,k1 (voxels, or mm with --mm)")
    ap.add_argument("--point", action="append", default=[], help="i,j,k (repeatable)")
    ap.add_argument("--mm", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu, emu, cuda (the actor's GPU)")
    ap.add_argument("--precision")
    ap.add_argument("--address", help="a running Ray cluster (e.g. auto); default: a local Ray")
    ap.add_argument("--num-cpus", type=int, help="CPUs of the local Ray")
    ap.add_argument("--concurrency", type=int, default=1, help="actors, one engine each")
    ap.add_argument("--cpus-per-actor", type=float, default=1)
    ap.add_argument("--gpus-per-actor", type=float, default=0, help="1 on GPU clusters")
    ap.add_argument("--skip-existing", action="store_true")
    a = ap.parse_args(argv)

    import ray

    paths = inputs(a.inputs)
    if not paths:
        sys.exit("ray_segment: no input")
    os.makedirs(a.out_dir, exist_ok=True)
    todo = [p for p in paths if not (a.skip_existing and os.path.isfile(mask_path(a.out_dir, p)))]
    prompt = {"text": a.text, "box": a.box, "points": a.point or None, "mm": a.mm}

    if a.address:
        ray.init(address=a.address)
    else:
        ray.init(num_cpus=a.num_cpus, include_dashboard=False)
    t0 = time.perf_counter()
    rows = []
    if todo:
        ds = ray.data.from_items([{"path": p} for p in todo])
        ds = ds.map_batches(
            Segmenter,
            fn_constructor_kwargs=dict(model=str(Path(a.model).resolve()),
                                       out_dir=str(Path(a.out_dir).resolve()),
                                       device=a.device, precision=a.precision, prompt=prompt),
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=a.concurrency),
            num_cpus=a.cpus_per_actor,
            num_gpus=a.gpus_per_actor,
        )
        rows = list(ds.iter_rows())
    wall = time.perf_counter() - t0
    with open(a.jsonl, "a") as f:
        for p in paths:
            if p not in todo:
                f.write(json.dumps({"input": p, "output": mask_path(a.out_dir, p),
                                    "status": "skipped", "error": None, "voxels": None,
                                    "seconds": None}) + "\n")
        for r in sorted(rows, key=lambda r: r["input"]):
            f.write(json.dumps({
                "input": r["input"], "output": r["output"], "status": r["status"],
                "error": r["error"] or None,
                "voxels": int(r["voxels"]) if r["status"] == "done" else None,
                "seconds": {"total": float(r["seconds"])},
            }) + "\n")
    failed = [r for r in rows if r["status"] != "done"]
    print(f"ray_segment: {len(rows) - len(failed)} of {len(todo)} segmented, {len(failed)} failed, "
          f"{len(paths) - len(todo)} skipped, in {wall:.1f} s", file=sys.stderr)
    for r in failed:
        print(f"ray_segment: failed: {r['input']}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
