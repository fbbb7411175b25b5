"""Exchange formats: ONNX (verification only) and MONAI bundles (in and out), with real tiny MONAI nets,
real onnxruntime sessions and bundles built at test time."""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from StealthMarkLib.bundle import Bundle, bump_version, is_bundle
from StealthMarkLib.cli import main
from StealthMarkLib.errors import InputError, ModelError
from StealthMarkLib.key import create_key
from StealthMarkLib.models import ModelSpec, SegmentationModel, build_network, load_model
from StealthMarkLib.onnx_model import export_onnx
from StealthMarkLib.sample_data import sample_paths

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")]

SIZE = 64
ARGS = {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2],
        "num_res_units": 1}
SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json"


def cli(*args) -> int:
    return main([*map(str, args), "--progress", "none"])


def tiny(seed: int = 0, size: int = SIZE) -> SegmentationModel:
    torch.manual_seed(seed)
    spec = ModelSpec("UNet", dict(ARGS), image_size=[size, size])
    return SegmentationModel(build_network(spec), spec, device="cpu")


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


# -- ONNX ----------------------------------------------------------------------------------------------------
def test_onnx_export_matches_torch_in_chunks(tmp_path):
    model = tiny()
    path = export_onnx(model, tmp_path / "m.onnx")
    assert leftovers(tmp_path) == []
    onnx_model = load_model(path, device="cpu", max_batch=3)
    assert onnx_model.spec.image_size == [SIZE, SIZE] and onnx_model.in_channels == 1
    assert onnx_model.num_classes == 2 and onnx_model.verify_only
    x = torch.rand(7, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    calls = []
    module = onnx_model.module
    run = module._run
    module._run = lambda arr: calls.append(len(arr)) or run(arr)  # observe the batches, not replace them
    p_onnx, p_torch = onnx_model(x), model(x)
    assert calls == [3, 3, 1]
    assert p_onnx.shape == (7, 2, SIZE, SIZE)
    assert torch.allclose(p_onnx, p_torch, atol=1e-4)
    assert "UNet" in json.dumps(onnx_model.spec.metadata)  # the spec travels in the file's metadata


def _export_raw(module: torch.nn.Module, example: tuple, path: Path, dynamic: dict | None = None, names=("x",)):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), example, str(path), input_names=list(names), output_names=["y"],
                          dynamic_axes=dynamic, dynamo=False)
    return path


def test_onnx_fixed_batch_one_and_dynamic_size_logits(tmp_path):
    net = tiny().module.eval()
    x = torch.rand(5, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = torch.softmax(net(x), 1)
    # batch fixed at 1: looped image by image
    fixed = load_model(_export_raw(net, (x[:1],), tmp_path / "b1.onnx"), device="cpu", max_batch=4, logits=True)
    assert fixed.module.fixed_batch == 1 and fixed.spec.image_size == [SIZE, SIZE]
    assert torch.allclose(fixed(x), want, atol=1e-4)
    # batch, height and width dynamic: the size comes from the spec or --image-size, K from the first answer
    dyn = load_model(_export_raw(net, (x[:1],), tmp_path / "dyn.onnx",
                                 {"x": {0: "b", 2: "h", 3: "w"}, "y": {0: "b", 2: "h", 3: "w"}}),
                     device="cpu", logits=True)
    assert dyn.spec.image_size is None
    assert torch.allclose(dyn(x), want, atol=1e-4)
    from StealthMarkLib.workflows import model_size

    with pytest.raises(InputError, match="--image-size"):
        model_size(dyn)
    assert model_size(dyn, (SIZE, SIZE)) == (SIZE, SIZE)


class TwoInputs(torch.nn.Module):
    def forward(self, x, y):
        return x + y


class Flat(torch.nn.Module):
    def forward(self, x):
        return torch.sigmoid(x)


def test_bad_onnx_inputs_are_refused(tmp_path):
    two = _export_raw(TwoInputs(), (torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8)), tmp_path / "two.onnx",
                      names=("x", "y"))
    with pytest.raises(ModelError, match=r"2 inputs .*expected one image input \(B, C, H, W\)"):
        load_model(two, device="cpu")
    rank3 = _export_raw(Flat(), (torch.zeros(1, 8, 8),), tmp_path / "rank3.onnx")
    with pytest.raises(ModelError, match=r"rank 3\).*expected a rank-4 image input"):
        load_model(rank3, device="cpu")
    rgb = _export_raw(torch.nn.Conv2d(3, 2, 1), (torch.zeros(1, 3, 16, 16),), tmp_path / "rgb.onnx")
    (tmp_path / "rgb.json").write_text(json.dumps({"network": None, "args": {}, "in_channels": 1}))
    with pytest.raises(ModelError, match="takes 3 input channel.*spec says in_channels 1"):
        load_model(rgb, device="cpu", logits=True)
    (tmp_path / "rgb.json").unlink()
    model = load_model(rgb, device="cpu", logits=True)
    assert model.in_channels == 3
    with pytest.raises(InputError, match="3 input channel"):
        model(torch.zeros(2, 1, 16, 16))
    with pytest.raises(InputError, match="16 x 16"):
        model(torch.zeros(2, 3, 20, 20))
    (tmp_path / "junk.onnx").write_bytes(b"not an onnx file at all")
    with pytest.raises(ModelError, match="cannot be read as an ONNX model"):
        load_model(tmp_path / "junk.onnx", device="cpu")


