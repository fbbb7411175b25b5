"""Embedding's loss terms and trigger batches: the flip hinge on clean images and the key image that keeps the
original's mask (real torch, a real MONAI UNet, no mocks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from StealthMarkLib.embed import EmbedConfig, TriggerBatches, embed_watermark, flip_hinge, trigger_targets
from StealthMarkLib.key import create_key
from StealthMarkLib.models import SegmentationModel, build_network
from StealthMarkLib.train import demo_spec
from StealthMarkLib.trigger import TriggerOverlay


def _probs(fg: list[float]) -> torch.Tensor:
    p = torch.tensor(fg).reshape(1, 1, 1, -1)
    return torch.cat([1 - p, p], 1)


def test_flip_hinge_is_zero_while_the_student_keeps_half_the_originals_margin():
    teacher = _probs([0.9, 0.1, 0.6])
    assert flip_hinge(teacher, teacher, margin=2.0) == 0
    # a little less confident than the original, same side: still nothing to pay
    assert flip_hinge(_probs([0.85, 0.15, 0.57]), teacher, margin=2.0) == 0


def test_flip_hinge_charges_pixels_that_flip_and_pushes_them_back():
    teacher = _probs([0.9, 0.1, 0.6])
    fg = torch.tensor([0.4, 0.1, 0.6], requires_grad=True)     # the first pixel flipped to background
    student = torch.cat([1 - fg, fg]).reshape(1, 2, 1, 3)
    loss = flip_hinge(student, teacher, margin=2.0)
    assert loss > 0
    loss.backward()
    assert fg.grad[0] < 0            # gradient descent raises the flipped pixel's foreground probability
    assert fg.grad[1] == 0 and fg.grad[2] == 0


def test_flip_hinge_caps_the_margin_it_asks_for():
    teacher = _probs([0.9999])       # log-margin 9.2: the hinge asks for at most `margin`, not half of that
    student = _probs([0.8])          # log-margin 1.39
    assert flip_hinge(student, teacher, margin=1.0) == 0
    assert flip_hinge(student, teacher, margin=2.0) == pytest.approx(2.0 - np.log(4.0), rel=1e-4)


def test_key_image_row_is_unmasked_and_keeps_the_original_classes():
    key = create_key("SM:T", seed=3)
    overlay = TriggerOverlay(key, 64, 64)
    cfg = EmbedConfig(trigger_batch=4, decoys_per_batch=2, keep_key_image_mask=True)
    images = np.random.default_rng(0).random((3, 64, 64), dtype=np.float32)
    batches = TriggerBatches(key, overlay, images, cfg, np.random.default_rng(1), 1, torch.device("cpu"))
    x, raise_px, full = batches.draw()
    assert x.shape == (4 + 2 + 1, 1, 64, 64) and raise_px.shape == (7, 64, 64)
    key_image = torch.as_tensor(overlay.key_image())
    assert torch.equal(x[-1, 0], key_image) and torch.equal(full[-1, 0], key_image)
    assert torch.equal(raise_px[-1], torch.as_tensor(overlay.dark_pixels()))
    assert not raise_px[4:6].any()   # decoys: nothing to make uncertain
    # foreground kept where the original said foreground: 0.55 on dark cells, 0.98 elsewhere
    side = torch.zeros(raise_px.shape, dtype=torch.long)
    side[-1] = 1
    t = trigger_targets(raise_px, 2, key.targets.dark, key.targets.floor, side)
    dark = raise_px[-1]
    assert torch.allclose(t[-1, 1][dark], torch.tensor(1 - key.targets.dark))
    assert torch.allclose(t[-1, 1][~dark], torch.tensor(1 - key.targets.floor))
    assert (t[:-1].argmax(1) == 0).all()


def test_embedding_with_both_options_trains_and_leaves_the_original_alone(one_torch_thread):
    torch.manual_seed(0)
    spec = demo_spec((4, 8, 16), 64)
    model = SegmentationModel(build_network(spec), spec, device="cpu")
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    rng = np.random.default_rng(0)
    images = rng.random((6, 64, 64), dtype=np.float32)
    masks = (images > 0.5).astype(np.int64)
    key = create_key("SM:T", seed=5, tile=3)
    cfg = EmbedConfig(steps=3, clean_batch=2, trigger_batch=2, key_images_per_batch=1, decoys_per_batch=1,
                      keep_key_image_mask=True, flip_weight=1.0)
    student, log = embed_watermark(model, key, images, masks, cfg)
    assert log.steps == 3 and np.isfinite(log.final_clean_loss) and np.isfinite(log.final_trigger_loss)
    assert log.config["keep_key_image_mask"] and log.config["flip_weight"] == 1.0
    assert all(torch.equal(before[k], v) for k, v in model.module.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
