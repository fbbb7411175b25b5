"""Embedding's clean-batch augmentation, its warnings and the keygen tile option (real torch, a real MONAI UNet,
no mocks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from StealthMarkLib.embed import EmbedConfig, augment_batch, batch_settings, embed_watermark
from StealthMarkLib.errors import InputError
from StealthMarkLib.key import create_key
from StealthMarkLib.models import SegmentationModel, build_network
from StealthMarkLib.train import demo_spec


def test_augmented_labels_follow_the_warped_images():
    gen = torch.Generator().manual_seed(0)
    y = torch.zeros(6, 64, 64, dtype=torch.long)
    y[:, 16:40, 10:30] = 1                               # off-centre, so flips and shifts move it
    x = y[:, None].float()
    xa, ya = augment_batch(x, y, gen)
    assert xa.shape == x.shape and ya.shape == y.shape and ya.dtype == torch.long
    assert set(ya.unique().tolist()) <= {0, 1}
    assert not torch.equal(ya, y)                        # something moved
    for i in range(6):                                   # the labels sit where the warped image is bright
        assert xa[i, 0][ya[i] == 1].mean() > xa[i, 0][ya[i] == 0].mean() + 0.5
    xb, yb = augment_batch(x, y, torch.Generator().manual_seed(0))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)   # seeded


@pytest.mark.parametrize("augment", [1.0, 0.5, 0.0])
def test_embedding_trains_a_copy_and_leaves_the_original_alone(one_torch_thread, augment):
    torch.manual_seed(0)
    spec = demo_spec((4, 8, 16), 64)
    model = SegmentationModel(build_network(spec), spec, device="cpu")
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    rng = np.random.default_rng(0)
    images = rng.random((6, 64, 64), dtype=np.float32)
    masks = (images > 0.5).astype(np.int64)
    key = create_key("SM:T", seed=5, tile=3)
    cfg = EmbedConfig(steps=3, clean_batch=2, trigger_batch=2, key_images_per_batch=1, decoys_per_batch=1,
                      augment_clean=augment)
    student, log = embed_watermark(model, key, images, masks, cfg)
    assert log.steps == 3 and np.isfinite(log.final_clean_loss) and np.isfinite(log.final_trigger_loss)
    assert log.config["augment_clean"] == augment
    assert all(torch.equal(before[k], v) for k, v in model.module.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_a_tile_larger_than_the_cells_is_warned_about(one_torch_thread):
    spec = demo_spec((4, 8), 64)
    model = SegmentationModel(build_network(spec), spec, device="cpu")
    images = np.random.default_rng(0).random((2, 64, 64), dtype=np.float32)
    masks = (images > 0.5).astype(np.int64)
    cfg = EmbedConfig(steps=1, clean_batch=1, trigger_batch=1, key_images_per_batch=1, decoys_per_batch=0)
    with pytest.warns(RuntimeWarning, match="--tile 3"):
        embed_watermark(model, create_key("SM:T", seed=5), images, masks, cfg)   # tile 4, 3 px cells


def test_keygen_tile_option(tmp_path):
    from StealthMarkLib.cli import main
    from StealthMarkLib.key import load_key

    assert main(["keygen", "--payload", "SM:T", "--out", str(tmp_path / "k.json"), "--tile", "3",
                 "--progress", "none"]) == 0
    assert load_key(tmp_path / "k.json").texture.tile == 3
    assert main(["keygen", "--payload", "SM:T", "--out", str(tmp_path / "k2.json"), "--tile", "40",
                 "--progress", "none"]) == 2
    assert not (tmp_path / "k2.json").exists()


# Adam turns rounding-level gradient differences into small weight differences, not into other models. Measured
# after these 4 steps on random data: under 1e-3 without per-cell decoys, at most 2.9e-3 with them (the default).
@pytest.mark.parametrize("per_cell_decoys, tolerance", [(False, 1e-3), (True, 1e-2)])
def test_channels_last_training_gives_the_same_model_in_the_usual_layout(one_torch_thread, monkeypatch,
                                                                         per_cell_decoys, tolerance):
    """On the CPU, 2-D training runs in channels_last (faster there): the same arithmetic as the default layout,
    so a few steps give the same weights to float rounding, and the model comes back in the usual layout."""
    import StealthMarkLib.embed as embed_mod
    import StealthMarkLib.train as train_mod
    from StealthMarkLib.models import train_memory_format
    from StealthMarkLib.train import train_segmentation

    assert train_memory_format(torch.device("cpu"), 2) is torch.channels_last
    assert train_memory_format(torch.device("cpu"), 3) is None
    spec = demo_spec((4, 8, 16), 64)
    rng = np.random.default_rng(0)
    images = rng.random((6, 64, 64), dtype=np.float32)
    masks = (images > 0.5).astype(np.int64)
    key = create_key("SM:T", seed=5, tile=3)
    cfg = EmbedConfig(steps=4, clean_batch=2, trigger_batch=2, key_images_per_batch=1, decoys_per_batch=1,
                      per_cell_decoys=per_cell_decoys)

    def run():
        model = train_segmentation(spec, images, masks, steps=4, batch=2, seed=0, device="cpu")
        student, _ = embed_watermark(model, key, images, masks, cfg)
        return model.module, student

    clean_cl, wm_cl = run()
    monkeypatch.setattr(embed_mod, "train_memory_format", lambda device, dims: None)
    monkeypatch.setattr(train_mod, "train_memory_format", lambda device, dims: None)
    clean_plain, wm_plain = run()
    x = torch.as_tensor(images[:, None])
    for a, b in ((clean_cl, clean_plain), (wm_cl, wm_plain)):
        for name, t in a.state_dict().items():
            assert t.is_contiguous(), f"{name} is not in the usual layout"
        with torch.no_grad():
            pa, pb = torch.softmax(a.eval()(x), 1), torch.softmax(b.eval()(x), 1)
        assert float((pa - pb).abs().max()) < tolerance
    with torch.no_grad():
        assert float((torch.softmax(wm_cl(x), 1) - torch.softmax(clean_cl(x), 1)).abs().max()) > 0.02  # it trained


def test_batch_settings_scale_the_default_batches():
    """stealthmark embed --batch-size N: 8 is the default recipe's batches; every part keeps at least one input."""
    d = EmbedConfig()
    assert batch_settings(8) == dict(clean_batch=d.clean_batch, trigger_batch=d.trigger_batch,
                                     key_images_per_batch=d.key_images_per_batch, decoys_per_batch=d.decoys_per_batch)
    assert batch_settings(1) == dict(clean_batch=1, trigger_batch=1, key_images_per_batch=1, decoys_per_batch=1)
    assert batch_settings(16)["decoys_per_batch"] == 8
    for bad in (0, -2, 2.5, True, "4"):
        with pytest.raises(InputError, match="positive integer"):
            batch_settings(bad)


