#!/usr/bin/env python3
"""The official PyTorch SegVol (MIT; ../shared/reference/segvol-official, imported at run time from
--official, never copied into the project's tracked files) on segvol-random-v1 weights, as the
baseline segvol is timed against (docs/gpu-validation.md). Builds the model from the official
classes, loads a model dir made by `segvol gen-weights --config full --seed 2`, and

  --check FIXTURES_FULL   compares its text call with call-text (stage tensors and final_logits,
                          max|diff|/max|ref| < 1e-4, f32); with --ct also the zoom-out input
                          (< 1e-6 abs) and the pipeline's final logits (pipeline-text, F16: < 2e-3);
  --batches 1,8           times one window call per batch size in each of --precisions (fp32 and
                          bf16 autocast) and prints `call <prec> batch <b> <seconds>` lines;
  --ct CT.nii.gz          times the official zoom-out-zoom-in pipeline (inference_demo.py's
                          zoom_in_zoom_out, text prompt only) on that CT in each of --precisions and
                          prints `pipeline <prec> <seconds>` lines (read, preprocessing and both
                          stages; the fastest of --pipeline-runs).

Those lines are read by tools/gpu-check.sh. Exit status 1 if a check fails or a weight is missing.
"""
import argparse, importlib, os, sys, time, types

p = argparse.ArgumentParser()
p.add_argument("--official", required=True, help="the official SegVol source folder")
p.add_argument("--model", help="model dir from `segvol gen-weights --config full --seed 2`")
p.add_argument("--segvol", help="segvol binary to make --model with when it is absent")
p.add_argument("--tokenizer", help="a folder with the CLIP tokenizer, or a tokenizer.json; "
               "default: the official code's config/clip, as the official code loads it")
p.add_argument("--device", default="cpu")
p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
p.add_argument("--check", help="full fixtures folder: compare with call-text (and pipeline-text)")
p.add_argument("--batches", default="1", help="batch sizes to time, comma-separated ('' for none)")
p.add_argument("--iters", type=int, default=3, help="timed iterations per case, after one warm-up")
p.add_argument("--precisions", default="f32,bf16", help="f32 and/or bf16 (autocast)")
p.add_argument("--ct", help="a CT (NIfTI) to time the zoom-out-zoom-in pipeline on")
p.add_argument("--text", default="liver", help="the text prompt of the timed calls and pipeline")
p.add_argument("--pipeline-runs", type=int, default=2, help="pipeline runs per precision")
a = p.parse_args()
if a.threads:
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(a.threads)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

if a.threads:
    torch.set_num_threads(a.threads)
dev = torch.device(a.device)
precisions = [x for x in a.precisions.split(",") if x]
assert all(x in ("f32", "bf16") for x in precisions), "--precisions takes f32 and/or bf16"
print(f"versions: python {sys.version.split()[0]}, torch {torch.__version__}, numpy {np.__version__}, "
      f"device {dev}{' (' + torch.cuda.get_device_name(dev) + ')' if dev.type == 'cuda' else ''}, "
      f"threads {torch.get_num_threads()}", flush=True)

# The official classes call .cuda() unconditionally (losses, tokens, prompts): follow --device.
torch.nn.Module.cuda = lambda self, *x, **k: self.to(dev)
torch.Tensor.cuda = lambda self, *x, **k: self.to(dev)

# MONAI first, while the optional packages it probes are untouched by the stubs below.
import monai  # noqa: E402
import monai.networks.blocks, monai.networks.layers, monai.networks.nets, monai.transforms  # noqa: E402,E401
import monai.data.utils, monai.utils  # noqa: E402,E401
import transformers  # noqa: E402

print(f"versions: monai {monai.__version__}, transformers {transformers.__version__}", flush=True)

# The official code was written for MONAI 0.9, where ViT's `pos_embed` named the patch projection;
# later MONAI renamed it `proj_type`, and 1.4 no longer takes the old name: map it (same layer).
_ViT = monai.networks.nets.ViT
if "pos_embed" not in _ViT.__init__.__code__.co_varnames:
    class ViT(_ViT):
        def __init__(self, *x, pos_embed=None, **k):
            if pos_embed is not None:
                k.setdefault("proj_type", pos_embed)
            super().__init__(*x, **k)
    monai.networks.nets.ViT = ViT