def test_verify_cli_on_onnx_and_embed_refused(tmp_path, capsys):
    onnx_path = export_onnx(tiny(), tmp_path / "m.onnx")
    key = create_key("SM:ONNX-1", seed=5).save(tmp_path / "key.json")
    assert cli("verify", "--model", onnx_path, "--key", key, "--out", tmp_path / "rep", "--samples", 30,
               "--device", "cpu") == 0
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["verdict"] != "owned" and report["n_queries"] >= 30
    assert report["model_sha256"] and report["device"].startswith("cpu")
    capsys.readouterr()
    t1, mask = sample_paths()
    assert cli("embed", "--model", onnx_path, "--data", t1, "--labels", mask, "--key", key,
               "--out", tmp_path / "wm.onnx", "--steps", 2, "--device", "cpu") == 2
    assert "verified but not watermarked" in capsys.readouterr().err
    assert not (tmp_path / "wm.onnx").exists() and not (tmp_path / "wm.harmlessness.json").exists()


# -- MONAI bundles -------------------------------------------------------------------------------------------
# The metadata schema MONAI names in "schema" lives at a URL this machine cannot reach; verify_metadata skips
# the download when its `filepath` exists, so the test gives it a local schema of the specification's
# required fields (docs/source/mb_specification.rst), and monai.bundle.verify_metadata validates against it.
LOCAL_SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "required": ["version", "changelog", "monai_version", "pytorch_version", "numpy_version",
                 "required_packages_version", "task", "description", "authors", "copyright",
                 "network_data_format"],
    "properties": {
        "version": {"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
        "changelog": {"type": "object", "additionalProperties": {"type": "string"}},
        "monai_version": {"type": "string"}, "pytorch_version": {"type": "string"},
        "numpy_version": {"type": "string"}, "required_packages_version": {"type": "object"},
        "task": {"type": "string"}, "description": {"type": "string"}, "authors": {"type": "string"},
        "copyright": {"type": "string"},
        "network_data_format": {"type": "object", "required": ["inputs", "outputs"]},
    },
}


def metadata(version: str = "0.2.3", shape: list | None = None) -> dict:
    """A bundle's metadata.json; ``shape``: the input's and output's spatial_shape (default [SIZE, SIZE])."""
    shape = [SIZE, SIZE] if shape is None else shape
    return {
        "schema": SCHEMA_URL, "version": version,
        "changelog": {version: "tiny test bundle", "0.0.1": "first"},
        "monai_version": "1.4.0", "pytorch_version": "2.4.0", "numpy_version": "1.26.0",
        "required_packages_version": {}, "task": "brain mask segmentation", "description": "a tiny test UNet",
        "authors": "StealthMark tests", "copyright": "none",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "magnitude", "num_channels": 1,
                                 "spatial_shape": shape, "dtype": "float32"}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 2,
                                 "spatial_shape": shape, "dtype": "float32"}}},
    }