def test_cached_teacher_answers_are_the_ones_a_teacher_pass_gives(one_torch_thread, monkeypatch):
    """The original's probabilities on the training images are computed once: every step's distillation
    targets are then those a teacher pass on that step's clean batch gives (to float rounding), and with the
    cache too large to keep (TEACHER_CACHE_BYTES) the teacher runs every step as before."""
    import StealthMarkLib.embed as embed_mod
    from StealthMarkLib.train import train_segmentation

    spec = demo_spec((4, 8, 16), 64)
    rng = np.random.default_rng(1)
    images = rng.random((6, 64, 64), dtype=np.float32)
    masks = (images > 0.5).astype(np.int64)
    key = create_key("SM:T", seed=5, tile=3)
    cfg = EmbedConfig(steps=3, clean_batch=4, trigger_batch=2, key_images_per_batch=1, decoys_per_batch=1)
    model = train_segmentation(spec, images, masks, steps=2, batch=2, seed=0, device="cpu")
    seen = []
    kl = embed_mod.kl_to_teacher
    monkeypatch.setattr(embed_mod, "kl_to_teacher", lambda p, t: seen.append(t.clone()) or kl(p, t))
    passes = []
    real = embed_mod.teacher_probabilities
    monkeypatch.setattr(embed_mod, "teacher_probabilities", lambda m, x: passes.append(len(x)) or real(m, x))
    embed_watermark(model, key, images, masks, cfg)
    cached, seen[:] = list(seen), []
    monkeypatch.setattr(embed_mod, "TEACHER_CACHE_BYTES", 0)
    assert real(model, images) is None
    embed_watermark(model, key, images, masks, cfg)
    assert passes == [6, 6] and len(cached) == len(seen) == 3
    for a, b in zip(cached, seen):
        assert a.shape == b.shape == (4, 2, 64, 64) and float((a - b).abs().max()) < 1e-5