class _Stub(types.ModuleType):
    """A package the official modules import but inference never uses (torchvision for the 2-D
    SAM predictor, scipy/matplotlib/PIL for losses and plots): any use raises."""
    __path__ = []

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)

        def missing(*_x, **_k):
            raise RuntimeError(f"{self.__name__}.{attr}: not installed (stubbed by baseline_official.py)")
        return missing


stubbed = []
for name in ("torchvision.ops.boxes", "torchvision.transforms.functional", "scipy.ndimage",
             "matplotlib.pyplot", "PIL.Image", "PIL.ImageDraw"):
    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001 (absent, or present but broken for this torch)
        top = name.split(".")[0]
        for m in [m for m in sys.modules if (m == top or m.startswith(top + "."))
                  and not isinstance(sys.modules[m], _Stub)]:
            del sys.modules[m]
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            mod = ".".join(parts[:i])
            if mod not in sys.modules or not isinstance(sys.modules[mod], _Stub):
                sys.modules[mod] = _Stub(mod)
                stubbed.append(mod)
            if i > 1:
                setattr(sys.modules[".".join(parts[:i - 1])], parts[i - 1], sys.modules[mod])
if stubbed:
    print(f"stubbed (not installed, unused at inference): {', '.join(stubbed)}", flush=True)

sys.path.insert(0, a.official)
from segment_anything_volumetric import sam_model_registry  # noqa: E402
import network.model as official  # noqa: E402
if a.ct:
    import inference_demo  # noqa: E402  (zoom_in_zoom_out)
    from data_process.demo_data_process import ForegroundNormalization, DimTranspose, MinMaxNormalization  # noqa: E402
for m in stubbed:
    sys.modules.pop(m, None)

# ---- the model
if not a.model:
    a.model = "/tmp/segvol-full-seed2"
if not os.path.exists(os.path.join(a.model, "model.safetensors")):
    import subprocess
    t0 = time.perf_counter()
    subprocess.run([a.segvol or os.environ.get("SEGVOL_BIN", "segvol"), "gen-weights", "--config", "full",
                    "--seed", "2", "--out", a.model], check=True)
    print(f"gen-weights: {time.perf_counter() - t0:.1f} s", flush=True)

clip_ckpt = a.tokenizer or os.path.join(a.official, "config", "clip")
if clip_ckpt.endswith(".json"):  # a bare tokenizer.json: the CLIP BPE with its special tokens
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_file=clip_ckpt, bos_token="<|startoftext|>",
                                  eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    official.AutoTokenizer = types.SimpleNamespace(from_pretrained=lambda *_: tok)

t0 = time.perf_counter()
spatial = (32, 256, 256)
args = types.SimpleNamespace(spatial_size=spatial, patch_size=(4, 16, 16))
sam = sam_model_registry["vit"](args=args, checkpoint=None)
model = official.SegVol(image_encoder=sam.image_encoder, mask_decoder=sam.mask_decoder,
                        prompt_encoder=sam.prompt_encoder, clip_ckpt=clip_ckpt,
                        roi_size=args.spatial_size, patch_size=args.patch_size, test_mode=True)
sd = {k[len("model."):] if k.startswith("model.") else k: v
      for k, v in load_file(os.path.join(a.model, "model.safetensors")).items()}
# transformers 5 dropped CLIPTextModel's inner `text_model.` module (the release and the file have it).
own = set(model.state_dict())
flat = {k: k.replace(".clip_text_model.text_model.", ".clip_text_model.") for k in sd}
sd = {flat[k] if k not in own and flat[k] in own else k: v for k, v in sd.items()}
missing, unexpected = model.load_state_dict(sd, strict=False)
# position_ids is a non-persistent buffer in newer transformers (the file keeps it, as the release).
unexpected = [k for k in unexpected if not k.endswith("embeddings.position_ids")]
# Newer MONAI (1.4 here): TransformerBlock always builds a cross-attention (and its norm) that its forward
# runs only with with_cross_attention=True; the ViT here has none, and MONAI 0.9 had no such keys.
unused = [k for k in missing if k.startswith("image_encoder.blocks.") and (".cross_attn." in k or ".norm_cross_attn." in k)]
missing = [k for k in missing if k not in unused]
print(f"weights: {len(unused)} parameters of MONAI's unused cross-attention left at their init", flush=True)
print(f"weights: {len(sd)} tensors; missing {len(missing)} {missing[:3]}; unexpected {len(unexpected)} "
      f"{unexpected[:3]}; built and loaded in {time.perf_counter() - t0:.1f} s", flush=True)
