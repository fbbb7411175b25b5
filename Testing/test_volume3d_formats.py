"""3-D models through the exchange formats (issue #6, "Formats"): ONNX (verification only), MONAI bundles
(in and out) and the remote black box (``serve``, ``verify --endpoint`` / ``--command``).

Real tiny MONAI 3-D UNets (ROI 4 x 48 x 48, the smallest in-plane size the key's 21 x 21 grid fits), real
onnxruntime sessions, bundle folders and zips written at test time, a real HTTP server on 127.0.0.1, the real
LIME engine and QR decoders. Each format's verification is compared with the TorchScript model's (same key,
same LIME seed): the same slabs, observed modules and verdict, and the same attribution to float tolerance.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shlex
import sys
import threading
import urllib.error
import urllib.request
import warnings
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from StealthMarkLib import remote
from StealthMarkLib.bundle import Bundle, is_bundle
from StealthMarkLib.cli import main
from StealthMarkLib.errors import InputError, ModelError
from StealthMarkLib.key import create_key, load_key
from StealthMarkLib.models import ModelSpec, SegmentationModel, build_network, load_model, save_model
from StealthMarkLib.onnx_model import export_onnx
from StealthMarkLib.sample_data import SAMPLE_INTENSITY, sample_paths
from StealthMarkLib.volume import read_volume

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")]

ROOT = Path(__file__).resolve().parents[1]
ROI = (4, 48, 48)
ARGS3 = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2],
         "num_res_units": 1}
SAMPLES = 64
SEED = 7
KEY_SEED = 31337
COMPARED = ("verdict", "payload_decoded", "data_module_agreement", "bit_errors", "n_data_modules", "n_queries",
            "observed_modules", "slices", "n_trigger_images")
# the metadata schema of test_formats.py (a local copy of the specification's required fields)
from test_formats import LOCAL_SCHEMA, metadata  # noqa: E402
from test_remote import served  # noqa: E402

TOOL = r'''
import sys
import numpy as np
import torch
torch.set_num_threads(1)
x = np.load(sys.argv[2], allow_pickle=False)
if sys.argv[4] == "flat":          # answers (B, K, H, W) to volumes: a 2-D tool
    np.save(sys.argv[3], np.full((x.shape[0], 2, *x.shape[-2:]), 0.5, np.float32))
    sys.exit(0)
m = torch.jit.load(sys.argv[1]).eval()
with torch.no_grad():
    np.save(sys.argv[3], m(torch.from_numpy(x)).numpy().astype(np.float32))
'''


def cli(*args) -> int:
    return main([*map(str, args), "--progress", "none"])


def spec3(**changes) -> ModelSpec:
    spec = ModelSpec("UNet", dict(ARGS3), image_size=list(ROI), spatial_dims=3,
                     intensity=SAMPLE_INTENSITY.to_json())
    for k, v in changes.items():
        setattr(spec, k, v)
    return spec.check()


def tiny3(seed: int = 0) -> SegmentationModel:
    torch.manual_seed(seed)
    spec = spec3()
    return SegmentationModel(build_network(spec), spec, device="cpu")


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def nothing_written(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def same_verification(got: dict, want: dict) -> None:
    assert {k: got[k] for k in COMPARED} == {k: want[k] for k in COMPARED}
    a, b = np.asarray(got["attribution"]), np.asarray(want["attribution"])
    scale = float(np.abs(b).max())
    assert scale > 0 and np.std(b) > 0   # a real, input-dependent attribution
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * scale)
    assert got["p_value"] == pytest.approx(want["p_value"], rel=1e-6)


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_torch_thread):
    tmp = tmp_path_factory.mktemp("fmt3d")
    model = tiny3(0)
    ts = save_model(model, tmp / "m3d.ts", model.spec)
    onnx_path = export_onnx(model, tmp / "m3d.onnx")
    key = create_key("SM:3D-FORMATS", seed=KEY_SEED, mode="key-image", samples=SAMPLES).save(tmp / "key.json")
    spec_file = tmp / "tool3d.json"
    spec_file.write_text(json.dumps({"network": None, "args": {}, "head": "probabilities", "spatial_dims": 3,
                                     "image_size": list(ROI), "in_channels": 1, "num_classes": 2}))
    tool = tmp / "tool.py"
    tool.write_text(TOOL)
    t1, mask = sample_paths()
    return {"tmp": tmp, "model": model, "ts": ts, "onnx": onnx_path, "key": key, "spec": spec_file,
            "tool": tool, "t1": Path(t1), "mask": Path(mask)}


@pytest.fixture(scope="module")
def local_reports(world):
    """TorchScript verification on the key slab and on a blended slab of the T1: what every format must give."""
    out = {}
    for name, extra in (("slab", ()), ("volume", ("--volume", world["t1"]))):
        dest = world["tmp"] / f"local_{name}"
        assert cli("verify", "--model", world["ts"], "--key", world["key"], "--out", dest, "--samples", SAMPLES,
                   "--seed", SEED, "--device", "cpu", *extra) == 0
        out[name] = report(dest)
    return out


# -- ONNX ----------------------------------------------------------------------------------------------------
def test_onnx_export_of_a_3d_model_round_trips(world, tmp_path):
    onnx_model = load_model(world["onnx"], device="cpu", max_batch=2)
    assert onnx_model.spatial_dims == 3 and onnx_model.spec.image_size == list(ROI)
    assert onnx_model.verify_only and onnx_model.num_classes == 2 and onnx_model.in_channels == 1
    assert onnx_model.module.rank == 5 and not isinstance(onnx_model.module.input_shape[0], int)  # dynamic batch
    assert onnx_model.spec.metadata["source_network"]["args"]["spatial_dims"] == 3
    x = torch.rand(3, 1, *ROI, generator=torch.Generator().manual_seed(1))
    got, want = onnx_model(x), world["model"](x)
    assert got.shape == (3, 2, *ROI)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert not torch.allclose(got[0], got[1])
    with pytest.raises(InputError, match="3-D model takes volumes"):
        onnx_model(torch.zeros(2, 1, 48, 48))
    with pytest.raises(InputError, match=r"3-D model's ROI \[D, H, W\]"):
        export_onnx(world["model"], tmp_path / "flat.onnx", image_size=(48, 48))
    assert list(tmp_path.iterdir()) == []


def test_verify_onnx_3d_agrees_with_torchscript(world, local_reports, tmp_path):
    for name, extra in (("slab", ()), ("volume", ("--volume", world["t1"]))):
        out = tmp_path / name
        assert cli("verify", "--model", world["onnx"], "--key", world["key"], "--out", out, "--samples", SAMPLES,
                   "--seed", SEED, "--device", "cpu", *extra) == 0
        got = report(out)
        same_verification(got, local_reports[name])
        assert got["model_sha256"] == sha(world["onnx"]) != local_reports[name]["model_sha256"]
    assert len(got["slices"]) == ROI[0] and (tmp_path / "volume" / "lime_map.nii.gz").is_file()
    lime = read_volume(tmp_path / "volume" / "lime_map.nii.gz")
    assert lime.shape == read_volume(world["t1"]).shape


def _export_raw(module: torch.nn.Module, example: torch.Tensor, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (example,), str(path), input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}, dynamo=False)
    return path


def test_onnx_graph_alone_says_3d_and_a_spec_that_disagrees_is_refused(world, tmp_path, capsys):
    torch.manual_seed(2)
    net3 = build_network(spec3()).eval()
    bare = _export_raw(net3, torch.zeros(1, 1, *ROI), tmp_path / "bare3d.onnx")
    m = load_model(bare, device="cpu", logits=True)   # no spec anywhere: the rank-5 graph makes it 3-D
    assert m.spatial_dims == 3 and m.spec.image_size == list(ROI)
    x = torch.rand(2, 1, *ROI, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(m(x), torch.softmax(net3(x), 1), rtol=0, atol=1e-4)

    flat = _export_raw(build_network(ModelSpec("UNet", {**ARGS3, "spatial_dims": 2}, image_size=[48, 48])),
                       torch.zeros(1, 1, 48, 48), tmp_path / "flat.onnx")
    two = _export_raw(build_network(spec3(args={**ARGS3, "in_channels": 2}, in_channels=2)),
                      torch.zeros(1, 2, *ROI), tmp_path / "two.onnx")
    deep = tmp_path / "deep.onnx"
    deep.write_bytes(bare.read_bytes())
    sidecar = {"network": None, "args": {}, "head": "softmax", "spatial_dims": 3, "image_size": list(ROI)}
    cases = [
        (flat, sidecar, r"takes 2-D images \(B, C, H, W\) \(graph input 'x' \('b', 1, 48, 48\)\), but its spec says "
                        r"spatial_dims 3: inputs \(B, 1, 4, 48, 48\)"),
        (two, sidecar, r"takes 2 input channel\(s\) \(graph input \('b', 2, 4, 48, 48\)\), but its spec says "
                       r"in_channels 1: inputs \(B, 1, 4, 48, 48\)"),
        (deep, {**sidecar, "image_size": [8, 48, 48]},
         r"takes inputs of size 4 x 48 x 48 \(graph input \('b', 1, 4, 48, 48\)\), but its spec says image_size "
         r"\[8, 48, 48\]: inputs \(B, 1, 8, 48, 48\)"),
    ]
    for i, (path, spec, needle) in enumerate(cases):
        path.with_suffix(".json").write_text(json.dumps(spec))
        before = sha(path)
        out = tmp_path / f"rep{i}"
        capsys.readouterr()
        rc = cli("verify", "--model", path, "--key", world["key"], "--out", out, "--samples", 8, "--device", "cpu")
        err = capsys.readouterr().err
        assert rc == 2 and re.search(needle, err), err
        assert err.count("stealthmark: error:") == 1 and "Traceback" not in err
        assert nothing_written(out) and sha(path) == before
    # a 2-D spec handed to a 3-D graph: the same refusal the other way round
    with pytest.raises(ModelError, match=r"takes 3-D volumes .* spec says spatial_dims 2: inputs \(B, 1, H, W\)"):
        load_model(bare, spec=ModelSpec(None, {}, head="softmax"), device="cpu")


# -- MONAI bundles -------------------------------------------------------------------------------------------
def metadata3(version: str = "0.2.3", shape=list(ROI)) -> dict:
    """test_formats' bundle metadata with a 3-D ROI (and its own schema URL, task and description)."""
    meta = metadata(version, shape)
    meta.update(schema="https://example.invalid/meta_schema.json", task="brain mask segmentation, 3-D",
                description="a tiny 3-D UNet", changelog={version: "tiny 3-D test bundle", "0.0.1": "first"})
    return meta


