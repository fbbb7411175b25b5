"""A SAM-style ViT image encoder with a light segmentation head (the paper's "SAM ViT-B" model).

The encoder follows Segment Anything's image encoder (Kirillov et al. 2023) as timm implements it in
``timm.models.vision_transformer_sam`` (``samvit_base_patch16``): a 16 x 16 patch embedding, an absolute
position embedding on the patch grid, pre-norm transformer blocks with windowed self-attention (window 14)
and global attention in blocks 2, 5, 8 and 11 (ViT-B), decomposed relative position biases along height
and width, and the SAM neck (1x1 conv to 256 channels, LayerNorm2d, 3x3 conv, LayerNorm2d). A light
decoder of transposed convolutions brings the neck's features (1/16 resolution) back to full resolution
and a 1x1 convolution gives K class logits. With ``image_skip`` C > 0 (architectures.py's sizes use it) the
head also has a full-resolution path, as UNETR's first encoder block is: two 3x3 convolutions of C channels on
the input image, concatenated with the decoder's last features and fused by a 3x3 convolution before the
classifier (``skip_depth`` and ``fuse_depth`` convolutions). ``head_norm`` puts an instance normalisation
after each of these convolutions, as UNETR's convolution blocks have; architectures.py's sizes use it with
``fuse_depth`` 2. With ``skip_levels`` L > 1 the path also runs at 1/2 ... 1/2^(L-1) resolution, each level a
stride-2 convolution and two 3x3 convolutions of C channels, brought back to full resolution bilinearly and
fused with the rest (a hypercolumn).

Without the path the only way from a pixel to the logits is the encoder's 1/16 bottleneck: a 2.8M SamViT
without it (``benchmarks/models.py --size small``) segmented the bundled MRI at Dice 0.934 against the UNet's
0.967 and never learned the watermark's 4-pixel tile in 6-pixel cells (ASR 0.0). With the path but neither
the norms nor the second fusion convolution it learned to 83-86% agreement and never decoded (README
"Architectures").

timm cannot be installed beside a CPU-only PyTorch (it imports torchvision), and no weights can be
downloaded here: the network starts from random initialisation. Its parameter names follow timm's samvit
(``patch_embed.proj``, ``pos_embed``, ``blocks.N.norm1``, ``blocks.N.attn.qkv``, ``blocks.N.attn.proj``,
``blocks.N.attn.rel_pos_h``/``rel_pos_w``, ``blocks.N.mlp.fc1``/``fc2``, ``neck.0`` ... ``neck.3``), so that
a user can load timm's pretrained SAM encoder weights later with ``load_state_dict(sd, strict=False)``
(the ``decoder.*``, ``skip.*``, ``fuse.*`` and ``classifier.*`` parameters are this module's own and stay as they are). Position
embeddings and relative position tables of another image size are resized on the fly, as in SAM; a
3-channel checkpoint needs ``in_channels=3`` (or its ``patch_embed.proj.weight`` summed over channels for
grey images).

Configurations (``config``): ``"sam_vit_b"`` (embed 768, depth 12, 12 heads, window 14, global attention
in blocks 2, 5, 8, 11, neck 256) and ``"tiny"`` (embed 64, depth 2, 2 heads, window 4, global attention in
block 1, neck 32) for tests; any field can be overridden by an argument of the same name.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

CONFIGS: dict[str, dict] = {
    "sam_vit_b": {"embed_dim": 768, "depth": 12, "num_heads": 12, "window_size": 14,
                  "global_attn_indexes": [2, 5, 8, 11], "neck_channels": 256,
                  "decoder_channels": [128, 64, 32, 16]},
    "tiny": {"embed_dim": 64, "depth": 2, "num_heads": 2, "window_size": 4,
             "global_attn_indexes": [1], "neck_channels": 32, "decoder_channels": [32, 16, 16, 8]},
}
PATCH_SIZE = 16


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of (B, C, H, W) maps (SAM's neck norm; parameters ``weight``, ``bias``)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, embed_dim: int, patch_size: int = PATCH_SIZE) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # (B, H/16, W/16, C)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative positions between ``q_size`` queries and ``k_size`` keys: (q_size, k_size, head_dim)."""
    max_rel_dist = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != max_rel_dist:  # a table trained at another size: interpolate it (as SAM does)
        resized = F.interpolate(rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1),
                                size=max_rel_dist, mode="linear")
        rel_pos = resized.reshape(-1, max_rel_dist).permute(1, 0)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[relative.long()]


