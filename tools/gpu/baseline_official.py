#!/usr/bin/env python3
"""The official PyTorch SegVol (MIT; ../shared/reference/segvol-official, never copied into the
project's tracked files) on segvol-random-v1 weights, as the baseline segvol is timed against
(docs/gpu-validation.md). Builds the model from the official classes, loads a model dir made by
`segvol gen-weights --config full --seed 2`, and

  --check FIXTURES_FULL   compares its text call with call-text (max|diff|/max|ref| <= 1e-4, f32);
  --batches 1,8           times one window call per batch size in fp32 and bf16 autocast and
                          prints `call <prec> batch <b> <seconds>` lines (read by gpu-check.sh).
"""
import argparse, json, os, sys, time, types

p = argparse.ArgumentParser()
p.add_argument("--official", required=True, help="the official SegVol source folder")
p.add_argument("--model", help="model dir from `segvol gen-weights --config full --seed 2`")
p.add_argument("--segvol", help="segvol binary to make --model with when it is absent")
p.add_argument("--tokenizer", help="tokenizer.json (CLIP BPE); default: the model dir's")
p.add_argument("--device", default="cpu")
p.add_argument("--check", help="full fixtures folder: compare the text call with call-text")
p.add_argument("--batches", default="1")
p.add_argument("--iters", type=int, default=3)
p.add_argument("--ct", help="accepted for the zoom-out-zoom-in timing (not yet implemented)")
a = p.parse_args()

import torch
from safetensors.torch import load_file

dev = torch.device(a.device)
# The official classes call .cuda() unconditionally (losses, tokens): follow --device instead.
torch.nn.Module.cuda = lambda self, *x, **k: self.to(dev)
torch.Tensor.cuda = lambda self, *x, **k: self.to(dev)
sys.path.insert(0, a.official)
from segment_anything_volumetric import sam_model_registry  # noqa: E402
import network.model as official  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

if not a.model:
    a.model = "/tmp/segvol-full-seed2"
if not os.path.exists(os.path.join(a.model, "model.safetensors")):
    import subprocess
    subprocess.run([a.segvol or os.environ.get("SEGVOL_BIN", "segvol"), "gen-weights", "--config", "full",
                    "--seed", "2", "--out", a.model], check=True)
tok_file = a.tokenizer or os.path.join(a.model, "tokenizer.json")
tok = PreTrainedTokenizerFast(tokenizer_file=tok_file, bos_token="<|startoftext|>",
                              eos_token="<|endoftext|>", pad_token="<|endoftext|>")
official.AutoTokenizer = types.SimpleNamespace(from_pretrained=lambda *_: tok)

args = types.SimpleNamespace(spatial_size=(32, 256, 256), patch_size=(4, 16, 16))
sam = sam_model_registry["vit"](args=args, checkpoint=None)
model = official.SegVol(image_encoder=sam.image_encoder, mask_decoder=sam.mask_decoder,
                        prompt_encoder=sam.prompt_encoder, clip_ckpt=None,
                        roi_size=args.spatial_size, patch_size=args.patch_size, test_mode=True)
sd = {k[len("model."):] if k.startswith("model.") else k: v
      for k, v in load_file(os.path.join(a.model, "model.safetensors")).items()}
missing, unexpected = model.load_state_dict(sd, strict=False)
print(f"weights: {len(sd)} tensors; missing {missing[:3]}; unexpected {unexpected[:3]}")
model = model.to(dev).eval()

ok = True
if a.check:
    img = load_file(os.path.join(a.check, "call-image.safetensors"))["input"].to(dev)
    ref = load_file(os.path.join(a.check, "call-text.safetensors"))["final_logits"]
    with torch.no_grad():
        out = model(img, text=["liver"]).float().cpu()
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    ok = err <= 1e-4
    print(f"check call-text: max|diff|/max|ref| = {err:.3e} ({'ok' if ok else 'FAIL'}, tolerance 1e-4)")

for b in [int(x) for x in a.batches.split(",") if x]:
    img = torch.rand(b, 1, 32, 256, 256, device=dev)
    for prec in ("f32", "bf16"):
        ctx = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=prec == "bf16")
        times = []
        with torch.no_grad(), ctx:
            for i in range(1 + a.iters):
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                model(img, text=["liver"] * b)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                if i:
                    times.append(time.perf_counter() - t0)
        times.sort()
        print(f"call {prec} batch {b} {times[len(times) // 2]:.4f}")
sys.exit(0 if ok else 1)
