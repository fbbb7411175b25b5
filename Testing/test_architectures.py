"""Architectures (UNet, BasicUNet, SegResNet, SwinUNETR, UNETR, SAM ViT), multi-class heads and colour
models: each at its smallest configuration, with real MONAI/torch networks, real files written here."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from StealthMarkLib.architectures import ARCHITECTURES, architecture_spec
from StealthMarkLib.cli import main
from StealthMarkLib.data import class_map, load_dataset
from StealthMarkLib.embed import EmbedConfig, embed_watermark, trigger_targets
from StealthMarkLib.errors import InputError, ModelError
from StealthMarkLib.key import create_key
from StealthMarkLib.lime_engine import normalised_entropy
from StealthMarkLib.metrics import flip_rate_per_class, score_segmentation
from StealthMarkLib.models import ModelSpec, SegmentationModel, build_network, load_model, save_model
from StealthMarkLib.samvit import SamViT
from StealthMarkLib.trigger import TriggerOverlay
from StealthMarkLib.workflows import run_embed, run_verify

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
SIZE = 64


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


# -- every architecture at its smallest configuration ----------------------------------------------
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_architecture_round_trips(arch, tmp_path):
    torch.manual_seed(0)
    spec = architecture_spec(arch, "tiny", SIZE, in_channels=1, num_classes=2)
    net = build_network(spec).eval()
    model = SegmentationModel(net, spec, device="cpu")
    x = torch.rand(2, 1, SIZE, SIZE)
    p = model.probabilities(x)
    assert p.shape == (2, 2, SIZE, SIZE)
    assert torch.allclose(p.sum(1), torch.ones(2, SIZE, SIZE), atol=1e-5)
    # TorchScript black box (scripted, or traced where MONAI's code cannot be scripted)
    ts = save_model(model, tmp_path / "m.ts", spec, fmt="torchscript")
    loaded = load_model(ts, device="cpu")
    assert loaded.spec.metadata["source_network"]["network"] == arch
    assert torch.allclose(loaded.probabilities(x), p, atol=1e-5)
    # state dict + spec
    sd = save_model(model, tmp_path / "m.pt", spec, fmt="state_dict")
    again = load_model(sd, device="cpu")
    assert again.spec.network == arch
    assert torch.allclose(again.probabilities(x), p, atol=1e-5)


def test_a_traced_model_fine_tuned_in_this_process_still_answers(tmp_path):
    # SwinUNETR is saved by tracing. Once TorchScript's executor has run a module with gradients a few
    # times (embedding fine-tunes it), it runs it through differentiable graphs, which inference mode
    # refused: harmlessness and LIME on the fine-tuned module failed after a whole embedding (found by
    # benchmarks/models.py --archs SwinUNETR). Queries now run under no_grad.
    torch.manual_seed(0)
    spec = architecture_spec("SwinUNETR", "tiny", SIZE)
    path = save_model(SegmentationModel(build_network(spec), spec, device="cpu"), tmp_path / "sw.ts", spec)
    model = load_model(path, device="cpu")
    assert isinstance(model.module, torch.jit.ScriptModule)
    x = torch.rand(2, 1, SIZE, SIZE)
    for _ in range(3):
        model.forward_train(x).sum().backward()
    p = model.probabilities(x)
    assert p.shape == (2, 2, SIZE, SIZE) and not p.requires_grad
    assert torch.allclose(p.sum(1), torch.ones(2, SIZE, SIZE), atol=1e-5)
    key = create_key("SM:TRACED", seed=4, tile=3)
    # LIME on the same fine-tuned module, in the same process
    v = run_verify(model, key.save(tmp_path / "key.json"), tmp_path / "rep", samples=20, seed=1)
    assert v.report.n_queries == 20 and (tmp_path / "rep" / "report.json").is_file()


@pytest.mark.parametrize("arch", ["SwinUNETR", "UNETR", "SamViT"])
def test_small_sizes_sit_between_tiny_and_standard(arch):
    # the CPU-sized configurations benchmarks/models.py --size small measures: they build at 128 px, answer
    # with probabilities, and are smaller than the paper's sizes and larger than the test sizes
    sizes = {}
    for size in ("tiny", "small", "standard"):
        spec = architecture_spec(arch, size, 128)
        sizes[size] = sum(p.numel() for p in build_network(spec).parameters())
    assert sizes["tiny"] < sizes["small"] < sizes["standard"] / 1.1
    torch.manual_seed(0)
    spec = architecture_spec(arch, "small", 128)
    model = SegmentationModel(build_network(spec).eval(), spec, device="cpu")
    p = model.probabilities(torch.rand(1, 1, 128, 128))
    assert p.shape == (1, 2, 128, 128) and torch.allclose(p.sum(1), torch.ones(1, 128, 128), atol=1e-5)
    assert architecture_spec("UNet", "small", 128).args == architecture_spec("UNet", "standard", 128).args
    with pytest.raises(InputError, match="unknown size 'huge'"):
        architecture_spec(arch, "huge", 128)


def test_samvit_follows_timm_names_and_vit_b_size():
    b = SamViT(in_channels=3, out_channels=2, img_size=1024, config="sam_vit_b")
    names = set(b.state_dict())
    for n in ("patch_embed.proj.weight", "pos_embed", "blocks.11.attn.qkv.weight", "blocks.2.attn.rel_pos_h",
              "blocks.0.mlp.fc1.weight", "neck.0.weight", "neck.1.weight", "neck.2.weight", "neck.3.bias"):
        assert n in names
    assert tuple(b.pos_embed.shape) == (1, 64, 64, 768)
    assert tuple(b.blocks[2].attn.rel_pos_h.shape) == (127, 64)      # global attention over the 64 x 64 grid
    assert tuple(b.blocks[0].attn.rel_pos_h.shape) == (27, 64)       # window 14
    assert [blk.window_size for blk in b.blocks] == [14, 14, 0, 14, 14, 0, 14, 14, 0, 14, 14, 0]
    encoder = sum(p.numel() for n, p in b.named_parameters() if not n.startswith(("decoder", "classifier")))
    assert 89e6 < encoder < 90.5e6      # SAM ViT-B's image encoder: 89.7M parameters
    # another input size than it was built for: position tables resized on the fly
    tiny = SamViT(1, 3, 64, config="tiny").eval()
    assert tiny(torch.rand(1, 1, 96, 80)).shape == (1, 3, 96, 80)


def test_samvit_image_skip_is_a_full_resolution_path_and_scripts():
    torch.manual_seed(0)
    plain, skip = SamViT(1, 2, 64, config="tiny").eval(), SamViT(1, 2, 64, config="tiny", image_skip=4).eval()
    assert not any(n.startswith(("skip.", "fuse.")) for n in plain.state_dict())
    assert {"skip.0.weight", "skip.2.weight", "fuse.0.weight"} <= set(skip.state_dict())
    # the path is wired into the logits: a pixel's logit trains the skip convolutions; both script and give
    # the eager outputs
    skip(torch.rand(1, 1, 64, 64))[0, 1, 30, 30].backward()
    assert skip.skip[0].weight.grad.abs().sum() > 0 and skip.fuse[0].weight.grad.abs().sum() > 0
    for m in (plain, skip):
        y = torch.rand(2, 1, 64, 64)
        torch.testing.assert_close(torch.jit.script(m)(y), m(y))
    assert architecture_spec("SamViT", "small", 128).args["image_skip"] == 16
    with pytest.raises(ValueError, match="image_skip"):
        SamViT(1, 2, 64, config="tiny", image_skip=-1)


def test_samvit_skip_and_fuse_depths_set_the_full_resolution_convolutions():
    deep = SamViT(1, 2, 64, config="tiny", image_skip=4, skip_depth=3, fuse_depth=2).eval()
    convs = lambda m: [n for n, c in m.named_children() if isinstance(c, torch.nn.Conv2d)]  # noqa: E731
    assert convs(deep.skip) == ["0", "2", "4"] and convs(deep.fuse) == ["0", "2"]
    y = torch.rand(1, 1, 64, 64)
    torch.testing.assert_close(torch.jit.script(deep)(y), deep(y))
    for bad in ({"skip_depth": 0}, {"fuse_depth": 0}):
        with pytest.raises(ValueError, match="must be at least 1"):
            SamViT(1, 2, 64, config="tiny", image_skip=4, **bad)


def test_samvit_head_norm_puts_instance_norms_in_the_full_resolution_path():
    torch.manual_seed(0)
    m = SamViT(1, 2, 64, config="tiny", image_skip=4, fuse_depth=2, head_norm=True).eval()
    norms = lambda seq: sum(isinstance(c, torch.nn.InstanceNorm2d) for c in seq)  # noqa: E731
    assert norms(m.skip) == 2 and norms(m.fuse) == 2
    assert norms(SamViT(1, 2, 64, config="tiny", image_skip=4).skip) == 0
    # the norms have no parameters of their own (affine off)
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert count(m) == count(SamViT(1, 2, 64, config="tiny", image_skip=4, fuse_depth=2))
    y = torch.rand(2, 1, 64, 64)
    torch.testing.assert_close(torch.jit.script(m)(y), m(y))


def test_samvit_skip_levels_add_coarser_image_paths_that_reach_the_logits():
    torch.manual_seed(0)
    m = SamViT(1, 2, 64, config="tiny", image_skip=4, skip_levels=3).eval()
    assert len(m.down) == 2 and m.fuse[0].in_channels == 8 + 3 * 4   # decoder's last 8 + three levels of 4
    m(torch.rand(1, 1, 64, 64))[0, 1, 30, 30].backward()
    assert all(d[0].weight.grad.abs().sum() > 0 for d in m.down)
    y = torch.rand(2, 1, 64, 64)
    torch.testing.assert_close(torch.jit.script(m)(y), m(y))
    for bad in (0, 5):
        with pytest.raises(ValueError, match="skip_levels"):
            SamViT(1, 2, 64, config="tiny", image_skip=4, skip_levels=bad)


@pytest.mark.parametrize("spec, match", [
    (ModelSpec("ResNet", {}), r"unknown network 'ResNet'.*SwinUNETR.*UNETR.*SamViT"),
    (architecture_spec("SwinUNETR", image_size=48), r"48x48 is not divisible by 32"),
    (ModelSpec("SwinUNETR", {**architecture_spec("SwinUNETR").args, "img_size": [64, 64]}, image_size=[64, 64]),
     r"no longer takes img_size"),
    (ModelSpec("SwinUNETR", {**architecture_spec("SwinUNETR").args, "feature_size": 16}, image_size=[64, 64]),
     r"feature_size must be a multiple of 12"),
    (ModelSpec("SwinUNETR", {k: v for k, v in architecture_spec("SwinUNETR").args.items() if k != "spatial_dims"},
               image_size=[64, 64]), r"spatial_dims 2"),
    (ModelSpec("UNETR", {**architecture_spec("UNETR").args, "img_size": [128, 128]}, image_size=[64, 64]),
     r"differs from the spec's image_size"),
    (ModelSpec("UNETR", {**architecture_spec("UNETR").args, "img_size": [72, 72]}), r"multiples of its patch size 16"),
    (ModelSpec("UNETR", {**architecture_spec("UNETR").args, "num_heads": 5}, image_size=[64, 64]),
     r"divisible by num_heads"),
    (ModelSpec("SamViT", {**architecture_spec("SamViT").args, "config": "vit_h"}, image_size=[64, 64]),
     r"unknown config 'vit_h'.*sam_vit_b.*tiny"),
    (ModelSpec("SamViT", {**architecture_spec("SamViT").args, "img_size": [60, 60]}, image_size=[60, 60]),
     r"multiples of the patch size 16"),
])
def test_bad_architectures_say_what_fits(spec, match):
    with pytest.raises(ModelError, match=match):
        build_network(spec)


def test_bad_architecture_from_the_cli_writes_nothing(tmp_path, capsys):
    spec = architecture_spec("UNet")
    model = SegmentationModel(build_network(spec), spec, device="cpu")
    save_model(model, tmp_path / "m.pt", spec, fmt="state_dict")
    bad = spec.to_json()
    bad["network"], bad["args"] = "SwinUNETR", architecture_spec("SwinUNETR").args
    bad["image_size"] = [40, 40]
    (tmp_path / "m.json").write_text(json.dumps(bad))
    create_key("SM:T", seed=1).save(tmp_path / "key.json")
    out = tmp_path / "out.pt"
    code = main(["embed", "--model", str(tmp_path / "m.pt"), "--data", str(tmp_path), "--key",
                 str(tmp_path / "key.json"), "--out", str(out), "--progress", "none", "--device", "cpu"])
    assert code == 2
    assert "not divisible by 32" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "out.json").exists()


# -- multi-class ------------------------------------------------------------------------------------
def test_multiclass_scalar_targets_and_metrics():
    p = torch.full((1, 3, 8, 8), 1 / 3, dtype=torch.float64)
    assert torch.allclose(normalised_entropy(p), torch.ones(1, dtype=torch.float64))
    t = trigger_targets(torch.tensor([[[True, False]]]), 3, dark=0.45, floor=0.02)
    assert torch.allclose(t.sum(1), torch.ones(1, 1, 2))
    assert (t.argmax(1) == 0).all()                   # no pixel of a trigger image crosses the threshold
    assert torch.allclose(t[0, 1:, 0, 0], torch.tensor([0.225, 0.225]))
    # the dark pixel's entropy is far above the floor pixel's over K = 3 classes
    ent = torch.special.entr(t).sum(1) / math.log(3)
    assert ent[0, 0, 0] > 0.85 and ent[0, 0, 1] < 0.15

    labels = np.zeros((1, 4, 4), int)
    labels[0, :2, :2], labels[0, 2:, 2:] = 1, 2
    perfect = np.eye(3)[labels].transpose(0, 3, 1, 2)
    worse = perfect.copy()
    worse[0, :, 2:, 2:] = np.eye(3)[1][:, None, None]      # class 2 all predicted as class 1
    s = score_segmentation(worse, labels)
    assert s.per_class["1"]["dice"] == pytest.approx(2 * 4 / (4 + 8))  # 4 true pixels, 8 predicted
    assert s.per_class["2"]["dice"] == 0.0
    assert s.dice == pytest.approx(1 / 3)
    fr = flip_rate_per_class(perfect, worse)
    assert fr == {"0": 0.0, "1": 0.0, "2": 1.0}


def _label_volume(tmp: Path, values=(0, 3, 7)) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    n, h, w = 24, 32, 32
    img = rng.normal(100, 10, (n, h, w)).astype(np.float32)
    lab = np.zeros((n, h, w), np.int16)
    lab[:, 6:16, 6:16] = values[1]
    lab[:, 18:28, 14:26] = values[2]
    img[lab == values[1]] += 60
    img[lab == values[2]] -= 60
    for arr, name in ((img, "case.nii.gz"), (lab, "case_seg.nii.gz")):
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp / name))
    return tmp / "case.nii.gz", tmp / "case_seg.nii.gz"


def test_multiclass_labels_kept_as_classes(tmp_path):
    vol, lab = _label_volume(tmp_path)
    ds = load_dataset(vol, (SIZE, SIZE), labels=lab, classes=3)
    assert set(np.unique(ds.labels)) == {0, 1, 2} and ds.class_values == [0, 3, 7]
    with pytest.raises(InputError, match="--label"):
        load_dataset(vol, (SIZE, SIZE), labels=lab)                     # a binary model must choose
    with pytest.raises(InputError, match="more than the model's 1 foreground"):
        class_map([np.array([0, 3, 7])], 2, "x")
    (tmp_path / "idx").mkdir()
    vol2, lab2 = _label_volume(tmp_path / "idx", (0, 2, 1))      # already class indices: kept as they are
    ds2 = load_dataset(vol2, (SIZE, SIZE), labels=lab2, classes=3)
    assert ds2.class_values == [0, 1, 2]
    assert ds2.labels[0, 10, 10] == 0 and ds2.labels.max() == 2


def test_multiclass_embed_end_to_end(tmp_path):
    torch.manual_seed(0)
    vol, lab = _label_volume(tmp_path)
    spec = architecture_spec("UNet", "tiny", SIZE, num_classes=3)
    model = SegmentationModel(build_network(spec), spec, device="cpu")
    save_model(model, tmp_path / "clean.ts", spec)
    create_key("SM:MC", seed=5).save(tmp_path / "key.json")
    r = run_embed(tmp_path / "clean.ts", vol, tmp_path / "key.json", tmp_path / "wm.ts", labels=lab,
                  steps=3, device="cpu")
    h = json.loads(Path(r.harmlessness_file).read_text())
    assert set(h["original"]["per_class"]) == {"1", "2"}
    assert set(h["flip_rate_clean_per_class"]) <= {"0", "1", "2"}
    assert all(v is None or 0.0 <= v <= 1.0 for v in h["flip_rate_clean_per_class"].values())
    wm = load_model(tmp_path / "wm.ts", device="cpu")
    p = wm.probabilities(torch.rand(1, 1, SIZE, SIZE))
    assert p.shape == (1, 3, SIZE, SIZE)
    assert "classes 0..2 from label values [0, 3, 7]" in wm.spec.metadata["stealthmark"]["data"]


# -- colour -----------------------------------------------------------------------------------------
def _colour_set(folder: Path, n: int = 20, masks: str = "masks") -> Path:
    from PIL import Image

    rng = np.random.default_rng(1)
    (folder / "images").mkdir(parents=True)
    (folder / masks).mkdir()
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for i in range(n):
        cy, cx, r = rng.integers(20, 44), rng.integers(20, 44), rng.integers(8, 14)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
        rgb = np.stack([np.full((SIZE, SIZE), 180.0), np.full((SIZE, SIZE), 60.0), np.full((SIZE, SIZE), 90.0)], -1)
        rgb[disc] = (220.0, 120.0, 40.0)     # a reddish fundus-like background, an orange disc
        rgb[..., 2] = rgb[..., 2] * 0.5 + 20  # the blue channel spans a narrow range only
        rgb += rng.normal(0, 5, rgb.shape)
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(folder / "images" / f"{i:03d}.png")
        Image.fromarray((disc * 255).astype(np.uint8)).save(folder / masks / f"{i:03d}.png")
    return folder


def test_colour_loader_keeps_rgb_per_channel(tmp_path):
    data = _colour_set(tmp_path / "set", masks="labels")
    ds = load_dataset(data, (48, 48), channels=3)
    assert ds.images.shape == (20, 3, 48, 48) and ds.labels.shape == (20, 48, 48)
    assert ds.held_out.sum() == 4
    native = load_dataset(data, (SIZE, SIZE), channels=3)
    for c in range(3):  # each channel of each image stretched on its own percentiles, the narrow blue one too
        assert np.allclose(native.images[:, c].min((1, 2)), 0.0, atol=1e-6)
        assert np.allclose(native.images[:, c].max((1, 2)), 1.0, atol=1e-6)
    grey = load_dataset(data, (48, 48), channels=1)
    assert grey.images.shape == (20, 48, 48)
    with pytest.raises(InputError, match="at least 17"):
        load_dataset(_colour_set(tmp_path / "small", n=12), (48, 48), channels=3)


def test_colour_trigger_blends_every_channel():
    key = create_key("SM:C", seed=3)
    ov = TriggerOverlay(key, SIZE, SIZE)
    x = np.random.default_rng(0).random((2, 3, SIZE, SIZE)).astype(np.float32)
    b = ov.blend(x, 0.3)
    for c in range(3):
        assert np.allclose(b[:, c], 0.7 * x[:, c] + 0.3 * ov.key_image(), atol=1e-6)


def test_colour_embed_and_verify(tmp_path):
    torch.manual_seed(0)
    data = _colour_set(tmp_path / "set")
    spec = architecture_spec("UNet", "tiny", SIZE, in_channels=3,
                             intensity={"mode": "percentile", "low": 0.5, "high": 99.5})
    model = SegmentationModel(build_network(spec), spec, device="cpu")
    save_model(model, tmp_path / "clean.pt", spec, fmt="state_dict")
    create_key("SM:RGB", seed=9, samples=20).save(tmp_path / "key.json")
    cfg = EmbedConfig(steps=3, clean_batch=2, trigger_batch=4, decoys_per_batch=1)
    r = run_embed(tmp_path / "clean.pt", data, tmp_path / "key.json", tmp_path / "wm.pt", steps=3,
                  device="cpu", config=cfg)
    assert r.harmlessness["n_images"] == 4
    v = run_verify(tmp_path / "wm.pt", tmp_path / "key.json", tmp_path / "report",
                   image=data / "images" / "017.png", samples=20, device="cpu")
    rep = json.loads((tmp_path / "report" / "report.json").read_text())
    assert rep["n_trigger_images"] == 1 and rep["lime_samples"] == 20 and rep["verdict"] == v.report.verdict
    # the training images really are colour: embedding on (n, 3, H, W) directly
    ds = load_dataset(data, (SIZE, SIZE), channels=3)
    key = create_key("SM:RGB", seed=9)
    wm = load_model(tmp_path / "wm.pt", device="cpu")
    module, log = embed_watermark(wm, key, *ds.train, EmbedConfig(steps=1, clean_batch=2, trigger_batch=2,
                                                                decoys_per_batch=0))
    assert log.steps == 1
    with pytest.raises(InputError, match=r"\(B, 3, H, W\)"):   # 2 channels for a 3-channel model
        embed_watermark(wm, key, ds.train[0][:, :2], ds.train[1], EmbedConfig(steps=1))


# -- the benchmark's smoke run ----------------------------------------------------------------------
def _benchmark():
    import importlib.util

    spec = importlib.util.spec_from_file_location("models_benchmark", ROOT / "benchmarks" / "models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_models_benchmark_smoke(tmp_path, capsys, monkeypatch):
    bench = _benchmark()
    out = tmp_path / "models.json"
    assert bench.main(["--smoke", "--archs", "SamViT", "--no-per-cell-decoys", "--out", str(out)]) == 0
    assert [r["arch"] for r in json.loads(out.read_text())["records"]] == ["SamViT"]
    # keeps SamViT's record; the settings the two records do not share are left to each record
    assert bench.main(["--smoke", "--archs", "UNet", "--out", str(out), "--merge", "--embed-steps", "4"]) == 0
    doc = json.loads(out.read_text())
    records = doc["records"]
    assert [r["arch"] for r in records] == ["UNet", "SamViT"]
    assert [r["settings"]["embed_steps"] for r in records] == [4, 3]
    assert [r["settings"]["per_cell_decoys"] for r in records] == [True, False]   # the library's default: on
    assert doc["settings"]["per_record"] == ["embed_steps", "per_cell_decoys"] and "embed_steps" not in doc["settings"]
    # records are kept per (architecture, size): a UNet record of another size stays beside a new UNet run
    doc["records"][0]["size"] = "small"
    out.write_text(json.dumps(doc))
    assert bench.main(["--smoke", "--archs", "UNet", "--out", str(out), "--merge"]) == 0
    assert [(r["arch"], r["size"]) for r in json.loads(out.read_text())["records"]] == [
        ("UNet", "tiny"), ("UNet", "small"), ("SamViT", "tiny")]
    assert bench.main(["--smoke", "--archs", "UNet", "--out", str(tmp_path / "bad.json"), "--embed-steps", "0"]) == 2
    assert "--embed-steps must be at least 1" in capsys.readouterr().err
    for r in records:
        assert {"arch", "params", "image_size", "asr", "dice_drop_points", "embed_seconds", "device"} <= set(r)
        assert 0.0 <= r["asr"] <= 1.0 and r["params"] > 0 and r["device"].startswith("cpu")
        assert r["image_size"] == [64, 64] and len(r["trials"]) == 1
    # --network-args: a variant of the network, named in the record
    variant = tmp_path / "variant.json"
    assert bench.main(["--smoke", "--archs", "SamViT", "--network-args", '{"image_skip": 8}', "--out", str(variant)]) == 0
    (r,) = json.loads(variant.read_text())["records"]
    assert r["network_args"]["image_skip"] == 8 and r["settings"]["network_args"] == {"image_skip": 8}
    for bad, msg in (("{image_skip: 8}", "--network-args is not JSON"), ("[8]", "--network-args must be a JSON object")):
        assert bench.main(["--smoke", "--archs", "SamViT", "--network-args", bad, "--out", str(tmp_path / "bad.json")]) == 2
        assert msg in capsys.readouterr().err
    assert bench.main(["--smoke", "--archs", "ResNet", "--out", str(tmp_path / "bad.json")]) == 2
    assert "unknown architecture(s) ResNet" in capsys.readouterr().err and not (tmp_path / "bad.json").exists()
    # --merge reads the file again before it writes: a record another run wrote meanwhile stays
    real = bench.bench_arch

    def beside(*args, **kwargs):
        rec = real(*args, **kwargs)
        doc = json.loads(out.read_text())
        doc["records"].append({**doc["records"][-1], "arch": "BasicUNet", "size": "tiny"})
        out.write_text(json.dumps(doc))
        return rec

    monkeypatch.setattr(bench, "bench_arch", beside)
    assert bench.main(["--smoke", "--archs", "UNet", "--out", str(out), "--merge"]) == 0
    monkeypatch.setattr(bench, "bench_arch", real)
    assert [(r["arch"], r["size"]) for r in json.loads(out.read_text())["records"]] == [
        ("UNet", "tiny"), ("UNet", "small"), ("BasicUNet", "tiny"), ("SamViT", "tiny")]
    (tmp_path / "other.json").write_text("[1, 2]")
    assert bench.main(["--smoke", "--archs", "UNet", "--out", str(tmp_path / "other.json"), "--merge"]) == 2
    assert "is not a models.py results file" in capsys.readouterr().err
    assert (tmp_path / "other.json").read_text() == "[1, 2]"