class Attention(nn.Module):
    """Multi-head self-attention with SAM's decomposed relative position bias."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, input_size: Sequence[int]) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * int(input_size[0]) - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * int(input_size[1]) - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        n = h * w
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.num_heads, n, -1).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        rh = get_rel_pos(h, h, self.rel_pos_h)
        rw = get_rel_pos(w, w, self.rel_pos_w)
        r_q = q.reshape(b * self.num_heads, h, w, -1)
        bias_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh)
        bias_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw)
        attn = (attn.view(-1, h, w, h, w) + bias_h[:, :, :, :, None] + bias_w[:, :, :, None, :]).view(-1, n, n)
        attn = attn.softmax(dim=-1)
        out = (attn @ v).view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(out)


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, int, int]:
    """(B, H, W, C) -> (B * nW, window, window, C) windows, padding H and W up to multiples of ``window``."""
    b, h, w, c = x.shape
    pad_h = (window - h % window) % window
    pad_w = (window - w % window) % window
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window, window, wp // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c), hp, wp


def window_unpartition(windows: torch.Tensor, window: int, hp: int, wp: int, h: int, w: int) -> torch.Tensor:
    b = windows.shape[0] // ((hp // window) * (wp // window))
    x = windows.view(b, hp // window, wp // window, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, :h, :w, :].contiguous()


class Block(nn.Module):
    """Pre-norm transformer block; ``window_size`` 0 means global attention."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, window_size: int,
                 grid: Sequence[int]) -> None:
        super().__init__()
        self.window_size = int(window_size)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        size = (self.window_size, self.window_size) if self.window_size > 0 else (int(grid[0]), int(grid[1]))
        self.attn = Attention(dim, num_heads, qkv_bias, size)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            h, w = x.shape[1], x.shape[2]
            xw, hp, wp = window_partition(x, self.window_size)
            x = window_unpartition(self.attn(xw), self.window_size, hp, wp, h, w)
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


def _conv_stack(channels: Sequence[int], norm: bool = False) -> list[nn.Module]:
    """3x3 convolutions from channels[0] through each next count, each followed by a GELU (with ``norm``, an
    instance normalisation between the two, as UNETR's convolution blocks have)."""
    layers: list[nn.Module] = []
    for a, b in zip(channels[:-1], channels[1:]):
        layers += [nn.Conv2d(a, b, 3, padding=1), *([nn.InstanceNorm2d(b)] if norm else []), nn.GELU()]
    return layers


