"""Full-size CPU figures for docs/performance.md: first infer on an uploaded image (opens the
resident session: normalise, crop, zoom-out encode, zoom-in encodes) vs a repeat infer (cached
embeddings, decoder passes only), through MONAI Label's client.
Usage: python tools/serve/fullsize_first_vs_repeat.py SEGVOL_BIN MODEL_DIR CT [PORT]"""
import socket, subprocess, sys, tempfile, time

import requests
from monailabel.client import MONAILabelClient

bin_, model, ct = sys.argv[1:4]
port = int(sys.argv[4]) if len(sys.argv) > 4 else 0
if not port:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
url = f"http://127.0.0.1:{port}"
proc = subprocess.Popen([bin_, "serve", "--model", model, "--listen", f"127.0.0.1:{port}", "--cache", "2G"])
try:
    for _ in range(600):
        try:
            if requests.get(url + "/health", timeout=2).ok:
                break
        except requests.ConnectionError:
            time.sleep(0.2)
    c = MONAILabelClient(url, tmpdir=tempfile.mkdtemp())
    t = time.perf_counter(); c.upload_image(ct, "ct"); up = time.perf_counter() - t
    print(f"upload {up:.3f} s")
    for name in ["first", "repeat", "repeat"]:
        t = time.perf_counter()
        _, p = c.infer("segvol", "ct", {"label": "liver", "result_extension": ".nrrd"})
        wall = time.perf_counter() - t
        print(f"{name}: client {wall:.3f} s, server compute {p['latencies']['compute']:.3f} s, "
              f"queue {p['latencies']['queue']:.3f} s, session {p['session']}, "
              f"windows {p['windows']}, cached {p['cached_windows']}")
finally:
    proc.terminate(); proc.wait(timeout=60)