def inference3(network_def: dict | None = None) -> dict:
    return {"imports": ["$import os"], "device": "$torch.device('cpu')", "num_classes": 2, "chans": [4, 8],
            "network_def": network_def or {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1,
                                           "out_channels": "@num_classes", "channels": "@chans", "strides": [2],
                                           "num_res_units": 1},
            "network": "$@network_def.to(@device)"}


def make_bundle3d(root: Path, zipped: bool = False, model: str = "pt", meta: dict | None = None,
                  config: dict | None = None, extra: dict | None = None) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(5)
    net = build_network(spec3()).eval()
    files = {"configs/metadata.json": json.dumps(meta or metadata3()).encode(),
             "docs/README.md": b"# tiny 3-D bundle\n", **(extra or {})}
    if config is not False:
        files["configs/inference.json"] = json.dumps(config or inference3()).encode()
    if model in ("pt", "both"):
        buf = io.BytesIO()
        torch.save(net.state_dict(), buf)
        files["models/model.pt"] = buf.getvalue()
    if model in ("ts", "both"):
        buf = io.BytesIO()
        torch.jit.save(torch.jit.script(net), buf)
        files["models/model.ts"] = buf.getvalue()
    if zipped:
        path = root / "unet3d_bundle.zip"
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in files.items():
                zf.writestr(f"unet3d_bundle/{name}", data)
        return path, net
    folder = root / "unet3d_bundle"
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder, net


