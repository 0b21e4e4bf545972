"""`segvol serve` driven by MONAI Label's own clients (monailabel 0.8.5, installed --no-deps):
`monailabel.client.MONAILabelClient` and the Slicer module's `MONAILabelLib/client.py` shipped
in the same wheel, imported by path. Masks must be voxel-identical to `segvol segment` with the
same prompts (tiny weights); bad requests get their 4xx and the server keeps serving.

Run through tools/ci/serve.sh (it sets SEGVOL_BIN and installs the clients).
"""

import concurrent.futures
import glob
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
import requests

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("SEGVOL_BIN", str(ROOT / "target" / "release" / "segvol"))
MODEL = ROOT / "tests" / "fixtures" / "tiny" / "model"
CT = ROOT / "tests" / "fixtures" / "data" / "example_ct_sm.nii.gz"

# The prompts of the identity tests: IJK voxel indices of the example CT (122 x 101 x 30).
FOREGROUND = [[60, 50, 15], [70, 45, 14]]
BACKGROUND = [[20, 20, 10]]
# MONAI Label's roi order [i0, i1, j0, j1, k0, k1]; i given max-first, as Slicer sends it for
# an image whose i axis runs against RAS.
ROI = [90, 40, 30, 80, 5, 25]
BOX = "40,30,5,90,80,25"  # the same box as `segvol segment --box` takes it


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_slicer_client():
    """The Slicer plugin's client module, from the installed wheel's data files."""
    found = glob.glob(
        os.path.join(sys.prefix, "monailabel", "plugins", "slicer", "MONAILabel", "MONAILabelLib", "client.py")
    )
    assert found, f"MONAILabelLib/client.py not found under {sys.prefix}"
    spec = importlib.util.spec_from_file_location("slicer_monailabel_client", found[0])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Server:
    def __init__(self, *extra):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="segvol-serve-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [BIN, "serve", "--model", str(MODEL), "--listen", f"127.0.0.1:{self.port}", *extra],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 60
        while time.time() < deadline:
            assert self.proc.poll() is None, self.logs()
            try:
                if requests.get(self.url + "/health", timeout=2).ok:
                    return
            except requests.ConnectionError:
                time.sleep(0.1)
        raise AssertionError("server did not start:\n" + self.logs())

    def logs(self):
        return Path(self.log.name).read_text(errors="replace")

    def alive(self):
        assert self.proc.poll() is None, self.logs()
        assert requests.get(self.url + "/health", timeout=5).json()["ok"]

    def rss_bytes(self):
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server():
    s = Server("--max-upload", "16M", "--mem-limit", "2G")
    yield s
    rc = s.stop()
    assert rc == 0, f"server exit status {rc}\n{s.logs()}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """`segvol segment` masks with the test's prompts (text + points + box)."""
    d = tmp_path_factory.mktemp("ref")
    out = {}
    for name, text in [("liver", ["--text", "liver"]), ("spatial", [])]:
        path = d / f"{name}.nii.gz"
        cmd = [BIN, "segment", str(CT), "--model", str(MODEL), "--out", str(path), *text, "--box", BOX]
        for p in FOREGROUND:
            cmd += ["--point", ",".join(map(str, p))]
        for p in BACKGROUND:
            cmd += ["--negative-point", ",".join(map(str, p))]
        subprocess.run(cmd, check=True, capture_output=True, timeout=600)
        out[name] = path
    return out


def params(label="liver", ext=".nii.gz"):
    return {
        "label": label,
        "foreground": FOREGROUND,
        "background": BACKGROUND,
        "roi": ROI,
        "result_extension": ext,
        "result_dtype": "uint8",
    }


def voxels_of(path):
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img


def test_info_with_both_clients(server):
    from monailabel.client import MONAILabelClient

    for client in (MONAILabelClient(server.url), load_slicer_client().MONAILabelClient(server.url)):
        assert client.auth_enabled() is False
        info = client.info()
        assert "config" not in info, "a top-level config key makes Slicer refuse the server"
        m = info["models"]["segvol"]
        assert m["type"] == "deepgrow" and m["dimension"] == 3
        assert m["labels"][:3] == ["liver", "right kidney", "spleen"]
        assert info["labels"] == m["labels"]
        assert {"sessions", "resident_bytes", "queue_depth"} <= set(info["segvol"])


def test_upload_and_infer_identical_to_segment(server, reference, tmp_path):
    from monailabel.client import MONAILabelClient

    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    assert client.upload_image(str(CT), "ct1")["image"] == "ct1"
    ref, ref_img = voxels_of(reference["liver"])
    # First infer opens the session, the second reuses it: both identical to segment.
    for want_session in ("opened", "reused"):
        result, p = client.infer("segvol", "ct1", params())
        assert p["session"] == want_session
        assert p["label_names"] == {"liver": 1}
        got, img = voxels_of(result)
        assert got.dtype == np.uint8
        assert np.array_equal(got, ref), "mask differs from segvol segment"
        np.testing.assert_array_equal(img.affine, ref_img.affine)
        assert img.header.get_qform(coded=True)[1] == ref_img.header.get_qform(coded=True)[1]
        # The same header as segment's NIfTI writer, byte for byte.
        assert Path(result).read_bytes() == reference["liver"].read_bytes()
    assert got.sum() > 0


