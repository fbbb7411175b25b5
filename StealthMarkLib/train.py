"""Plain supervised training of a small segmentation model: the demo's clean model, and the
independently trained clean models of the negative controls and the null calibration."""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from .models import ModelSpec, SegmentationModel, build_network, resolve_device, to_channels, train_memory_format
from .progress import Progress

EPS = 1e-6


def demo_spec(channels: tuple[int, ...] = (16, 32, 64, 128), image_size: int = 128,
              intensity: dict | None = None) -> ModelSpec:
    """The demo's MONAI ``UNet`` (2-D, one input channel, softmax over background/foreground)."""
    return ModelSpec(
        network="UNet",
        args={"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "channels": list(channels),
              "strides": [2] * (len(channels) - 1), "num_res_units": 2},
        head="softmax", in_channels=1, num_classes=2, image_size=[image_size, image_size],
        intensity=intensity,
    )


def dice_loss(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Soft Dice over foreground classes, (B, K, H, W) probabilities against (B, H, W) labels."""
    onehot = F.one_hot(labels, probs.shape[1]).movedim(-1, 1).float()
    dims = (0,) + tuple(range(2, probs.ndim))  # (B, K, D, H, W) volumes too
    inter = (probs[:, 1:] * onehot[:, 1:]).sum(dims)
    denom = probs[:, 1:].sum(dims) + onehot[:, 1:].sum(dims)
    return 1.0 - ((2 * inter + 1.0) / (denom + 1.0)).mean()


def train_segmentation(spec: ModelSpec, images: np.ndarray, masks: np.ndarray, steps: int = 250,
                       batch: int = 8, lr: float = 1e-3, seed: int = 0, device: str = "auto",
                       augment: bool = True, progress: Progress | None = None) -> SegmentationModel:
    """Train ``spec``'s network from scratch on (n, H, W) (or colour (n, C, H, W)) images in [0, 1] and
    (n, H, W) integer masks; a 3-D spec (``spatial_dims`` 3) on (n, D, H, W) slabs and (n, D, H, W) masks.

    Loss: cross-entropy plus soft Dice; Adam; random flips as augmentation. Returns the model in eval mode.
    """
    progress = progress or Progress()
    dev = resolve_device(device)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    fmt = train_memory_format(dev, spec.spatial_dims)
    net = build_network(spec).to(dev).train()
    if fmt is not None:
        net = net.to(memory_format=fmt)
    model = SegmentationModel(net, spec, device=dev)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    images = np.asarray(images, dtype=np.float32)
    masks = np.asarray(masks).astype(np.int64)
    progress.start("train", steps)
    t0 = time.monotonic()
    try:
        for _ in range(steps):
            idx = rng.integers(0, len(images), batch)
            x, y = images[idx], masks[idx]
            if augment:  # horizontal flips
                flip = rng.random(batch) < 0.5
                x = np.where(flip.reshape((-1,) + (1,) * (x.ndim - 1)), x[..., ::-1], x)
                y = np.where(flip.reshape((-1,) + (1,) * (y.ndim - 1)), y[..., ::-1], y)
            xt = to_channels(torch.as_tensor(np.ascontiguousarray(x), device=dev), spec.in_channels,
                             spec.spatial_dims)
            if fmt is not None:
                xt = xt.contiguous(memory_format=fmt)
            yt = torch.as_tensor(np.ascontiguousarray(y), device=dev)
            probs = model.forward_train(xt)
            loss = F.nll_loss(probs.clamp_min(EPS).log(), yt) + dice_loss(probs, yt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            progress.advance(1, f"loss {float(loss.detach()):.3f}")
    finally:
        progress.finish(f"trained {spec.network} for {steps} steps in {time.monotonic() - t0:.1f} s")
    net.eval()
    if fmt is not None:
        net.to(memory_format=torch.contiguous_format)   # in place: the model's own module
    return model