@pytest.mark.parametrize("zipped,model,config", [(False, "pt", None), (True, "ts", None), (False, "ts", False)])
def test_3d_bundle_loads_as_its_network(tmp_path, zipped, model, config):
    path, net = make_bundle3d(tmp_path, zipped, model, config=config)
    assert is_bundle(path)
    m = load_model(path, device="cpu")
    assert m.spatial_dims == 3 and m.spec.image_size == list(ROI) and m.num_classes == 2
    assert m.spec.head == "softmax"   # MONAI networks return logits (without network_def: metadata's K = 2)
    x = torch.rand(2, 1, *ROI, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = torch.softmax(net(x), 1)
    torch.testing.assert_close(m(x), want, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def embedded3d(world):
    """A folder bundle (model.pt + model.ts + an onnx copy) and a zip bundle (model.ts), embedded 2 steps each."""
    root = world["tmp"] / "bundles"
    out = {}
    for zipped in (False, True):
        sub = root / ("zip" if zipped else "dir")
        sub.mkdir(parents=True)
        extra = {} if zipped else {"models/model.onnx": b"an unwatermarked copy"}
        src, _ = make_bundle3d(sub, zipped, "ts" if zipped else "both", extra=extra)
        dest = sub / ("wm3d.zip" if zipped else "wm3d")
        assert cli("embed", "--model", src, "--data", world["t1"], "--labels", world["mask"], "--label", "any",
                   "--key", world["key"], "--out", dest, "--steps", 2, "--device", "cpu") == 0
        out[zipped] = (src, dest)
    return out


def test_embedded_3d_folder_bundle_layout_version_changelog_commitment(world, embedded3d):
    src, dest = embedded3d[False]
    assert dest.is_dir() and not [p for p in dest.parent.iterdir() if p.name.startswith(".")]
    assert Bundle(dest).names() == ["configs/inference.json", "configs/metadata.json", "docs/README.md",
                                    "models/model.pt", "models/model.ts"]  # no unwatermarked model.onnx
    assert (dest / "configs/inference.json").read_bytes() == (src / "configs/inference.json").read_bytes()
    meta = json.loads((dest / "configs/metadata.json").read_text())
    assert meta["version"] == "0.2.4" and list(meta["changelog"])[:3] == ["0.2.4", "0.2.3", "0.0.1"]
    assert "StealthMark" in meta["changelog"]["0.2.4"]
    assert meta["network_data_format"] == metadata3()["network_data_format"]
    block, key = meta["stealthmark"], load_key(world["key"])
    assert block["key_commitment"] == key.commitment and block["training"]["steps"] == 2
    assert block["spec"]["spatial_dims"] == 3 and block["spec"]["image_size"] == list(ROI)
    text = json.dumps(meta).lower()
    assert "seed" not in text and str(KEY_SEED) not in text
    harm = json.loads((dest.parent / "wm3d.harmlessness.json").read_text())
    assert harm["roi"] == list(ROI) and "volume_sliding_window" in harm
    wm, orig = load_model(dest, device="cpu"), load_model(src, device="cpu")
    assert wm.spatial_dims == 3 and wm.spec.image_size == list(ROI)
    x = torch.rand(2, 1, *ROI, generator=torch.Generator().manual_seed(6))
    assert not torch.allclose(wm(x), orig(x), atol=1e-6)   # fine-tuned
    ts = torch.jit.load(str(dest / "models/model.ts"))
    with torch.no_grad():   # model.ts stays the raw network (logits), the same weights as model.pt
        torch.testing.assert_close(torch.softmax(ts(x), 1), wm(x), rtol=0, atol=1e-5)
    assert set(torch.load(dest / "models/model.pt", weights_only=True)) == set(orig.module.state_dict())


def test_embedded_3d_zip_bundle_keeps_layout_passes_monai_metadata_check_and_verifies(world, embedded3d, tmp_path):
    pytest.importorskip("jsonschema")
    from monai.bundle import verify_metadata

    src, dest = embedded3d[True]
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dest) as b:
        assert sorted(a.namelist()) == sorted(b.namelist())
        assert all(n.startswith("unet3d_bundle/") for n in b.namelist())
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(LOCAL_SCHEMA))
    md5 = hashlib.md5(schema.read_bytes()).hexdigest()
    for _, bundle in embedded3d.values():
        meta_file = tmp_path / "metadata.json"
        meta_file.write_text(json.dumps(Bundle(bundle).metadata()))
        verify_metadata(meta_file=str(meta_file), filepath=str(schema), hash_val=md5)  # ValueError if invalid
    out = tmp_path / "rep"
    assert cli("verify", "--model", dest, "--key", world["key"], "--volume", world["t1"], "--out", out,
               "--samples", SAMPLES, "--device", "cpu") == 0
    r = report(out)
    assert r["model"] == str(dest) and r["n_trigger_images"] == 1 and len(r["slices"]) == ROI[0]
    assert r["verdict"] in ("not-owned", "inconclusive", "owned") and (out / "lime_map.nii.gz").is_file()