def test_nrrd_result_geometry(server, reference, tmp_path):
    from monailabel.client import MONAILabelClient

    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    client.upload_image(str(CT), "ct-nrrd")
    result, p = client.infer("segvol", "ct-nrrd", params(ext=".nrrd"))
    assert result.endswith(".nrrd")
    data, hdr = nrrd.read(result)
    ref, ref_img = voxels_of(reference["liver"])
    assert data.dtype == np.uint8 and data.shape == ref.shape
    assert np.array_equal(data, ref)
    assert hdr["space"] == "left-posterior-superior"
    # LPS = RAS with x and y negated.
    flip = np.diag([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(hdr["space directions"], (flip @ ref_img.affine[:3, :3]).T, atol=1e-6)
    np.testing.assert_allclose(hdr["space origin"], flip @ ref_img.affine[:3, 3], atol=1e-4)


def test_slicer_client_session_flow(server, reference, tmp_path):
    """What Slicer does for a local volume: PUT /session/, GET /session/{id}, then infers
    with the session id, asking for .nrrd uint8 (MONAILabel.py `infer`)."""
    slicer = load_slicer_client()
    client = slicer.MONAILabelClient(server.url, tmpdir=str(tmp_path))
    # Slicer saves the node as NRRD or NIfTI; upload an NRRD copy of the CT to read that path.
    vol, img = voxels_of(CT)
    flip = np.diag([-1.0, -1.0, 1.0])
    src = tmp_path / "ct.nrrd"
    nrrd.write(
        str(src),
        vol.astype(np.int16),
        {
            "space": "left-posterior-superior",
            "space directions": (flip @ img.affine[:3, :3]).T,
            "space origin": flip @ img.affine[:3, 3],
            "encoding": "gzip",
        },
    )
    sess = client.create_session(str(src))
    sid = sess["session_id"]
    assert client.get_session(sid)["session_id"] == sid
    p = params(ext=".nrrd")
    result, out = client.infer("segvol", "ct", p, session_id=sid)
    data, hdr = nrrd.read(result)
    ref, _ = voxels_of(reference["liver"])
    assert np.array_equal(data, ref)
    np.testing.assert_allclose(hdr["space origin"], flip @ img.affine[:3, 3], atol=1e-4)
    # A spatial-only prompt (Slicer's default segment name is no text).
    result, out = client.infer("segvol", "ct", params(label="Segment_1", ext=".nii.gz"), session_id=sid)
    ref_s, _ = voxels_of(reference["spatial"])
    assert np.array_equal(voxels_of(result)[0], ref_s)
    client.remove_session(sid)
    with pytest.raises(Exception):
        client.get_session(sid)


def test_output_modes(server):
    requests.put(server.url + "/datastore/?image=ct-out", files={"file": ("ct.nii.gz", CT.read_bytes())}).raise_for_status()
    form = {"params": (None, json.dumps(params()))}
    r = requests.post(server.url + "/infer/segvol?image=ct-out&output=json", files=form)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    assert r.json()["label_names"] == {"liver": 1}
    r = requests.post(server.url + "/infer/segvol?image=ct-out&output=image", files=form)
    assert r.status_code == 200 and r.content[:2] == b"\x1f\x8b"
    assert ".nii.gz" in r.headers["content-disposition"]


def bad_requests(url):
    """One request of each bad class, with the status and a word its detail must contain."""
    ok_form = {"params": (None, json.dumps(params()))}
    return [
        ("malformed JSON params", lambda: requests.post(url + "/infer/segvol?image=ct-bad", files={"params": (None, "{oops")}), 400, "not valid JSON"),
        ("point outside", lambda: requests.post(url + "/infer/segvol?image=ct-bad", files={"params": (None, json.dumps({"label": "liver", "foreground": [[500, 1, 1]]}))}), 400, "outside the image"),
        ("unknown image", lambda: requests.post(url + "/infer/segvol?image=nope", files=ok_form), 404, "`nope` not found"),
        ("unknown model", lambda: requests.post(url + "/infer/other?image=ct-bad", files=ok_form), 404, "model `other`"),
        ("non-image upload", lambda: requests.put(url + "/datastore/?image=x", files={"file": ("notes.txt", b"hello")}), 415, "not an image"),
        ("corrupt image upload", lambda: requests.put(url + "/datastore/?image=x", files={"file": ("x.nii.gz", b"\x1f\x8bgarbage")}), 400, "upload"),
        ("corrupt nrrd upload", lambda: requests.put(url + "/datastore/?image=x", files={"file": ("x.nrrd", b"NRRD0004\ntype: complex\n\n")}), 400, "type `complex`"),
        ("wrong content type", lambda: requests.post(url + "/infer/segvol?image=ct-bad", json=params()), 415, "multipart/form-data"),
        ("too-large upload", lambda: requests.put(url + "/datastore/?image=big", files={"file": ("big.nii", b"\0" * (17 << 20))}), 413, "upload limit"),
        ("bad roi", lambda: requests.post(url + "/infer/segvol?image=ct-bad", files={"params": (None, json.dumps({"roi": [1, 2]}))}), 400, "roi"),
        ("no prompt", lambda: requests.post(url + "/infer/segvol?image=ct-bad", files={"params": (None, "{}")}), 400, "no prompt"),
    ]


def test_bad_requests_between_good_ones(server, reference, tmp_path):
    from monailabel.client import MONAILabelClient

    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    client.upload_image(str(CT), "ct-bad")
    ref, _ = voxels_of(reference["liver"])
    for name, send, status, word in bad_requests(server.url):
        r = send()
        assert r.status_code == status, f"{name}: {r.status_code} {r.text}"
        detail = r.json()["detail"]
        assert word in detail, f"{name}: {detail}"
        server.alive()
        result, _ = client.infer("segvol", "ct-bad", params())
        assert np.array_equal(voxels_of(result)[0], ref), f"after {name}"


def test_auth_with_token(tmp_path):
    s = Server("--token", "s3cret")
    try:
        from monailabel.client import MONAILabelClient

        client = MONAILabelClient(s.url, tmpdir=str(tmp_path))
        assert client.auth_enabled() is True
        with pytest.raises(Exception):
            client.info()
        assert not client.auth_valid_token()
        with pytest.raises(Exception):
            client.auth_token("anyone", "wrong")
        client.update_auth(client.auth_token("anyone", "s3cret"))
        assert client.auth_valid_token()
        assert client.info()["models"]["segvol"]["type"] == "deepgrow"
    finally:
        assert s.stop() == 0, s.logs()


def test_load(tmp_path):
    """8 concurrent clients x 25 infers on 3 uploaded images: no error, no dropped request,
    RSS bounded by the budget; prints p50/p99 latency and throughput."""
    budget = 1 << 30
    s = Server("--mem-limit", str(budget), "--queue", "64")
    try:
        from monailabel.client import MONAILabelClient

        base = MONAILabelClient(s.url, tmpdir=str(tmp_path))
        ids = [f"load{i}" for i in range(3)]
        for i in ids:
            base.upload_image(str(CT), i)
        rss0 = s.rss_bytes()
        prompts = [
            {"label": "liver", "result_extension": ".nrrd"},
            {"label": "spleen", "foreground": FOREGROUND, "result_extension": ".nii.gz"},
            {"roi": ROI, "background": BACKGROUND, "result_extension": ".nrrd"},
        ]

        def worker(c):
            d = tmp_path / f"c{c}"
            d.mkdir()
            cl = MONAILabelClient(s.url, tmpdir=str(d))
            lat = []
            for n in range(25):
                t = time.perf_counter()
                result, p = cl.infer("segvol", ids[(c + n) % 3], dict(prompts[n % 3]))
                lat.append(time.perf_counter() - t)
                assert os.path.getsize(result) > 0 and "label_names" in p
            return lat

        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            lats = [x for f in [pool.submit(worker, c) for c in range(8)] for x in f.result(timeout=900)]
        wall = time.perf_counter() - t0
        assert len(lats) == 200
        rss = s.rss_bytes()
        health = requests.get(s.url + "/health").json()
        assert health["resident_bytes"] <= budget
        assert rss <= rss0 + budget, f"RSS {rss} grew past the budget from {rss0}"
        lats.sort()
        p50, p99 = lats[100], lats[int(0.99 * 200) - 1]
        line = (
            f"LOAD: 8 clients x 25 infers on 3 images (tiny weights, cpu): p50 {p50 * 1000:.0f} ms, "
            f"p99 {p99 * 1000:.0f} ms, {200 / wall:.1f} infers/s, wall {wall:.1f} s, "
            f"RSS {rss0 >> 20} -> {rss >> 20} MiB, sessions {health['sessions']}, budget {budget >> 20} MiB"
        )
        print(line)
        out = os.environ.get("SEGVOL_LOAD_REPORT")
        if out:
            Path(out).write_text(line + "\n")
    finally:
        assert s.stop() == 0, s.logs()


def test_sigterm_drains_in_flight(tmp_path):
    """SIGTERM while an infer runs: the infer still completes, then the server exits 0."""
    s = Server()
    try:
        requests.put(s.url + "/datastore/?image=d", files={"file": ("ct.nii.gz", CT.read_bytes())}).raise_for_status()
        form = {"params": (None, json.dumps(params()))}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(requests.post, s.url + "/infer/segvol?image=d&output=json", files=form, timeout=120)
            time.sleep(0.3)
            s.proc.terminate()
            r = fut.result()
        assert r.status_code == 200, r.text
        assert s.proc.wait(timeout=60) == 0, s.logs()
        assert "finishing the requests in flight" in s.logs()
    finally:
        s.stop()