class SamViT(nn.Module):
    """SAM ViT image encoder + upsampling segmentation head: (B, C, H, W) -> (B, K, H, W) class logits.

    ``img_size`` sizes the position embedding and the global blocks' relative position tables (other
    sizes that are multiples of 16 still run: both are resized on the fly). See the module docstring.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 2, img_size: int | Sequence[int] = 1024,
                 config: str = "sam_vit_b", spatial_dims: int = 2, embed_dim: int | None = None,
                 depth: int | None = None, num_heads: int | None = None, window_size: int | None = None,
                 global_attn_indexes: Sequence[int] | None = None, neck_channels: int | None = None,
                 decoder_channels: Sequence[int] | None = None, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, image_skip: int = 0, skip_depth: int = 2, fuse_depth: int = 1,
                 skip_levels: int = 1, head_norm: bool = False) -> None:
        super().__init__()
        if config not in CONFIGS:
            raise ValueError(f"unknown SamViT config {config!r}; choose one of {', '.join(CONFIGS)}")
        if spatial_dims != 2:
            raise ValueError("SamViT is 2-D only (spatial_dims 2)")
        given = {"embed_dim": embed_dim, "depth": depth, "num_heads": num_heads, "window_size": window_size,
                 "global_attn_indexes": global_attn_indexes, "neck_channels": neck_channels,
                 "decoder_channels": decoder_channels}
        c = {k: (CONFIGS[config][k] if v is None else v) for k, v in given.items()}
        size = (int(img_size), int(img_size)) if isinstance(img_size, int) else tuple(int(s) for s in img_size)
        if len(size) != 2 or any(s % PATCH_SIZE or s < PATCH_SIZE for s in size):
            raise ValueError(f"img_size {img_size!r} must be two positive multiples of the patch size {PATCH_SIZE}")
        if c["embed_dim"] % c["num_heads"]:
            raise ValueError(f"embed_dim {c['embed_dim']} must be divisible by num_heads {c['num_heads']}")
        if any(not 0 <= i < c["depth"] for i in c["global_attn_indexes"]):
            raise ValueError(f"global_attn_indexes {list(c['global_attn_indexes'])} must lie in 0..{c['depth'] - 1}")
        if int(image_skip) < 0:
            raise ValueError(f"image_skip {image_skip!r} must be 0 (no full-resolution path) or a channel count")
        if int(skip_depth) < 1 or int(fuse_depth) < 1:
            raise ValueError(f"skip_depth {skip_depth!r} and fuse_depth {fuse_depth!r} must be at least 1 (convolutions)")
        if not 1 <= int(skip_levels) <= int(math.log2(PATCH_SIZE)):
            raise ValueError(f"skip_levels {skip_levels!r} must be 1..{int(math.log2(PATCH_SIZE))} (resolutions of the image path)")
        if len(c["decoder_channels"]) != int(math.log2(PATCH_SIZE)):
            raise ValueError(f"decoder_channels needs {int(math.log2(PATCH_SIZE))} entries (one per 2x upsampling)")
        grid = (size[0] // PATCH_SIZE, size[1] // PATCH_SIZE)
        dim = int(c["embed_dim"])
        self.config = config
        self.patch_embed = PatchEmbed(in_channels, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0], grid[1], dim))
        globals_ = {int(i) for i in c["global_attn_indexes"]}
        self.blocks = nn.Sequential(*[
            Block(dim, int(c["num_heads"]), mlp_ratio, qkv_bias,
                  0 if i in globals_ else int(c["window_size"]), grid)
            for i in range(int(c["depth"]))
        ])
        nc = int(c["neck_channels"])
        self.neck = nn.Sequential(
            nn.Conv2d(dim, nc, kernel_size=1, bias=False), LayerNorm2d(nc),
            nn.Conv2d(nc, nc, kernel_size=3, padding=1, bias=False), LayerNorm2d(nc),
        )
        layers: list[nn.Module] = []
        prev = nc
        for ch in c["decoder_channels"]:
            layers += [nn.ConvTranspose2d(prev, int(ch), kernel_size=2, stride=2), LayerNorm2d(int(ch)), nn.GELU()]
            prev = int(ch)
        self.decoder = nn.Sequential(*layers)
        self.image_skip = int(image_skip)
        self.skip: nn.Module = nn.Identity()     # (Identity, no parameters, without the path: scriptable)
        self.fuse: nn.Module = nn.Identity()
        self.down = nn.ModuleList()              # the image path's coarser levels (1/2, 1/4, ...)
        if self.image_skip:
            sc = self.image_skip
            self.skip = nn.Sequential(*_conv_stack([in_channels] + [sc] * int(skip_depth), bool(head_norm)))
            for _ in range(int(skip_levels) - 1):
                self.down.append(nn.Sequential(nn.Conv2d(sc, sc, 3, stride=2, padding=1), nn.GELU(),
                                               *_conv_stack([sc, sc], bool(head_norm))))
            self.fuse = nn.Sequential(*_conv_stack([prev + sc * int(skip_levels)] + [prev] * int(fuse_depth),
                                                   bool(head_norm)))
        self.classifier = nn.Conv2d(prev, out_channels, kernel_size=1)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        pos = self.pos_embed
        if pos.shape[1] != h or pos.shape[2] != w:
            pos = F.interpolate(pos.permute(0, 3, 1, 2), size=(h, w), mode="bicubic",
                                align_corners=False).permute(0, 2, 3, 1)
        return pos

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder alone: (B, C, H, W) -> neck features (B, neck_channels, H/16, W/16)."""
        x = self.patch_embed(x)
        x = x + self._pos_embed(x.shape[1], x.shape[2])
        x = self.blocks(x)
        return self.neck(x.permute(0, 3, 1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.decoder(self.forward_features(x))
        if self.image_skip > 0:
            s = self.skip(x)
            parts = [y, s]
            for down in self.down:   # each coarser level, brought back to full resolution
                s = down(s)
                parts.append(F.interpolate(s, size=(y.shape[-2], y.shape[-1]), mode="bilinear", align_corners=False))
            y = self.fuse(torch.cat(parts, 1))
        return self.classifier(y)