ok = not missing and not unexpected
model = model.to(dev).eval()


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()


def autocast(prec):
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=prec == "bf16")


def rel(out, ref):
    out, ref = out.detach().float().cpu(), ref.float()
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
    return ((out - ref).abs().max() / ref.abs().max()).item()


def verdict(name, err, tol, measure="max|diff|/max|ref|"):
    global ok
    good = err < tol
    ok &= good
    print(f"check {name}: {measure} = {err:.3e} ({'ok' if good else 'FAIL'}, tolerance {tol:g})", flush=True)


# ---- --check: the text call against call-text, stage by stage
if a.check:
    import json
    image_ref = load_file(os.path.join(a.check, "call-image.safetensors"))
    text_ref = load_file(os.path.join(a.check, "call-text.safetensors"))
    want_ids = json.load(open(os.path.join(a.check, "call-text.json")))["token_ids"]
    got = {}
    hooks = [model.image_encoder.register_forward_hook(lambda m, i, o: got.__setitem__("vit", o[0])),
             model.text_encoder.register_forward_hook(lambda m, i, o: got.__setitem__("text_embedding", o)),
             model.text_encoder.clip_text_model.register_forward_hook(
                 lambda m, i, o: got.__setitem__("text_pooled", o.pooler_output)),
             model.image_encoder.patch_embedding.register_forward_hook(
                 lambda m, i, o: got.__setitem__("patch_embedding", o))]
    predict_masks = model.mask_decoder.predict_masks  # all 4 channels, before the channel choice

    def keep_masks(*x, **k):
        got["low_res_masks"], got["iou_pred"] = r = predict_masks(*x, **k)
        return r
    model.mask_decoder.predict_masks = keep_masks
    ids = model.text_encoder.organ2tokens(["liver"])["input_ids"][0].tolist()
    good = ids == want_ids
    ok &= good
    print(f"check token ids: {'ok' if good else 'FAIL'} ({len(ids)} tokens{'' if good else f': {ids} != {want_ids}'})")
    img = image_ref["input"].to(dev)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(img, text=["liver"])
    sync()
    print(f"check call: f32 text call in {time.perf_counter() - t0:.2f} s", flush=True)
    for h in hooks:
        h.remove()
    del model.mask_decoder.predict_masks
    stages = [("patch_embedding", got["patch_embedding"], image_ref["patch_embedding"]),
              ("image_embedding", got["vit"].transpose(1, 2).reshape(image_ref["image_embedding"].shape),
               image_ref["image_embedding"]),
              ("dense_pe", model.prompt_encoder.get_dense_pe(), image_ref["dense_pe"]),
              ("text_pooled", got["text_pooled"], text_ref["text_pooled"]),
              ("text_embedding", got["text_embedding"], text_ref["text_embedding"]),
              ("low_res_masks", got["low_res_masks"], text_ref["low_res_masks"]),
              ("iou_pred", got["iou_pred"], text_ref["iou_pred"]),
              ("final_logits", out, text_ref["final_logits"])]
    for name, mine, ref in stages:
        verdict(f"call-text {name}", rel(mine, ref), 1e-4)
    del image_ref, text_ref, got, out, img

# ---- --batches: one window call per batch size and precision
for b in [int(x) for x in a.batches.split(",") if x]:
    img = torch.rand(b, 1, *spatial, device=dev)
    for prec in precisions:
        times = []
        with torch.no_grad(), autocast(prec):
            for i in range(1 + max(1, a.iters)):
                sync()
                t0 = time.perf_counter()
                model(img, text=[a.text] * b)
                sync()
                if i:
                    times.append(time.perf_counter() - t0)
        times.sort()
        print(f"call {prec} batch {b} {times[len(times) // 2]:.4f}", flush=True)
    del img