def test_bad_3d_bundles_say_why_and_write_nothing(world, tmp_path, capsys):
    cases = {
        "strings": (dict(meta=metadata3(shape=["16*n", "16*n", "16*n"])),
                    r"holds a 3-D UNet but does not record the ROI .*spatial_shape is \['16\*n', '16\*n', '16\*n'\]"),
        "flat_shape": (dict(meta=metadata3(shape=[48, 48])), r"does not record the ROI .*\[48, 48\]"),
        "basicunet": (dict(config=inference3({"_target_": "BasicUNet", "spatial_dims": 3})),
                      r"holds a 3-D BasicUNet; StealthMark watermarks 3-D models for MONAI UNet only"),
        "one_d": (dict(config=inference3({**inference3()["network_def"], "spatial_dims": 1})),
                  r"holds a 1-D UNet"),
    }
    for name, (kw, needle) in cases.items():
        sub = tmp_path / name
        sub.mkdir()
        src, _ = make_bundle3d(sub, **kw)
        before = sorted(p.relative_to(sub).as_posix() for p in sub.rglob("*"))
        for command in (("embed", "--data", world["t1"], "--labels", world["mask"], "--steps", 1),
                        ("verify", "--samples", 8)):
            capsys.readouterr()
            rc = cli(command[0], "--model", src, "--key", world["key"], "--out", sub / "out", "--device", "cpu",
                     *command[1:])
            err = capsys.readouterr().err
            assert rc == 2 and re.search(needle, err), (name, err)
            assert err.count("stealthmark: error:") == 1 and "Traceback" not in err
            assert sorted(p.relative_to(sub).as_posix() for p in sub.rglob("*")) == before
    # a spec with the ROI fills in what the bundle's metadata does not say
    src = tmp_path / "strings" / "unet3d_bundle"
    m = load_model(src, spec=spec3(), device="cpu")
    assert m.spatial_dims == 3 and m.spec.image_size == list(ROI)
    with pytest.raises(ModelError, match="holds a 3-D network, but the spec given with it says spatial_dims 2"):
        load_model(src, spec=ModelSpec(None, {}, image_size=[48, 48]), device="cpu")