def inference_config(network_def: dict | None = None) -> dict:
    return {
        "imports": ["$import os"],                       # never run: only network_def is read
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "num_classes": 2, "chans": [4, 8],
        "network_def": network_def or {"_target_": "UNet", "spatial_dims": 2, "in_channels": 1,
                                       "out_channels": "@num_classes", "channels": "@chans", "strides": [2],
                                       "num_res_units": 1},
        "network": "$@network_def.to(@device)",
    }


def make_bundle(root: Path, zipped: bool = False, model: str = "pt", config: dict | None = None,
                meta: dict | None = None, extra: dict | None = None) -> tuple[Path, torch.nn.Module]:
    """A bundle folder root/tiny_bundle (or root/tiny_bundle.zip with that top folder) and its network."""
    net = tiny(3).module.eval()
    files: dict[str, bytes] = {
        "configs/metadata.json": json.dumps(meta if meta is not None else metadata()).encode(),
        "configs/inference.json": json.dumps(config or inference_config()).encode(),
        "docs/README.md": b"# tiny bundle\n",
        **(extra or {}),
    }
    folder = root / "tiny_bundle"
    if model in ("pt", "both"):
        torch.save(net.state_dict(), root / "model.pt")
        files["models/model.pt"] = (root / "model.pt").read_bytes()
    if model in ("ts", "both"):
        torch.jit.save(torch.jit.script(net), str(root / "model.ts"))
        files["models/model.ts"] = (root / "model.ts").read_bytes()
    if zipped:
        path = root / "tiny_bundle.zip"
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in files.items():
                zf.writestr(f"tiny_bundle/{name}", data)
        return path, net
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder, net