# ---- --ct: the official zoom-out-zoom-in pipeline on a CT
def read_nifti(path):
    """NIfTI-1 voxels as nibabel's dataobj gives them (scaled), (i,j,k) = file order, float32, as
    MONAI's LoadImage returns them. Read here: nibabel is not installed on the GPU machine."""
    import gzip, struct
    raw = (gzip.open if path.endswith(".gz") else open)(path, "rb").read()
    e = "<" if struct.unpack("<i", raw[:4])[0] == 348 else ">"
    dim = struct.unpack(e + "8h", raw[40:56])
    datatype = struct.unpack(e + "h", raw[70:72])[0]
    offset = int(struct.unpack(e + "f", raw[108:112])[0])
    slope, inter = struct.unpack(e + "2f", raw[112:120])
    dt = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4"}[datatype]
    shape = dim[1:1 + dim[0]]
    x = np.frombuffer(raw, np.dtype(e + dt), int(np.prod(shape)), offset).reshape(shape, order="F")
    if slope not in (0.0, 1.0) or inter != 0.0:
        x = x * np.float64(slope) + np.float64(inter)
    return np.ascontiguousarray(x.astype(np.float32))


def plain(t):
    return t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)


def pipeline(path, prec):
    """data_process/demo_data_process.py's process_ct_gt without the label, then inference_demo.py's
    zoom_in_zoom_out with the text prompt only (the demo's use_box_prompt=False path)."""
    T = monai.transforms
    t_start = time.perf_counter()
    ct = read_nifti(path).squeeze()
    item = {"image": np.expand_dims(ct, axis=0)}
    # Orientationd(axcodes="RAS") is left out: on plain arrays (no affine) it is a no-op in
    # MONAI 0.9 (segvol-spec 6.1), and newer MONAI turns the array into a tensor, which the
    # official ForegroundNormalization (ndarray.copy) cannot take.
    transform = T.Compose([
        ForegroundNormalization(keys=["image"]),
        DimTranspose(keys=["image"]),
        MinMaxNormalization(),
        T.SpatialPadd(keys=["image"], spatial_size=spatial, mode="constant"),
        T.CropForegroundd(keys=["image"], source_key="image"),
        T.ToTensord(keys=["image"]),
    ])
    item = transform(item)
    zoom_out = T.Resized(keys=["image"], spatial_size=spatial, mode="nearest-exact")(item)
    image = plain(item["image"]).float().unsqueeze(0)
    image_zoom_out = plain(zoom_out["image"]).float().unsqueeze(0)
    label = torch.ones((1, 1) + tuple(image.shape[2:]))  # only for the demo's skip test and dice print
    label_zoom_out = torch.ones((1, 1) + spatial)
    t_pre = time.perf_counter()
    demo = types.SimpleNamespace(spatial_size=spatial, infer_overlap=0.5, use_text_prompt=True,
                                 use_box_prompt=False, use_point_prompt=False, use_zoom_in=True)
    with torch.no_grad(), autocast(prec):
        record = inference_demo.zoom_in_zoom_out(demo, model, image, image_zoom_out, label, label_zoom_out,
                                                  categories=[a.text])
    sync()
    t_end = time.perf_counter()
    logits = record[a.text][4]
    return t_end - t_start, t_pre - t_start, image, image_zoom_out, logits


if a.ct:
    for prec in precisions:
        runs = []
        for r in range(max(1, a.pipeline_runs)):
            total, pre, image, image_zoom_out, logits = pipeline(a.ct, prec)
            runs.append(total)
            print(f"pipeline-run {prec} {r} total {total:.3f} s, read+preprocess {pre:.3f} s, cropped "
                  f"{tuple(image.shape[2:])}, mask voxels {int((logits.float() > 0).sum())}", flush=True)
        print(f"pipeline {prec} {min(runs):.4f}", flush=True)
        if a.check and prec == "f32":
            ref = load_file(os.path.join(a.check, "call-image.safetensors"))["input"]
            verdict("pipeline zoom-out input", (image_zoom_out.cpu() - ref).abs().max().item(), 1e-6,
                    "max|diff|")
            ref = load_file(os.path.join(a.check, "pipeline-text.safetensors"))["final_logits"]
            verdict("pipeline-text final_logits", rel(logits, ref), 2e-3)
            mine, theirs = logits.float().cpu() > 0, ref.float() > 0
            dice = 2 * (mine & theirs).sum().item() / max(1, mine.sum().item() + theirs.sum().item())
            good = dice >= 0.999
            ok &= good
            print(f"check pipeline-text mask: Dice {dice:.6f} ({'ok' if good else 'FAIL'}, at least 0.999; "
                  f"{int(mine.sum())} voxels, reference {int(theirs.sum())})", flush=True)
        del image, image_zoom_out, logits
sys.exit(0 if ok else 1)