# -- remote: serve, --endpoint, --command ---------------------------------------------------------------------
class Vendor3D(BaseHTTPRequestHandler):
    """A third-party 3-D endpoint (real HTTP): the first path segment picks what its /info and answers say."""

    model: SegmentationModel | None = None

    def log_message(self, *args) -> None:
        pass

    def _send(self, code: int, body: bytes, ctype: str = remote.NPY_TYPE) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        mode = self.path.strip("/").split("/")[0]
        info = {"protocol": remote.PROTOCOL, "spatial_dims": 3, "image_size": None, "in_channels": 1,
                "num_classes": 2}
        if mode == "flatsize":
            info["image_size"] = [48, 48]
        elif mode in ("flatanswer", "roi"):
            info["image_size"] = list(ROI)
        self._send(200, json.dumps(info).encode(), "application/json")

    def do_POST(self) -> None:  # noqa: N802
        mode = self.path.strip("/").split("/")[0]
        x = np.load(io.BytesIO(self.rfile.read(int(self.headers["Content-Length"]))), allow_pickle=False)
        if mode == "flatanswer":   # a 2-D answer to volumes
            return self._send(200, remote.npy_bytes(np.full((x.shape[0], 2, 48, 48), 0.5, np.float32)))
        self._send(200, remote.npy_bytes(self.model.probabilities(x).numpy().astype(np.float32)))


@pytest.fixture(scope="module")
def servers(world):
    good = remote.make_server(load_model(world["ts"], device="cpu"), port=0, quiet=True)
    vendor = ThreadingHTTPServer(("127.0.0.1", 0), type("V", (Vendor3D,), {"model": load_model(world["ts"],
                                                                                                device="cpu")}))
    for s in (good, vendor):
        s.daemon_threads = True
        threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield {"url": remote.server_url(good), "vendor": remote.server_url(vendor)}
    for s in (good, vendor):
        s.shutdown()
        s.server_close()


def template(world, mode: str = "ok") -> str:
    return " ".join(shlex.quote(str(a)) for a in (sys.executable, world["tool"], world["ts"])) + \
        f" {{input}} {{output}} {mode}"