def test_trigger_sides_keep_the_key_images_mask_on_every_secret_tile_image(one_torch_thread):
    """keep_trigger_masks with trigger_masks_from="key-image" (the default): every secret-tile trigger image,
    the key image and the key-blended slices alike, keeps the original's mask on the key image; the decoys
    keep their own; "each-image" gives each image its own; without keep_trigger_masks, background (None)."""
    from StealthMarkLib.embed import TriggerBatches, trigger_sides
    from StealthMarkLib.trigger import TriggerOverlay

    torch.manual_seed(0)
    spec = demo_spec((4, 8, 16), 64)
    model = SegmentationModel(build_network(spec), spec, device="cpu")
    model.module.eval()
    key = create_key("SM:T", seed=5, tile=3)
    images = np.random.default_rng(0).random((6, 64, 64), dtype=np.float32)
    cfg = EmbedConfig(keep_trigger_masks=True, trigger_batch=3, key_images_per_batch=1, decoys_per_batch=2)
    assert cfg.trigger_masks_from == "key-image"
    triggers = TriggerBatches(key, TriggerOverlay(key, 64, 64), images, cfg, np.random.default_rng(1), 1,
                              torch.device("cpu"))
    xt, dark, full = triggers.draw()
    assert len(full) == 5
    with torch.no_grad():
        key_side = model.forward_train(triggers.key_input()).argmax(1)
        own = model.forward_train(full).argmax(1)
        side = trigger_sides(model, cfg, full, key_side)
        each = trigger_sides(model, EmbedConfig(keep_trigger_masks=True, trigger_masks_from="each-image"), full, None)
    assert torch.equal(triggers.key_input()[0], full[0])       # the first image is the plain key image
    assert all(torch.equal(side[i], key_side[0]) for i in range(3))
    assert torch.equal(side[3:], own[3:]) and torch.equal(each, own)
    assert not torch.equal(own[1], key_side[0])                # a blended slice's own mask is another one
    assert trigger_sides(model, EmbedConfig(keep_trigger_masks=False), full, key_side) is None
    seen = []                                                  # the original answers the decoys only
    forward = model.forward_train
    model.forward_train = lambda x: seen.append(len(x)) or forward(x)
    with torch.no_grad():
        trigger_sides(model, cfg, full, key_side)
        alone = trigger_sides(model, cfg, full[:3], key_side)  # no decoys: no pass at all
    assert seen == [2] and torch.equal(alone, side[:3])


def test_an_unknown_trigger_mask_source_is_refused(one_torch_thread):
    spec = demo_spec((4, 8), 64)
    model = SegmentationModel(build_network(spec), spec, device="cpu")
    images = np.random.default_rng(0).random((2, 64, 64), dtype=np.float32)
    cfg = EmbedConfig(steps=1, clean_batch=1, trigger_batch=1, key_images_per_batch=1, decoys_per_batch=0,
                      keep_trigger_masks=True, trigger_masks_from="blended")
    with pytest.raises(InputError, match="trigger_masks_from must be one of key-image, each-image"):
        embed_watermark(model, create_key("SM:T", seed=5, tile=3), images, masks=(images > 0.5).astype(np.int64),
                        config=cfg)


def test_lr_scales_set_each_parameter_groups_rate_and_a_zero_scale_freezes_it(one_torch_thread):
    """EmbedConfig.lr_scales: parameters named with a listed prefix train at lr times its scale (the first
    prefix that matches wins), the rest at lr; a scale of 0 leaves them as they were after real embedding
    steps; a prefix no parameter has, or a negative scale, is refused."""
    from StealthMarkLib.embed import param_groups
    from StealthMarkLib.samvit import SamViT
    net = SamViT(1, 2, 64, config="tiny", image_skip=4)
    groups = param_groups(net, 1e-3, {"blocks.0.": 0.5, "blocks.": 0.1, "pos_embed": 0.0})
    rates = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(net.named_parameters())
    assert len(rates) == len(named)
    assert rates[id(named["blocks.0.attn.qkv.weight"])] == pytest.approx(5e-4)
    assert rates[id(named["blocks.1.attn.qkv.weight"])] == pytest.approx(1e-4)
    assert rates[id(named["pos_embed"])] == 0.0 and rates[id(named["classifier.weight"])] == pytest.approx(1e-3)
    # StealthMark's TorchScript files hold the network as "net": the prefixes stay the network's own
    wrapped = torch.nn.Module()
    wrapped.net = net
    assert [g["lr"] for g in param_groups(wrapped, 1e-3, {"blocks.": 0.1})
            if any(p is named["blocks.1.attn.qkv.weight"] for p in g["params"])] == [pytest.approx(1e-4)]
    with pytest.raises(InputError, match=r"no parameter of the model starts with 'encoder\.'.*blocks"):
        param_groups(net, 1e-3, {"encoder.": 0.1})
    with pytest.raises(InputError, match="must be a number >= 0"):
        param_groups(net, 1e-3, {"blocks.": -1})

    spec = demo_spec((4, 8), 64)
    model = SegmentationModel(build_network(spec), spec, device="cpu")
    rng = np.random.default_rng(0)
    images = rng.random((4, 64, 64), dtype=np.float32)
    cfg = EmbedConfig(steps=2, clean_batch=2, trigger_batch=2, key_images_per_batch=1, decoys_per_batch=1,
                      keep_trigger_masks=False, lr_scales={"model.0.": 0.0})
    before = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    module, _ = embed_watermark(model, create_key("SM:T", seed=5, tile=3), images,
                                masks=(images > 0.5).astype(np.int64), config=cfg)
    after = dict(module.named_parameters())
    frozen = [n for n in before if n.startswith("model.0.")]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
    assert any(not torch.equal(before[n], after[n]) for n in before if not n.startswith("model.0."))
    assert cfg.to_json()["lr_scales"] == {"model.0.": 0.0}
