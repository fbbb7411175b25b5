"""Ready-made :class:`~StealthMarkLib.models.ModelSpec` s for the supported 2-D architectures.

Three sizes per architecture: ``"tiny"`` (the smallest that runs: tests and ``benchmarks/models.py --smoke``),
``"small"`` (the transformers cut down until embedding fits a 2-core CPU: about 0.5-1.5 s a training step of
20 images at 128 px, against 5-13 s for their ``standard`` sizes; the convolutional networks' ``small`` is
their ``standard``) and ``"standard"`` (the paper's sizes, the configuration ``benchmarks/models.py``
documents its figures for by default). Any spec naming
one of :data:`~StealthMarkLib.models.NETWORKS` works the same; these are starting points.
"""

from __future__ import annotations

from .errors import InputError
from .models import NETWORKS, ModelSpec

ARCHITECTURES = ("UNet", "BasicUNet", "SegResNet", "SwinUNETR", "UNETR", "SamViT")
SIZES = ("tiny", "small", "standard")


def _args(arch: str, size: str, image_size: int) -> dict:
    tiny, small = size == "tiny", size == "small"
    if arch == "UNet":
        ch = [4, 8, 16] if tiny else [8, 16, 32, 64]
        return {"spatial_dims": 2, "channels": ch, "strides": [2] * (len(ch) - 1),
                "num_res_units": 0 if tiny else 2}
    if arch == "BasicUNet":
        return {"spatial_dims": 2, "features": [4, 4, 8, 8, 16, 4] if tiny else [8, 8, 16, 32, 64, 8]}
    if arch == "SegResNet":
        # standard: MONAI's own defaults (init_filters 8, blocks 1-2-2-4 down, 1-1-1 up); init_filters 16 did not
        # finish embedding in 45 minutes on a 2-core CPU
        return {"spatial_dims": 2, "init_filters": 8,
                "blocks_down": [1, 1, 1] if tiny else [1, 2, 2, 4], "blocks_up": [1, 1] if tiny else [1, 1, 1]}
    if arch == "SwinUNETR":
        if tiny:
            return {"spatial_dims": 2, "feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1],
                    "window_size": 4}
        if small:  # feature_size 12, one block a stage, window 4: 1.4M parameters, 1.4 s a step
            return {"spatial_dims": 2, "feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [3, 6, 12, 24],
                    "window_size": 4}
        return {"spatial_dims": 2, "feature_size": 24, "depths": [2, 2, 2, 2], "num_heads": [3, 6, 12, 24],
                "window_size": 7}
    if arch == "UNETR":
        if tiny:
            return {"spatial_dims": 2, "img_size": [image_size, image_size], "feature_size": 8,
                    "hidden_size": 48, "mlp_dim": 96, "num_heads": 2}
        if small:  # a ViT-Ti-sized encoder (hidden 192, 3 heads, 12 layers): 5.7M parameters, 1.4 s a step
            return {"spatial_dims": 2, "img_size": [image_size, image_size], "feature_size": 8,
                    "hidden_size": 192, "mlp_dim": 768, "num_heads": 3}
        return {"spatial_dims": 2, "img_size": [image_size, image_size], "feature_size": 16,
                "hidden_size": 768, "mlp_dim": 3072, "num_heads": 12}
    if arch == "SamViT":
        # every size with the head's full-resolution image path (samvit.py): without it the small size never
        # learned the watermark (ASR 0.0, benchmarks/results/models_small/samvit_small_no_skip.log); with it but
        # without instance norms and a second fusion convolution it learned to 83-86% agreement in 1800 steps and
        # never decoded; with both, 100% / 97.1% after 600 (models_small/probe_samvit_small_head_norm_fuse2_600.log)
        head = {"image_skip": 4 if tiny else 16, "head_norm": True, "fuse_depth": 2}
        if small:  # embed 192, depth 6, 3 heads, window 4, global attention in blocks 2 and 5: 2.8M, 0.6 s a step
            return {"spatial_dims": 2, "img_size": [image_size, image_size], "config": "tiny", "embed_dim": 192,
                    "depth": 6, "num_heads": 3, "window_size": 4, "global_attn_indexes": [2, 5],
                    "neck_channels": 64, "decoder_channels": [64, 32, 16, 16], **head}
        return {"spatial_dims": 2, "img_size": [image_size, image_size], "config": "tiny" if tiny else "sam_vit_b",
                **head}
    raise InputError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")


def architecture_spec(arch: str, size: str = "tiny", image_size: int = 64, in_channels: int = 1,
                      num_classes: int = 2, intensity: dict | None = None) -> ModelSpec:
    """A softmax-head spec for ``arch`` (one of :data:`ARCHITECTURES`) at ``size`` (``tiny``/``standard``)."""
    if arch not in ARCHITECTURES:
        raise InputError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    if size not in SIZES:
        raise InputError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    assert arch in NETWORKS
    args = {"in_channels": in_channels, "out_channels": num_classes, **_args(arch, size, int(image_size))}
    return ModelSpec(network=arch, args=args, head="softmax", in_channels=in_channels, num_classes=num_classes,
                     image_size=[int(image_size), int(image_size)], intensity=intensity).check()