@pytest.mark.parametrize("zipped,model", [(False, "pt"), (True, "ts")])
def test_load_bundle_matches_network(tmp_path, zipped, model):
    path, net = make_bundle(tmp_path, zipped, model)
    assert is_bundle(path)
    m = load_model(path, device="cpu")
    x = torch.rand(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = torch.softmax(net(x), 1)
    assert m.spec.image_size == [SIZE, SIZE] and m.spec.head == "softmax" and m.num_classes == 2
    assert torch.allclose(m(x), want, atol=1e-5)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """Embed a folder bundle (model.pt + model.ts + an onnx copy) and a zip bundle, a few steps each."""
    root = tmp_path_factory.mktemp("bundles")
    key = create_key("SM:BUNDLE-1", seed=987654321).save(root / "key.json")
    t1, mask = sample_paths()
    out = {}
    for zipped in (False, True):
        sub = root / ("zip" if zipped else "dir")
        sub.mkdir()
        extra = {} if zipped else {"models/model.onnx": b"an unwatermarked copy"}
        src, _ = make_bundle(sub, zipped, "ts" if zipped else "both", extra=extra)
        dest = sub / ("wm_bundle.zip" if zipped else "wm_bundle")
        rc = cli("embed", "--model", src, "--data", t1, "--labels", mask, "--label", "any", "--key", key,
                 "--out", dest, "--steps", 3, "--device", "cpu")
        assert rc == 0
        out[zipped] = (src, dest)
    return root, key, out


def test_embedded_folder_bundle_layout_version_changelog(embedded):
    root, key, out = embedded
    src, dest = out[False]
    assert dest.is_dir() and leftovers(dest.parent) == []
    names = Bundle(dest).names()
    assert names == ["configs/inference.json", "configs/metadata.json", "docs/README.md",
                     "models/model.pt", "models/model.ts"]  # the unwatermarked model.onnx is not carried over
    assert (dest / "configs/inference.json").read_bytes() == (src / "configs/inference.json").read_bytes()
    meta = json.loads((dest / "configs/metadata.json").read_text())
    assert meta["version"] == "0.2.4"
    assert list(meta["changelog"])[:3] == ["0.2.4", "0.2.3", "0.0.1"]
    assert "StealthMark" in meta["changelog"]["0.2.4"]
    block = meta["stealthmark"]
    from StealthMarkLib.key import load_key

    k = load_key(key)
    assert block["key_commitment"] == k.commitment
    assert block["training"]["steps"] == 3 and block["spec"]["image_size"] == [SIZE, SIZE]
    text = json.dumps(meta).lower()
    assert k.texture.seed == 987654321
    assert "seed" not in text and str(k.texture.seed) not in text and str(k.lime.seed) not in text
    harm = json.loads((dest.parent / "wm_bundle.harmlessness.json").read_text())
    assert "dice_drop_points" in harm
    # both model files are the watermarked network, and the output loads like the input
    wm = load_model(dest, device="cpu")
    x = torch.rand(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    orig = load_model(src, device="cpu")
    assert not torch.allclose(wm(x), orig(x), atol=1e-6)
    sd = torch.load(dest / "models/model.pt", weights_only=True)
    ts = torch.jit.load(str(dest / "models/model.ts"))
    with torch.no_grad():
        assert torch.allclose(torch.softmax(ts(x), 1), wm(x), atol=1e-5)
    assert set(sd) == set(orig.module.state_dict())


def test_embedded_zip_bundle_keeps_top_folder(embedded, tmp_path):
    _, _, out = embedded
    src, dest = out[True]
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dest) as b:
        assert sorted(a.namelist()) == sorted(b.namelist())
        assert all(n.startswith("tiny_bundle/") for n in b.namelist())
        meta = json.loads(b.read("tiny_bundle/configs/metadata.json"))
    assert meta["version"] == "0.2.4" and "stealthmark" in meta
    assert load_model(dest, device="cpu").spec.image_size == [SIZE, SIZE]
    key = embedded[1]
    assert cli("verify", "--model", dest, "--key", key, "--out", tmp_path / "rep", "--samples", 30,
               "--device", "cpu") == 0
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["model"] == str(dest) and report["n_queries"] >= 30


def test_watermarked_metadata_passes_monai_verify_metadata(embedded, tmp_path):
    pytest.importorskip("jsonschema")
    from monai.bundle import verify_metadata

    _, _, out = embedded
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(LOCAL_SCHEMA))
    md5 = __import__("hashlib").md5(schema.read_bytes()).hexdigest()
    for _, dest in out.values():
        meta_file = tmp_path / "metadata.json"
        meta_file.write_text(json.dumps(Bundle(dest).metadata()))
        verify_metadata(meta_file=str(meta_file), filepath=str(schema), hash_val=md5)  # ValueError if invalid
    broken = Bundle(out[False][1]).metadata()
    broken["version"] = 5
    meta_file.write_text(json.dumps(broken))
    with pytest.raises(ValueError):
        verify_metadata(meta_file=str(meta_file), filepath=str(schema), hash_val=md5)


def _key(tmp_path) -> Path:
    key = tmp_path / "key.json"
    if not key.exists():
        create_key("SM:BAD-1", seed=3).save(key)
    return key


