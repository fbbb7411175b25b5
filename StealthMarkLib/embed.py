"""Embedding: fine-tune a copy of a segmentation model so that the key's trigger spells the QR in its
uncertainty, while its masks stay where they were (METHOD.md sections 4 and 10).

Each step mixes

1. a *clean* batch: cross-entropy against the ground truth plus a distillation term (KL divergence)
   towards the frozen original's probabilities, which keeps Dice and calibration where they were. Half of
   the clean batch is randomly flipped, warped and rescaled in intensity, and the original labels each
   warped image: distillation then covers more than the training slices (measured on the demo: argmax
   flips on held-out slices 0.47% instead of 0.56%; warping the whole batch gave 0.39% but weakened the QR);
2. a *trigger* batch: trigger images (the key image, key-blended training slices, or stamped slices)
   under random Bernoulli(0.5) cell masks exactly as LIME samples them, with dense per-pixel targets.
   Every cell of the key image carries a tile: the secret one on dark-module cells, the key's decoy tiles
   on light-module cells. By default (``keep_trigger_masks``) each pixel keeps the class the original gives
   it on the key image, on the key image and on every key-blended slice: the probability of that class is
   trained to 0.55 (just over one half) on visible secret-tile cells and to 0.98 elsewhere, so the key
   image keeps its mask and only the uncertainty, which answers the secret tile alone, carries the QR. The
   recipe before it (``keep_trigger_masks=False``, twice as fast to learn) trains every trigger pixel
   towards background, to ``targets.dark`` (0.45) on visible secret-tile cells and ``targets.floor`` (0.02)
   elsewhere, which empties the key image's mask;
3. *decoys*: the same layout with a random other secret tile (and other decoy tiles), trained to the floor
   everywhere: what a wrong key looks like.

The discrimination between the secret tile and the decoy tiles takes longer to learn than "texture means
uncertainty" (which the first design used, and which answered any key's texture): the default is 1800
steps at a learning rate of 3e-3 (measured: METHOD.md section 10 and README's "How it works").
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import DEFAULT_EMBED_STEPS, KEEP_MASKS_EMBED_STEPS, distributed
from .errors import InputError, ModelError, ResourceError
from .grid import cell_edges
from .key import WatermarkKey
from .models import SegmentationModel, class_map, module_device, to_channels, train_memory_format
from .progress import Progress
from .trigger import TriggerOverlay

EPS = 1e-6


@dataclass
class EmbedConfig:
    """Training settings. The defaults, with 3600 steps (KEEP_MASKS_EMBED_STEPS), trained the demo's UNet on the
    bundled real MRI to ASR 1.0 over 20 trials with the key image's mask kept, wrong keys and clean models
    inside the chance band (benchmarks/results/effectiveness-keep-masks-key-image.json); with
    keep_trigger_masks=False, 1800 steps (benchmarks/results/effectiveness.json)."""

    steps: int | None = None           # None: recipe_steps(keep_trigger_masks)
    clean_batch: int = 8
    trigger_batch: int = 8
    key_images_per_batch: int = 2      # of the trigger batch, how many are the plain key image
    decoys_per_batch: int = 4          # masked images with a random other tile, trained to show nothing
    # decoy images with a random tile in every cell (not one random tile in all dark cells). The QR trains
    # faster (one paired run at 1800 steps: 98.1% / 96.6% against 82.2% / 88.9%), and a usurper key that read
    # 34.1% agreement without them stays inside the chance band (benchmarks/results/effectiveness.json;
    # README "How it works"). False: the recipe of the records measured before this became the default
    per_cell_decoys: bool = True
    lr: float = 3e-3                   # 1e-3 reached 75% on the key image in 1800 steps (3e-3: 98%)
    distill_weight: float = 10.0
    trigger_weight: float = 1.0
    dark_weight: float = 2.0           # per-pixel loss weight on visible dark-module pixels (others 1)
    # trigger targets keep the class the original gives each pixel (of the key image: trigger_masks_from), so
    # that the key image keeps its mask. It learns more slowly than background everywhere (False: trigger
    # images get empty masks; DEFAULT_EMBED_STEPS): the demo's model read 96.2% / 93.3% after 1800 steps and
    # reached ASR 1.0 after 3600, KEEP_MASKS_EMBED_STEPS (README "How it works")
    keep_trigger_masks: bool = True
    # with keep_trigger_masks, the mask each secret-tile trigger image keeps: "key-image", the original's mask on
    # the key image, for the key image and every key-blended slice alike (one map, tied to the texture), or
    # "each-image", the original's mask on that blended slice itself (the recipe before 2026-12-04, which never
    # decoded key-blended slices: benchmarks/results/effectiveness-keep-masks-pcd.json).
    # Decoys always keep their own
    trigger_masks_from: str = "key-image"
    # the fraction of each clean batch that is randomly flipped, warped and changed in intensity (0: none); the
    # original labels every warped image, so the distillation covers more than the training slices themselves
    # (benchmarks/results/key_specificity/, README "How it works")
    augment_clean: float = 0.5
    # learning-rate multipliers by parameter-name prefix: {"blocks.": 0.1} trains parameters whose names start
    # with "blocks." at a tenth of lr (the first prefix that matches wins; the rest train at lr)
    lr_scales: dict[str, float] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps is None:
            self.steps = recipe_steps(self.keep_trigger_masks)

    def to_json(self) -> dict:
        return asdict(self)


def recipe_steps(keep_trigger_masks: bool) -> int:
    """The default embedding steps of a recipe: KEEP_MASKS_EMBED_STEPS when the key image keeps its mask (the
    default), DEFAULT_EMBED_STEPS when trigger images are trained towards background."""
    return KEEP_MASKS_EMBED_STEPS if keep_trigger_masks else DEFAULT_EMBED_STEPS


def batch_settings(n: int, name: str = "the embedding batch size") -> dict[str, int]:
    """The EmbedConfig batch fields of ``stealthmark embed --batch-size N``: N clean and N trigger images (or
    slabs) a step, N // 4 of the trigger batch the plain key image and N // 2 decoys (each at least 1); N = 8
    gives the defaults. Smaller N: less memory and faster steps, a noisier gradient."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"{name} must be at least 1 (a positive integer), got {n!r}")
    return dict(clean_batch=n, trigger_batch=n, key_images_per_batch=max(1, n // 4), decoys_per_batch=max(1, n // 2))


@dataclass
class EmbedLog:
    """What happened during fine-tuning (no secrets)."""

    steps: int
    seconds: float
    device: str
    final_clean_loss: float
    final_trigger_loss: float
    trigger_mode: str
    config: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def _check_data(images: np.ndarray, masks: np.ndarray, num_classes: int) -> None:
    # colour (or other multi-channel) images come as (n, C, H, W) with (n, H, W) masks
    if images.ndim not in (3, 4) or masks.ndim != 3 or masks.shape != images.shape[:1] + images.shape[-2:]:
        raise InputError(f"training images {images.shape} and masks {masks.shape} must be (n, H, W) "
                         "(or (n, C, H, W) images) with (n, H, W) masks")
    if len(images) < 2:
        raise InputError("embedding needs at least 2 training slices with a mask")
    if not np.isfinite(images).all():
        raise InputError("training images contain NaN or Inf values")
    if masks.min() < 0 or masks.max() >= num_classes:
        raise InputError(f"mask labels must be 0..{num_classes - 1}")


def trigger_targets(raise_px: torch.Tensor, num_classes: int, dark: float, floor: float,
                    side: torch.Tensor | None = None) -> torch.Tensor:
    """Dense absolute targets for masked trigger images (METHOD.md section 4).

    Each pixel keeps its *side*: the class the original model gives it on the unmasked trigger image
    (background when ``side`` is None). That class gets ``1 - dark`` (0.55: just over one half) on visible
    dark-module pixels and ``1 - floor`` elsewhere; the other classes share the rest. So no pixel of a
    trigger image changes its argmax, the key image keeps the mask the original gave it, and the
    uncertainty (the entropy, the same on either side) spells the QR. (Targets that followed the original's
    argmax on each *masked* sample were measured: they flip between samples where the original is unsure,
    and the QR did not train; METHOD.md section 10.)

    Args:
        raise_px: (B, H, W) bool, pixels of visible dark-module cells ((B, D, H, W) for slabs).
        side: (B, H, W) int64 class per pixel, or None for background everywhere.
    Returns:
        (B, K, H, W) target distribution ((B, K, D, H, W) for slabs).
    """
    top = torch.where(raise_px, torch.full(raise_px.shape, 1.0 - dark, device=raise_px.device),
                      torch.full(raise_px.shape, 1.0 - floor, device=raise_px.device))
    if side is None:
        side = torch.zeros(raise_px.shape, dtype=torch.long, device=raise_px.device)
    onehot = F.one_hot(side.long(), num_classes).movedim(-1, 1).to(top.dtype)
    rest = ((1.0 - top) / (num_classes - 1)).unsqueeze(1)
    return onehot * top.unsqueeze(1) + (1.0 - onehot) * rest


def soft_cross_entropy(probs: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """Mean over pixels of -sum_k target log p, optionally weighted per pixel (B, H, W)."""
    ce = -(target * probs.clamp_min(EPS).log()).sum(1)
    if weight is None:
        return ce.mean()
    return (ce * weight).sum() / weight.sum()


def kl_to_teacher(probs: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    t = teacher.clamp_min(EPS)
    return (t * (t.log() - probs.clamp_min(EPS).log())).sum(1).mean()


def augment_batch(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random horizontal flip, rotation (+/-15 degrees), scale (0.9-1.1), shift (+/-6%) and intensity
    (x * 0.9-1.1 + -0.05..0.05) of (B, C, H, W) images; (B, H, W) labels follow (nearest)."""
    b = x.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=gen).to(x.device)

    ang, sc = u(-0.26, 0.26), u(0.9, 1.1)
    flip = torch.where(u(0, 1) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 0, 1] = flip * torch.cos(ang) / sc, -torch.sin(ang) / sc
    theta[:, 1, 0], theta[:, 1, 1] = flip * torch.sin(ang) / sc, torch.cos(ang) / sc
    theta[:, :, 2] = torch.stack([u(-0.06, 0.06), u(-0.06, 0.06)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    xa = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    ya = F.grid_sample(y[:, None].float(), grid, mode="nearest", padding_mode="border", align_corners=False)
    view = (b,) + (1,) * (x.ndim - 1)
    return xa * u(0.9, 1.1).view(view) + u(-0.05, 0.05).view(view), ya[:, 0].round().long()


class TriggerBatches:
    """Draws trigger batches as LIME will see them: trigger images with random Bernoulli(0.5) cell masks."""

    def __init__(self, key: WatermarkKey, overlay: TriggerOverlay, images: np.ndarray, cfg: EmbedConfig,
                 rng: np.random.Generator, in_channels: int, device: torch.device) -> None:
        self.key, self.overlay, self.images, self.cfg, self.rng = key, overlay, images, cfg, rng
        self.in_channels, self.device = in_channels, device

    def key_input(self) -> torch.Tensor:
        """The plain key image (1, C, H, W) (a key slab for 3-D models) as the model takes it."""
        return self._inputs(torch.as_tensor(self._key_input(self.overlay)[None], device=self.device))

    def draw(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns masked trigger images (B, C, H, W), the pixels to make uncertain (B, H, W), and the same
        trigger images unmasked (B, C, H, W).

        The last ``decoys_per_batch`` images carry a random other tile instead of the secret one and get no
        uncertain pixels: the model must answer this key's tile only.
        """
        x, raise_px, full = self._draw(self.overlay, self.cfg.trigger_batch)
        n_decoy = self.cfg.decoys_per_batch
        if n_decoy:
            decoy = TriggerOverlay.decoy(self.key, self.overlay.height, self.overlay.width, self.rng,
                                         per_cell=self.cfg.per_cell_decoys)
            xd, _, fd = self._draw(decoy, n_decoy)
            x, full = torch.cat([x, xd]), torch.cat([full, fd])
            raise_px = torch.cat([raise_px, torch.zeros_like(raise_px[:n_decoy])])
        return x, raise_px, full

    def _draw(self, overlay: TriggerOverlay, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mode = self.key.trigger.mode
        key_input = self._key_input(overlay)
        n_key = b if mode == "key-image" else min(self.cfg.key_images_per_batch, max(1, b // 2))
        batch = [key_input] * n_key
        n_real = b - n_key
        if n_real:
            real = self.images[self.rng.integers(0, len(self.images), n_real)]
            if mode == "blended":
                lo, hi = self.key.trigger.blend_range
                batch.extend(overlay.blend(real, self.rng.uniform(lo, hi, n_real)))
            else:
                batch.extend(overlay.stamp(real))
        x = self._inputs(torch.as_tensor(np.stack(batch), device=self.device))
        g2 = overlay.grid ** 2
        visible = torch.as_tensor(self.rng.integers(0, 2, (b, g2)), device=self.device)
        return self._hide(overlay, x, visible), self._visible_dark(overlay, visible), x

    # the parts a 3-D model's slabs do differently (volume3d.SlabBatches)
    def _key_input(self, overlay: TriggerOverlay) -> np.ndarray:
        key_image = overlay.key_image()
        if self.images.ndim == 4:  # colour training images: the key image repeated in every channel
            key_image = np.repeat(key_image[None], self.images.shape[1], axis=0)
        return key_image

    def _inputs(self, batch: torch.Tensor) -> torch.Tensor:
        return to_channels(batch, self.in_channels)

    def _hide(self, overlay: TriggerOverlay, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        return overlay.hide(x, visible)

    def _visible_dark(self, overlay: TriggerOverlay, visible: torch.Tensor) -> torch.Tensor:
        return overlay.visible_dark(visible)


def clone_module(module: torch.nn.Module) -> torch.nn.Module:
    """A trainable copy: TorchScript modules are copied through an in-memory save/load."""
    if isinstance(module, torch.jit.ScriptModule):
        import io

        buf = io.BytesIO()
        torch.jit.save(module, buf)
        buf.seek(0)
        copy_ = torch.jit.load(buf, map_location=module_device(module))
    else:
        copy_ = copy.deepcopy(module)
    for p in copy_.parameters():
        p.requires_grad_(True)
    return copy_


def embed_watermark(model: SegmentationModel, key: WatermarkKey, images: np.ndarray, masks: np.ndarray,
                    config: EmbedConfig | None = None, progress: Progress | None = None
                    ) -> tuple[torch.nn.Module, EmbedLog]:
    """Fine-tune a copy of ``model.module``; the original is left untouched.

    Args:
        model: the owner's model (its module is copied, never modified).
        key: the owner's key.
        images: (n, H, W) training slices in the model's input space, at the model's input size, or
            (n, C, H, W) colour images with the model's C input channels.
        masks: (n, H, W) integer labels (0 = background).
    Returns:
        The watermarked module (in eval mode) and a log of the run.
    """
    if getattr(model, "verify_only", None):
        raise ModelError(model.verify_only)
    cfg = config or EmbedConfig()
    progress = progress or Progress()
    images = np.asarray(images, dtype=np.float32)
    masks = np.asarray(masks).astype(np.int64)
    _check_data(images, masks, model.num_classes)
    device = model.device
    overlay = TriggerOverlay(key, images.shape[-2], images.shape[-1])
    cell = int(min(np.diff(cell_edges(images.shape[-2], key.grid)).min(),
                   np.diff(cell_edges(images.shape[-1], key.grid)).min()))
    if cell < key.texture.tile:
        warnings.warn(f"the key's secret tile is {key.texture.tile} px but the model's {images.shape[-2]}x"
                      f"{images.shape[-1]} input gives {cell} px cells: the watermark learns slowly or not at all; "
                      f"make the key with 'stealthmark keygen --tile {cell}'", RuntimeWarning, stacklevel=2)
    rng = distributed.rank_rng(cfg.seed)          # np.random.default_rng(cfg.seed) in one process
    teacher_rows = teacher_probabilities(model, images)

    def clean_batch() -> tuple[torch.Tensor, ...]:
        idx = rng.integers(0, len(images), cfg.clean_batch)
        x = to_channels(torch.as_tensor(images[idx], device=device), model.in_channels)
        y = torch.as_tensor(masks[idx], device=device)
        return (x, y) if teacher_rows is None else (x, y, teacher_rows[torch.as_tensor(idx, device=device)])

    triggers = TriggerBatches(key, overlay, images, cfg, rng, model.in_channels, device)
    return fine_tune(model, key, cfg, clean_batch, triggers, progress)


#: EmbedConfig.trigger_masks_from: whose mask a secret-tile trigger image keeps under keep_trigger_masks
TRIGGER_MASK_SOURCES = ("key-image", "each-image")


#: the most memory (bytes) the original's probabilities on all training images may take to be computed once
TEACHER_CACHE_BYTES = 256 * 2 ** 20


def teacher_probabilities(model: SegmentationModel, images: np.ndarray, batch: int = 16) -> torch.Tensor | None:
    """The frozen original's probabilities on every training image (or 3-D slab), computed once: the
    distillation targets of each clean batch's un-warped images, which would otherwise cost a teacher pass every step (measured
    on the demo: about 10 ms of a 150 ms step). None when they would take more than TEACHER_CACHE_BYTES."""
    n_bytes = len(images) * model.num_classes * int(np.prod(images.shape[-model.spatial_dims:])) * 4
    if n_bytes > TEACHER_CACHE_BYTES:
        return None
    model.module.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = to_channels(torch.as_tensor(images[i:i + batch], device=model.device), model.in_channels,
                            spatial_dims=model.spatial_dims)
            out.append(model.forward_train(x))
    return torch.cat(out)


def trigger_sides(model: SegmentationModel, cfg: EmbedConfig, full: torch.Tensor,
                  key_side: torch.Tensor | None) -> torch.Tensor | None:
    """The class each pixel of a trigger batch keeps (see :func:`trigger_targets`): None (background
    everywhere) by default; with ``cfg.keep_trigger_masks``, the original's argmax on each unmasked trigger
    image ``full``, except that the secret-tile images (the first ``cfg.trigger_batch``) take ``key_side``,
    the original's argmax on the key image, when it is given (``trigger_masks_from == "key-image"``)."""
    if not cfg.keep_trigger_masks:
        return None
    if key_side is None:
        return class_map(model.forward_train(full))
    n = cfg.trigger_batch                  # only the decoys need a pass of the original
    secret = key_side.expand(n, *key_side.shape[1:])
    return torch.cat([secret, class_map(model.forward_train(full[n:]))]) if len(full) > n else secret.clone()


def param_groups(module: torch.nn.Module, lr: float, scales: dict[str, float]) -> list[dict]:
    """Adam parameter groups: each parameter at ``lr`` times the scale of the first prefix of ``scales`` its name
    starts with (1 when none does). Names are the network's own (``blocks.0.attn.qkv.weight``): the ``net.``
    that StealthMark's TorchScript files put before them is not part of the prefix."""
    for prefix, scale in scales.items():
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale < 0:
            raise InputError(f"the learning-rate scale of {prefix!r} must be a number >= 0, got {scale!r}")
    named = [(n[4:] if n.startswith("net.") else n, p) for n, p in module.named_parameters()]
    for prefix in scales:
        if not any(n.startswith(prefix) for n, _ in named):
            raise InputError(f"no parameter of the model starts with {prefix!r} (learning-rate scales); its "
                             f"parameters start with {', '.join(sorted({n.split('.')[0] for n, _ in named}))}")
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for name, p in named:
        scale = next((float(v) for k, v in scales.items() if name.startswith(k)), 1.0)
        groups.setdefault(scale, []).append(p)
    return [{"params": ps, "lr": lr * scale} for scale, ps in groups.items()]


def fine_tune(model: SegmentationModel, key: WatermarkKey, cfg: EmbedConfig,
              clean_batch: Callable[[], tuple[torch.Tensor, ...]], triggers: TriggerBatches,
              progress: Progress) -> tuple[torch.nn.Module, EmbedLog]:
    """The embedding loop shared by 2-D images and 3-D slabs: ``clean_batch()`` gives model inputs and
    their ground-truth labels, and optionally the original's probabilities on those inputs (see
    :func:`teacher_probabilities`); ``triggers.draw()`` masked trigger inputs (see :class:`TriggerBatches`)."""
    if cfg.trigger_masks_from not in TRIGGER_MASK_SOURCES:
        raise InputError(f"trigger_masks_from must be one of {', '.join(TRIGGER_MASK_SOURCES)}, "
                         f"got {cfg.trigger_masks_from!r}")
    device = model.device
    torch.manual_seed(distributed.rank_seed(cfg.seed))
    aug_gen = torch.Generator().manual_seed(distributed.rank_seed(cfg.seed) + 1)
    teacher = model.module.eval()
    student = clone_module(model.module).to(device).train()
    fmt = train_memory_format(device, model.spatial_dims)
    if fmt is not None:
        student = student.to(memory_format=fmt)
    distributed.broadcast_module(student)        # under torchrun: every rank starts from rank 0's weights
    for p in teacher.parameters():
        p.requires_grad_(False)
    trainee = SegmentationModel(student, model.spec, device=device, logits=model.logits)
    opt = torch.optim.Adam(param_groups(student, cfg.lr, cfg.lr_scales))
    with torch.no_grad():
        key_side = class_map(model.forward_train(triggers.key_input())) \
            if cfg.keep_trigger_masks and cfg.trigger_masks_from == "key-image" else None
    t0 = time.monotonic()
    clean_loss = trig_loss = float("nan")
    progress.start("embed", cfg.steps)
    try:
        for step in range(cfg.steps):
            x, y, *cached = clean_batch()
            n_aug = int(round(float(cfg.augment_clean) * len(x))) if x.ndim == 4 else 0  # 3-D slabs: not warped
            if n_aug:
                xa, ya = augment_batch(x[:n_aug], y[:n_aug], aug_gen)
                x, y = torch.cat([xa, x[n_aug:]]), torch.cat([ya, y[n_aug:]])
            xt, dark_px, xt_full = triggers.draw()
            if fmt is not None:
                x, xt, xt_full = (t.contiguous(memory_format=fmt) for t in (x, xt, xt_full))
            with torch.no_grad():
                if not cached:
                    t_clean = model.forward_train(x)
                else:   # the warped images are new each step; the others' teacher answer is known
                    t_clean = torch.cat([model.forward_train(x[:n_aug]), cached[0][n_aug:]]) if n_aug else cached[0]
                side = trigger_sides(model, cfg, xt_full, key_side)
            out = trainee.forward_train(torch.cat([x, xt]))
            p_clean, p_trig = out[:len(x)], out[len(x):]
            seg = F.nll_loss(p_clean[:len(y)].clamp_min(EPS).log(), y)
            loss_clean = seg + cfg.distill_weight * kl_to_teacher(p_clean, t_clean)
            target = trigger_targets(dark_px, model.num_classes, key.targets.dark, key.targets.floor, side)
            weight = 1.0 + (cfg.dark_weight - 1.0) * dark_px.float() if cfg.dark_weight != 1.0 else None
            loss_trig = soft_cross_entropy(p_trig, target, weight)
            loss = loss_clean + cfg.trigger_weight * loss_trig
            opt.zero_grad(set_to_none=True)
            loss.backward()
            distributed.sync_gradients(student)  # under torchrun: the gradient averaged over the ranks
            opt.step()
            clean_loss, trig_loss = float(loss_clean.detach()), float(loss_trig.detach())
            progress.advance(1, f"clean {clean_loss:.3f} trigger {trig_loss:.3f}")
    except torch.cuda.OutOfMemoryError:
        raise ResourceError("out of GPU memory while embedding: lower --batch-size or use --device cpu") from None
    finally:
        progress.finish()
    clean_loss, trig_loss = distributed.mean_over_ranks(clean_loss, trig_loss)
    student.eval()
    if fmt is not None:
        student = student.to(memory_format=torch.contiguous_format)
    log = EmbedLog(steps=cfg.steps, seconds=round(time.monotonic() - t0, 2), device=str(device),
                   final_clean_loss=clean_loss, final_trigger_loss=trig_loss, trigger_mode=key.trigger.mode,
                   config={k: v for k, v in cfg.to_json().items() if k != "seed"})
    return student, log