def _post(url: str, arr: np.ndarray) -> tuple[int, dict | np.ndarray]:
    req = urllib.request.Request(url + "/predict", data=remote.npy_bytes(arr), method="POST",
                                 headers={"Content-Type": remote.NPY_TYPE})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, remote.read_npy(resp.read(), "answer")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_served_3d_model_says_so_and_answers_volumes_like_the_local_model(world, servers):
    with urllib.request.urlopen(servers["url"] + "/info", timeout=30) as resp:
        info = json.loads(resp.read())
    assert info["protocol"] == remote.PROTOCOL and info["spatial_dims"] == 3 and info["image_size"] == list(ROI)
    rem = remote.open_endpoint(servers["url"], timeout=30)
    assert rem.spatial_dims == 3 and rem.spec.image_size == list(ROI) and rem.sha256 is None
    x = torch.rand(3, 1, *ROI, generator=torch.Generator().manual_seed(8))
    got = rem.probabilities(x)
    assert got.shape == (3, 2, *ROI)
    torch.testing.assert_close(got, world["model"].probabilities(x), rtol=0, atol=1e-6)
    code, probs = _post(servers["url"], x.numpy()[:1])
    assert code == 200 and probs.shape == (1, 2, *ROI)
    for arr in (np.zeros((1, 1, 48, 48), np.float32), np.zeros((1, 1, 8, 48, 48), np.float32)):
        code, doc = _post(servers["url"], arr)
        assert code == 400 and f"shape {arr.shape}; send (B, 1, 4, 48, 48)" in doc["error"], doc


def test_verify_3d_through_endpoint_and_command_matches_local(world, servers, local_reports, tmp_path):
    common = ("--key", world["key"], "--samples", SAMPLES, "--seed", SEED, "--volume", world["t1"])
    assert cli("verify", "--endpoint", servers["url"], "--out", tmp_path / "http", *common) == 0
    assert cli("verify", "--command", template(world), "--spec", world["spec"], "--out", tmp_path / "cmd",
               *common) == 0
    # an endpoint whose /info leaves the ROI null, told it by --spec
    assert cli("verify", "--endpoint", servers["vendor"] + "/nullroi", "--spec", world["spec"],
               "--out", tmp_path / "vendor", *common) == 0
    for name in ("http", "cmd", "vendor"):
        got = report(tmp_path / name)
        same_verification(got, local_reports["volume"])
        assert got["model_sha256"] is None and (tmp_path / name / "lime_map.nii.gz").is_file()
    assert report(tmp_path / "cmd")["model"].startswith("command: ")


def test_3d_remote_without_its_roi_or_with_a_2d_answer_says_why(world, servers, tmp_path, capsys):
    bad_spec = tmp_path / "deep.json"
    bad_spec.write_text(json.dumps({"network": None, "args": {}, "spatial_dims": 3, "image_size": [8, 48, 48]}))
    cases = [
        (("--command", template(world)), "--command needs --image-size H W (a 2-D tool), or --spec SPEC.json with "
                                         "spatial_dims 3"),
        (("--command", template(world, "flat"), "--spec", world["spec"]),
         "has shape (64, 2, 48, 48) for input shape (64, 1, 4, 48, 48); expected (64, K, 4, 48, 48)"),
        (("--command", template(world), "--spec", world["spec"], "--image-size", 48, 48),
         "give the tool's input size once"),
        (("--endpoint", servers["url"], "--image-size", 48, 48), "--image-size is for 2-D models"),
        (("--endpoint", servers["vendor"] + "/nullroi"), "says spatial_dims 3 but not the ROI (image_size null): "
                                                         "pass --spec"),
        (("--endpoint", servers["vendor"] + "/flatsize"), "image_size must be the ROI [D, H, W] or null"),
        (("--endpoint", servers["vendor"] + "/flatanswer"), "expected (64, K, 4, 48, 48)"),
        (("--endpoint", servers["url"], "--spec", bad_spec), "--spec says image_size [8, 48, 48] but"),
    ]
    for i, (args, needle) in enumerate(cases):
        out = tmp_path / f"out{i}"
        capsys.readouterr()
        rc = cli("verify", *args, "--key", world["key"], "--out", out, "--samples", SAMPLES, "--timeout", 30)
        err = capsys.readouterr().err
        assert rc == 2 and needle in err, (args, err)
        assert err.count("stealthmark: error:") == 1 and "Traceback" not in err
        assert nothing_written(out)


def test_serve_command_serves_a_3d_onnx_model(world):
    with served(world["onnx"]) as (rem, ended):
        assert rem.spatial_dims == 3 and rem.spec.image_size == list(ROI)
        x = torch.rand(2, 1, *ROI, generator=torch.Generator().manual_seed(9))
        torch.testing.assert_close(rem.probabilities(x), world["model"].probabilities(x), rtol=0, atol=1e-4)
    assert ended["returncode"] == 0 and "stopped serving" in ended["out"] and "1 prediction request" in ended["out"]