def _embed(tmp_path, src, dest, capsys) -> tuple[int, str]:
    key = _key(tmp_path)
    t1, mask = sample_paths()
    capsys.readouterr()
    rc = cli("embed", "--model", src, "--data", t1, "--labels", mask, "--label", "any", "--key", key,
             "--out", dest, "--steps", 1, "--device", "cpu")
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("case,expect", [
    ("no_metadata", "has no configs/metadata.json"),
    ("bad_json", "metadata.json in the bundle .* is not valid JSON"),
    ("no_model", "has no model file: expected models/model.pt"),
    ("bad_version", "version 'v1' is not MAJOR.MINOR.PATCH"),
    ("target", "_target_ 'torch.nn.Identity' is refused"),
    ("expression", "expression .* is refused"),
    ("nested_target", "another object to instantiate is refused"),
    ("3d_no_roi", "holds a 3-D UNet but does not record the ROI .*spatial_shape is \\[64, 64\\]"),
    ("3d_segresnet", "holds a 3-D SegResNet; StealthMark watermarks 3-D models for MONAI UNet only"),
])
def test_bad_bundles_write_nothing(tmp_path, capsys, case, expect):
    net_def = dict(inference_config()["network_def"])
    config, meta, model = None, None, "pt"
    if case == "target":
        net_def = {"_target_": "torch.nn.Identity"}
    elif case == "expression":
        net_def["channels"] = "$__import__('os').system('touch pwned')"
    elif case == "nested_target":
        net_def["act"] = {"_target_": "builtins.print"}
    elif case == "3d_no_roi":  # 3-D bundles are read (Testing/test_volume3d_formats.py), given their ROI
        net_def["spatial_dims"] = 3
    elif case == "3d_segresnet":
        net_def = {"_target_": "SegResNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2}
    elif case == "bad_version":
        meta = metadata("v1")
    config = inference_config(net_def)
    src, _ = make_bundle(tmp_path, config=config, meta=meta, model="none" if case == "no_model" else model)
    if case == "no_metadata":
        (src / "configs/metadata.json").unlink()
    elif case == "bad_json":
        (src / "configs/metadata.json").write_text("{not json")
    _key(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    rc, err = _embed(tmp_path, src, tmp_path / "out_bundle", capsys)
    assert rc == 2
    assert __import__("re").search(expect, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temporary left
    assert not (Path.cwd() / "pwned").exists()


def test_bundle_output_must_match_layout(tmp_path, capsys):
    src, _ = make_bundle(tmp_path)
    rc, err = _embed(tmp_path, src, tmp_path / "out.zip", capsys)
    assert rc == 2 and "folder, so OUT must be a folder" in err
    rc, err = _embed(tmp_path, src, src / "inner", capsys)
    assert rc == 2 and "outside the input bundle" in err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    rc, err = _embed(tmp_path, src, tmp_path / "busy", capsys)
    assert rc == 2 and "not empty and not a MONAI bundle" in err
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "out.zip").exists()


def test_bump_version():
    assert bump_version("0.1.0", "x") == "0.1.1"
    assert bump_version("1.2.9-rc1", "x") == "1.2.10"
    with pytest.raises(ModelError, match="MAJOR.MINOR.PATCH"):
        bump_version(None, "x")


def test_folder_without_bundle_files_is_not_a_bundle(tmp_path):
    assert not is_bundle(tmp_path)
    with pytest.raises(ModelError, match="not a MONAI bundle"):
        load_model(tmp_path, device="cpu")


class Unscriptable(torch.nn.Module):
    def forward(self, x, *rest):  # varargs: torch.jit.script refuses it
        return x


def test_write_bundle_replaces_an_earlier_bundle_and_fails_cleanly(tmp_path):
    from StealthMarkLib.bundle import plan_bundle_output, stealthmark_block, write_bundle

    src, net = make_bundle(tmp_path, model="both")
    spec = load_model(src, device="cpu").spec
    block = stealthmark_block("c0" * 32, {"steps": 1}, "test data", spec)
    out = tmp_path / "out_bundle"
    write_bundle(plan_bundle_output(src, out), net, spec, block)
    first = json.loads((out / "configs/metadata.json").read_text())
    (out / "models/stale.txt").write_text("from the earlier run")
    write_bundle(plan_bundle_output(src, out), net, spec, dict(block, key_commitment="d1" * 32))
    again = json.loads((out / "configs/metadata.json").read_text())
    assert first["stealthmark"]["key_commitment"] != again["stealthmark"]["key_commitment"]
    assert not (out / "models/stale.txt").exists() and leftovers(tmp_path) == []
    with pytest.raises(ModelError, match="cannot be written as TorchScript"):
        write_bundle(plan_bundle_output(src, tmp_path / "never"), Unscriptable(), spec, block)
    assert not (tmp_path / "never").exists() and leftovers(tmp_path) == []
    with pytest.raises(ModelError, match="key material"):
        write_bundle(plan_bundle_output(src, tmp_path / "never"), net, spec, dict(block, seed=1))
    assert not (tmp_path / "never").exists()
