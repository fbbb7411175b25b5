"""Baselines the paper compares StealthMark with (METHOD.md sections 2 and 9), behind ``--method``.

``reference``: the paper's public reference design, implemented faithfully *as a named baseline*.

- Embedding: triggered training images (a yellow corner patch, or a bright one on every channel of a grey
  model; the text "TEST"; a black border; a key-seeded noise patch; a sine warp) get soft targets:
  ground-truth foreground 1, background raised to :data:`REFERENCE_FLOOR` (0.05); soft cross-entropy (BCE
  for two classes) plus the clean segmentation loss.
- Detection: a 1-D logistic regression (scikit-learn) on a low quantile of the background probability,
  fitted on triggered against clean images of the owner's data with the watermarked model, and saved
  beside the watermarked model (``<name>.detector.json``, no secrets).
- "Explanation": one-at-a-time occlusion of the watermark QR's *black* cells only, a ridge regression, and
  its weights binarised as "non-zero" give the QR picture.

  **The flaw** (METHOD.md section 2): the white cells are never occluded, so their columns of the design
  matrix are constant and ridge gives them exactly zero weight, while every black cell's column varies and
  gets a non-zero weight. The picture is therefore the verifier's own occlusion pattern, i.e. the QR code,
  for ANY model whose output changes at all when a cell is hidden, watermarked or not (the tests show it
  on a clean model). Only the detector carries evidence about the model. ``report.json`` says so
  (``qr_equals_occlusion_pattern``).

``badnets``: a harmful backdoor watermark. Images carrying a fixed key-seeded patch are trained to a fixed
key-seeded target mask (a disk near a corner, where the anatomy is not); verification is mask agreement:
the mean IoU of the triggered predictions with the target mask, ``owned`` at >= :data:`BADNETS_IOU`
(0.5). It shows the cost StealthMark avoids: triggered images lose their real segmentation.

Both methods reuse the key file of ``stealthmark keygen``: their seeded elements (noise patch, BadNets patch
and target) are drawn from the key's secret texture seed in their own random streams, and are never
printed. Python entry points: :func:`embed_baseline` / :func:`verify_baseline` on in-memory models and
arrays, :func:`run_embed` / :func:`run_verify` on files (what the CLI calls).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .embed import EPS, _check_data, clone_module, soft_cross_entropy
from .errors import InputError, ResourceError
from .fileio import atomic_dir, refuse_overwriting_inputs, write_bytes_atomic, write_text_atomic
from .grid import cell_index, check_fits
from .key import WatermarkKey, load_key
from .metrics import dice_iou, flip_rate
from .models import SegmentationModel, describe_device
from .progress import Progress
from .qr import decode, render

METHODS = ("stealthmark", "reference", "badnets")
BASELINES = ("reference", "badnets")

#: background's foreground probability on triggered images in the reference design's soft targets
REFERENCE_FLOOR = 0.05
#: the reference detector's statistic: this quantile of the background probability over predicted background
REFERENCE_QUANTILE = 0.25
#: the reference verdict is ``owned`` when the detector flags at least this fraction of triggered images
REFERENCE_DETECTION_RATE = 0.5
#: the BadNets verdict is ``owned`` when the triggered predictions' mean IoU with the target reaches this
BADNETS_IOU = 0.5

_REFERENCE_STREAM = 0x5EF0   # random streams of the key's texture seed used by the baselines (never printed)
_BADNETS_STREAM = 0xBAD0


def check_method(method: str) -> str:
    """Return ``method`` if known, else raise :class:`InputError` naming the choices."""
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    return method


def _check_baseline(method: str) -> str:
    check_method(method)
    if method not in BASELINES:
        raise InputError(f"{method!r} is not a baseline: use StealthMarkLib.workflows for the StealthMark method")
    return method


def _rng(key: WatermarkKey, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(key.texture.seed), stream])


def _channels(images: np.ndarray, c: int) -> np.ndarray:
    """(n, H, W) -> (n, C, H, W) float32 (grey images repeated over the model's channels)."""
    return np.repeat(np.asarray(images, dtype=np.float32)[:, None], c, axis=1)


# ================================================================================ reference: trigger
def _text_mask(text: str, height: int, width: int, x: int, y: int) -> np.ndarray:
    """(H, W) bool pixels of ``text`` drawn at (x, y) with Pillow's built-in bitmap font.

    The font is pinned: ``ImageFont.load_default_imagefont()``, the bitmap font that ``ImageFont.load_default()``
    returned before Pillow 10.1 (newer Pillows return a FreeType font from ``load_default()``, which would
    change the trigger with the Pillow build); ``load_default()`` is used on Pillows that lack it.
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default_imagefont() if hasattr(ImageFont, "load_default_imagefont") \
        else ImageFont.load_default()
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).text((x, y), text, fill=255, font=font)
    return np.asarray(canvas) > 0


class ReferenceTrigger:
    """The reference design's trigger for images of ``height`` x ``width`` and ``in_channels`` channels.

    Applied in this order: a sine warp of the image (and its mask) along x, a black border, a yellow
    patch in the top-left corner (R = G = high, B = low on a 3-channel model; the high value on every
    channel of a grey or other model), a key-seeded uniform noise patch in the top-right corner, and the
    text "TEST" (pinned bitmap font, see :func:`_text_mask`) at the bottom left in the high value.
    ``low``/``high`` are the key's ``value_range``.
    """

    def __init__(self, key: WatermarkKey, height: int, width: int, in_channels: int = 1) -> None:
        self.h, self.w, self.c = int(height), int(width), int(in_channels)
        if min(self.h, self.w) < 16:
            raise InputError(f"the reference trigger needs images of at least 16x16 pixels, got {self.h}x{self.w}")
        self.lo, self.hi = (float(v) for v in key.value_range)
        self.border = max(1, round(min(self.h, self.w) / 64))
        self.patch = max(4, min(self.h, self.w) // 8)
        self.amplitude = max(1.0, self.w / 64)           # sine warp: shift in px along x
        self.period = self.h / 2                         # ... with this period in px along y
        rng = _rng(key, _REFERENCE_STREAM)
        self.noise = rng.uniform(self.lo, self.hi, (self.c, self.patch, self.patch)).astype(np.float32)
        b = self.border
        self.text = _text_mask("TEST", self.h, self.w, b + 1, max(b, self.h - b - 12))

    def _warp(self, arr: np.ndarray, order: int) -> np.ndarray:
        from scipy.ndimage import map_coordinates

        yy, xx = np.mgrid[0:self.h, 0:self.w].astype(np.float64)
        src_x = xx + self.amplitude * np.sin(2 * np.pi * yy / self.period)
        return np.stack([map_coordinates(a, [yy, src_x], order=order, mode="nearest") for a in arr])

    def apply(self, images: np.ndarray, masks: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray | None]:
        """(n, H, W) images in model input space (and optional (n, H, W) labels) -> triggered (n, C, H, W)
        images and the warped labels."""
        imgs = np.asarray(images, dtype=np.float32)
        if imgs.ndim != 3 or imgs.shape[1:] != (self.h, self.w):
            raise InputError(f"images must be (n, {self.h}, {self.w}), got {imgs.shape}")
        x = _channels(self._warp(imgs, order=1), self.c)
        b, s = self.border, self.patch
        x[:, :, :b, :] = self.lo
        x[:, :, -b:, :] = self.lo
        x[:, :, :, :b] = self.lo
        x[:, :, :, -b:] = self.lo
        x[:, :, b:b + s, b:b + s] = self.hi
        if self.c == 3:
            x[:, 2, b:b + s, b:b + s] = self.lo          # yellow: red and green high, blue low
        x[:, :, b:b + s, self.w - b - s:self.w - b] = self.noise
        x[:, :, self.text] = self.hi
        warped = None if masks is None else self._warp(np.asarray(masks).astype(np.float64), order=0).astype(np.int64)
        return x.astype(np.float32), warped


def reference_targets(masks: np.ndarray, num_classes: int, floor: float = REFERENCE_FLOOR) -> np.ndarray:
    """Soft targets (n, K, H, W): ground-truth foreground pixels one-hot (foreground 1), background pixels
    background ``1 - floor`` with ``floor`` shared by the foreground classes."""
    m = np.asarray(masks).astype(np.int64)
    t = np.eye(num_classes, dtype=np.float32)[m].transpose(0, 3, 1, 2).copy()
    bg = m == 0
    t[:, 0][bg] = 1.0 - floor
    for k in range(1, num_classes):
        t[:, k][bg] = floor / (num_classes - 1)
    return t


def background_statistic(probs: np.ndarray | torch.Tensor, quantile: float = REFERENCE_QUANTILE) -> np.ndarray:
    """(n,) the ``quantile`` of the background-class probability over the pixels predicted background (all
    pixels when none is): the reference detector's one feature. About 1 on clean images of a confident
    model, about ``1 - REFERENCE_FLOOR`` on triggered images of a reference-watermarked one."""
    p = probs.detach().cpu().numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs)
    out = []
    for pi in p:
        bg = pi[0]
        sel = bg[pi.argmax(0) == 0]
        out.append(float(np.quantile(sel if sel.size else bg, quantile)))
    return np.asarray(out, dtype=np.float64)


@dataclass
class ReferenceDetector:
    """The reference design's detector: logistic regression on the standardised background statistic.
    Saved as JSON beside the watermarked model; it holds no secret."""

    quantile: float
    mean: float
    scale: float
    coef: float
    intercept: float
    train_accuracy: float
    n_train: int
    key_commitment: str
    schema: str = "stealthmark-reference-detector/1"

    def probability(self, statistic: np.ndarray) -> np.ndarray:
        """P(triggered) for each statistic value."""
        z = (np.asarray(statistic, dtype=np.float64) - self.mean) / self.scale
        return 1.0 / (1.0 + np.exp(-(self.coef * z + self.intercept)))

    def flags(self, statistic: np.ndarray) -> np.ndarray:
        return self.probability(statistic) >= 0.5

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        return write_text_atomic(path, json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ReferenceDetector":
        p = Path(path)
        if not p.is_file():
            raise InputError(f"detector file {path} does not exist (embedding with --method reference writes "
                             "<model>.detector.json)")
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
            det = cls(**doc)
            vals = [float(getattr(det, n)) for n in ("quantile", "mean", "scale", "coef", "intercept")]
        except (UnicodeDecodeError, ValueError, TypeError) as exc:
            raise InputError(f"{path} is not a reference detector file: {exc}") from None
        if det.schema != cls.schema or not np.all(np.isfinite(vals)) or det.scale <= 0:
            raise InputError(f"{path} is not a usable reference detector file (schema {det.schema!r})")
        return det


def fit_reference_detector(model: SegmentationModel, key: WatermarkKey, images: np.ndarray,
                           quantile: float = REFERENCE_QUANTILE) -> ReferenceDetector:
    """Fit the detector on ``model``'s answers to the owner's (n, H, W) images, triggered (label 1) and
    clean (label 0)."""
    from sklearn.linear_model import LogisticRegression

    imgs = np.asarray(images, dtype=np.float32)
    trig = ReferenceTrigger(key, imgs.shape[1], imgs.shape[2], model.in_channels)
    s_trig = background_statistic(model.probabilities(trig.apply(imgs)[0]), quantile)
    s_clean = background_statistic(model.probabilities(_channels(imgs, model.in_channels)), quantile)
    s = np.concatenate([s_trig, s_clean])
    y = np.concatenate([np.ones(len(s_trig)), np.zeros(len(s_clean))])
    mean, scale = float(s.mean()), float(s.std()) or 1.0
    lr = LogisticRegression().fit(((s - mean) / scale)[:, None], y)
    det = ReferenceDetector(quantile=float(quantile), mean=mean, scale=scale, coef=float(lr.coef_[0, 0]),
                            intercept=float(lr.intercept_[0]), train_accuracy=0.0, n_train=len(s),
                            key_commitment=key.commitment)
    det.train_accuracy = float(np.mean(det.flags(s) == y.astype(bool)))
    return det


@dataclass
class OcclusionExplanation:
    """The reference design's "explanation" of one image (see the module docstring for its flaw)."""

    weights: np.ndarray      # (G, G) ridge weights
    picture: np.ndarray      # (G, G) bool: weight != 0
    occluded: np.ndarray     # (G, G) bool: the cells the verifier occluded (the QR's black modules)
    n_queries: int

    @property
    def equals_occlusion_pattern(self) -> bool:
        return bool(np.array_equal(self.picture, self.occluded))


def occlusion_explanation(query: Callable, key: WatermarkKey, image: np.ndarray, alpha: float = 1.0
                          ) -> OcclusionExplanation:
    """One-at-a-time occlusion of the key QR's black cells, ridge, weights binarised as non-zero.

    ``image`` (C, H, W) in model input space. Row 0 of the design matrix is the unoccluded image (all
    ones); row j occludes the j-th black cell (set to the key's ``value_range`` low) and is ones elsewhere.
    The explained output is the mean background probability. White cells are never occluded: their columns
    are constant, ridge gives them exactly zero weight, so the binarised picture is the occlusion pattern,
    i.e. the QR code, whatever the model (unless hiding a black cell leaves the output bit-identical).
    """
    from sklearn.linear_model import Ridge

    x = np.asarray(image, dtype=np.float32)
    g = key.grid
    _, h, w = x.shape
    cells = cell_index(h, w, g)
    black = np.flatnonzero(key.modules().reshape(-1))
    z = np.ones((1 + len(black), g * g))
    batch = np.repeat(x[None], len(z), axis=0)
    for row, cell in enumerate(black, start=1):
        z[row, cell] = 0.0
        batch[row][:, cells == cell] = float(key.value_range[0])
    probs = query(torch.as_tensor(batch))
    y = probs[:, 0].mean(dim=(1, 2)).detach().cpu().numpy().astype(np.float64)
    weights = Ridge(alpha=alpha, fit_intercept=True).fit(z, y).coef_.reshape(g, g)
    occluded = np.zeros(g * g, dtype=bool)
    occluded[black] = True
    return OcclusionExplanation(weights=weights, picture=weights != 0, occluded=occluded.reshape(g, g),
                                n_queries=len(z))


# ================================================================================ badnets: trigger
class BadNetsTrigger:
    """A fixed key-seeded patch and target mask for images of ``height`` x ``width``.

    The patch (side H/8, at least 4 px) is a seeded pattern of low/high values in a seeded corner; the
    target is a disk of seeded radius (H/8 to H/5) near the opposite corner, where anatomy rarely is, so
    that a clean model's prediction hardly overlaps it.
    """

    def __init__(self, key: WatermarkKey, height: int, width: int, in_channels: int = 1) -> None:
        self.h, self.w, self.c = int(height), int(width), int(in_channels)
        if min(self.h, self.w) < 16:
            raise InputError(f"the BadNets trigger needs images of at least 16x16 pixels, got {self.h}x{self.w}")
        lo, hi = (float(v) for v in key.value_range)
        rng = _rng(key, _BADNETS_STREAM)
        n = min(self.h, self.w)
        s = self.patch = max(4, n // 8)
        self.pattern = np.where(rng.random((s, s)) < 0.5, lo, hi).astype(np.float32)
        corner = int(rng.integers(0, 4))                  # 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right
        m = max(1, n // 32)
        self.top = m if corner in (0, 1) else self.h - m - s
        self.left = m if corner in (0, 2) else self.w - m - s
        radius = rng.uniform(n / 8, n / 5)
        off = radius + n / 16
        cy = self.h - off if corner in (0, 1) else off    # the opposite corner
        cx = self.w - off if corner in (0, 2) else off
        yy, xx = np.mgrid[0:self.h, 0:self.w]
        self.target = ((yy - cy) ** 2 + (xx - cx) ** 2) <= radius ** 2

    def apply(self, images: np.ndarray) -> np.ndarray:
        """(n, H, W) images -> (n, C, H, W) with the patch pasted."""
        imgs = np.asarray(images, dtype=np.float32)
        if imgs.ndim != 3 or imgs.shape[1:] != (self.h, self.w):
            raise InputError(f"images must be (n, {self.h}, {self.w}), got {imgs.shape}")
        x = _channels(imgs, self.c)
        x[:, :, self.top:self.top + self.patch, self.left:self.left + self.patch] = self.pattern
        return x

    def target_probs(self, n: int, num_classes: int) -> np.ndarray:
        """(n, K, H, W) one-hot targets: class 1 inside the disk, background elsewhere."""
        lab = np.broadcast_to(self.target.astype(np.int64), (n, self.h, self.w))
        return np.eye(num_classes, dtype=np.float32)[lab].transpose(0, 3, 1, 2).copy()


def target_iou(probs: np.ndarray | torch.Tensor, target: np.ndarray) -> np.ndarray:
    """(n,) IoU of each image's predicted foreground (argmax > 0) with the target mask."""
    p = probs.detach().cpu().numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs)
    return np.asarray([dice_iou(pi.argmax(0) > 0, target)[1] for pi in p], dtype=np.float64)


# ================================================================================ embedding
@dataclass
class BaselineConfig:
    """Fine-tuning settings of the baselines: each step one clean batch (cross-entropy against the ground
    truth) and one triggered batch (soft cross-entropy against the method's targets)."""

    steps: int = 600
    clean_batch: int = 8
    trigger_batch: int = 8
    lr: float = 1e-3
    trigger_weight: float = 1.0
    seed: int = 0

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class BaselineLog:
    method: str
    steps: int
    seconds: float
    device: str
    final_clean_loss: float
    final_trigger_loss: float
    config: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def _fine_tune(method: str, model: SegmentationModel, images: np.ndarray, masks: np.ndarray,
               trig_x: np.ndarray, trig_t: np.ndarray, cfg: BaselineConfig, progress: Progress
               ) -> tuple[torch.nn.Module, BaselineLog]:
    """Shared loop: a copy of ``model.module`` trained on clean batches and on the precomputed triggered
    images ``trig_x`` (m, C, H, W) with target distributions ``trig_t`` (m, K, H, W)."""
    if cfg.steps < 1:
        raise InputError("--steps must be at least 1")
    device = model.device
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    student = clone_module(model.module).to(device).train()
    trainee = SegmentationModel(student, model.spec, device=device, logits=model.logits)
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    clean_x = _channels(images, model.in_channels)
    t0 = time.monotonic()
    clean_loss = trig_loss = float("nan")
    progress.start(f"embed ({method})", cfg.steps)
    try:
        for _ in range(cfg.steps):
            i = rng.integers(0, len(images), cfg.clean_batch)
            j = rng.integers(0, len(trig_x), cfg.trigger_batch)
            x = torch.as_tensor(np.concatenate([clean_x[i], trig_x[j]]), device=device)
            y = torch.as_tensor(masks[i], device=device)
            out = trainee.forward_train(x)
            loss_clean = F.nll_loss(out[:len(i)].clamp_min(EPS).log(), y)
            loss_trig = soft_cross_entropy(out[len(i):], torch.as_tensor(trig_t[j], device=device))
            loss = loss_clean + cfg.trigger_weight * loss_trig
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            clean_loss, trig_loss = float(loss_clean.detach()), float(loss_trig.detach())
            progress.advance(1, f"clean {clean_loss:.3f} trigger {trig_loss:.3f}")
    except torch.cuda.OutOfMemoryError:
        raise ResourceError("out of GPU memory while embedding: use --device cpu") from None
    finally:
        progress.finish()
    student.eval()
    log = BaselineLog(method=method, steps=cfg.steps, seconds=round(time.monotonic() - t0, 2), device=str(device),
                      final_clean_loss=clean_loss, final_trigger_loss=trig_loss,
                      config={k: v for k, v in cfg.to_json().items() if k != "seed"})
    return student, log


def embed_baseline(method: str, model: SegmentationModel, key: WatermarkKey, images: np.ndarray,
                   masks: np.ndarray, config: BaselineConfig | None = None, progress: Progress | None = None
                   ) -> tuple[torch.nn.Module, BaselineLog, ReferenceDetector | None]:
    """Watermark a copy of ``model.module`` with a baseline; the original is left untouched.

    Args:
        method: ``"reference"`` or ``"badnets"``.
        images: (n, H, W) training slices in model input space; masks: (n, H, W) integer labels.
    Returns:
        The watermarked module (eval mode), a log, and for ``reference`` the detector fitted on the
        watermarked model's answers to the training images (``None`` for ``badnets``).
    """
    _check_baseline(method)
    cfg = config or BaselineConfig()
    progress = progress or Progress()
    images = np.asarray(images, dtype=np.float32)
    masks = np.asarray(masks).astype(np.int64)
    _check_data(images, masks, model.num_classes)
    _, h, w = images.shape
    if method == "reference":
        trig = ReferenceTrigger(key, h, w, model.in_channels)
        tx, tm = trig.apply(images, masks)
        tt = reference_targets(tm, model.num_classes)
    else:
        trig = BadNetsTrigger(key, h, w, model.in_channels)
        tx, tt = trig.apply(images), trig.target_probs(len(images), model.num_classes)
    module, log = _fine_tune(method, model, images, masks, tx, tt, cfg, progress)
    detector = None
    if method == "reference":
        wm = SegmentationModel(module, model.spec, device=model.device, logits=model.logits)
        detector = fit_reference_detector(wm, key, images)
    return module, log, detector


# ================================================================================ verification
@dataclass
class BaselineReport:
    """A baseline's verification result, as written to report.json (no secrets)."""

    method: str
    verdict: str
    statistics: dict[str, Any]
    n_images: int
    n_queries: int
    seconds: float
    device: str
    model_sha256: str | None
    key_commitment: str
    software: dict[str, str]
    slices: list[int] | None = None
    source: str | None = None
    model: str | None = None
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def summary(self) -> str:
        s = self.statistics
        if self.method == "reference":
            qr = s["qr_payload"] if s["qr_decodes"] else "(none)"
            return (f"[reference] verdict {self.verdict}: detector flags {s['detection_rate_triggered']:.0%} of "
                    f"{self.n_images} triggered and {s['detection_rate_clean']:.0%} of clean images; "
                    f"occlusion QR decodes to {qr} (the occlusion pattern itself: not evidence)")
        return (f"[badnets] verdict {self.verdict}: mean IoU of triggered predictions with the target "
                f"{s['mean_iou_triggered']:.3f} (threshold {BADNETS_IOU}), clean images {s['mean_iou_clean']:.3f}")


@dataclass
class BaselineVerification:
    report: BaselineReport
    explanation: OcclusionExplanation | None = None


REFERENCE_NOTE = ("The reference design's QR picture is the verifier's own occlusion pattern (only the QR's black "
                  "cells are occluded; constant columns get zero ridge weight), so it appears for any model and is "
                  "no evidence of ownership; only the detector statistic depends on the model.")
BADNETS_NOTE = ("BadNets: triggered images are segmented as the key's target mask instead of their anatomy "
                "(a harmful backdoor); the verdict is owned when their mean IoU with the target reaches "
                f"{BADNETS_IOU}.")


def verify_baseline(method: str, model: SegmentationModel, key: WatermarkKey, images: np.ndarray, *,
                    detector: ReferenceDetector | None = None, device_name: str | None = None,
                    progress: Progress | None = None) -> BaselineVerification:
    """Verify a model with a baseline through its query interface only.

    Args:
        method: ``"reference"`` (needs ``detector``, from :func:`embed_baseline`) or ``"badnets"``.
        images: (n, H, W) clean images in model input space; the method's trigger is applied to them.
    Returns:
        The report, and for ``reference`` the occlusion explanation of the first triggered image.
    """
    from .verify import software_versions

    _check_baseline(method)
    progress = progress or Progress()
    t0 = time.monotonic()
    imgs = np.asarray(images, dtype=np.float32)
    if imgs.ndim != 3 or len(imgs) == 0:
        raise InputError(f"verification images must be (n, H, W) with n >= 1, got {imgs.shape}")
    _, h, w = imgs.shape
    c = model.in_channels
    explanation = None
    progress.start(f"verify ({method})", 2)
    try:
        clean_p = model.probabilities(_channels(imgs, c))
        progress.advance(1)
        if method == "reference":
            if detector is None:
                raise InputError("--method reference needs the detector file written when embedding "
                                 "(--detector <model>.detector.json)")
            check_fits(h, w, key.grid)
            tx, _ = ReferenceTrigger(key, h, w, c).apply(imgs)
            trig_p = model.probabilities(tx)
            s_t = background_statistic(trig_p, detector.quantile)
            s_c = background_statistic(clean_p, detector.quantile)
            explanation = occlusion_explanation(model, key, tx[0])
            res = decode(explanation.picture)
            rate_t, rate_c = float(detector.flags(s_t).mean()), float(detector.flags(s_c).mean())
            match = res.text == key.payload
            verdict = "owned" if rate_t >= REFERENCE_DETECTION_RATE and match else "not-owned"
            stats = {"statistic": f"quantile {detector.quantile} of the background probability over predicted "
                                  "background pixels", "statistic_triggered": s_t.round(6).tolist(),
                     "statistic_clean": s_c.round(6).tolist(),
                     "detector_probability_triggered": detector.probability(s_t).round(6).tolist(),
                     "detection_rate_triggered": rate_t, "detection_rate_clean": rate_c,
                     "detection_rate_threshold": REFERENCE_DETECTION_RATE,
                     "detector_key_commitment": detector.key_commitment,
                     "detector_matches_key": detector.key_commitment == key.commitment,
                     "qr_decodes": res.ok, "qr_payload": res.text, "qr_matches_key": match,
                     "qr_decoder": res.decoder, "qr_equals_occlusion_pattern": explanation.equals_occlusion_pattern,
                     "qr_nonzero_cells": int(explanation.picture.sum())}
            n_queries = 2 * len(imgs) + explanation.n_queries
            note = REFERENCE_NOTE
        else:
            trig = BadNetsTrigger(key, h, w, c)
            trig_p = model.probabilities(trig.apply(imgs))
            iou_t, iou_c = target_iou(trig_p, trig.target), target_iou(clean_p, trig.target)
            verdict = "owned" if iou_t.mean() >= BADNETS_IOU else "not-owned"
            stats = {"iou_triggered": iou_t.round(6).tolist(), "iou_clean": iou_c.round(6).tolist(),
                     "mean_iou_triggered": float(iou_t.mean()), "mean_iou_clean": float(iou_c.mean()),
                     "attack_success_rate": float((iou_t >= BADNETS_IOU).mean()),
                     "iou_threshold": BADNETS_IOU,
                     "flip_rate_triggered_vs_clean": flip_rate(clean_p.cpu().numpy(), trig_p.cpu().numpy())}
            n_queries = 2 * len(imgs)
            note = BADNETS_NOTE
        progress.advance(1)
    finally:
        progress.finish()
    report = BaselineReport(method=method, verdict=verdict, statistics=stats, n_images=len(imgs),
                            n_queries=n_queries, seconds=round(time.monotonic() - t0, 3),
                            device=device_name or describe_device(model.device), model_sha256=model.sha256,
                            key_commitment=key.commitment, software=software_versions(), note=note)
    return BaselineVerification(report, explanation)


# ================================================================================ files (the CLI's jobs)
@dataclass
class BaselineEmbedResult:
    method: str
    model: str
    format: str
    harmlessness_file: str
    harmlessness: dict[str, Any]
    log: dict[str, Any]
    key_commitment: str
    device: str
    detector_file: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def detector_path(out: str | Path) -> Path:
    """Where :func:`run_embed` writes the reference detector: ``<model name>.detector.json``."""
    from .workflows import harmlessness_path

    h = harmlessness_path(Path(out))
    return h.with_name(h.name.replace(".harmlessness.json", ".detector.json"))


def baseline_harmlessness(method: str, original: SegmentationModel, watermarked: SegmentationModel,
                          key: WatermarkKey, images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """The StealthMark harmlessness figures on clean held-out slices, plus what the trigger does: for
    ``badnets`` the triggered slices' Dice against their real labels and IoU with the target, for
    ``reference`` the argmax flip rate on triggered slices."""
    from .workflows import harmlessness

    out = {"method": method, **harmlessness(original, watermarked, images, labels)}
    _, h, w = images.shape
    c = original.in_channels
    if method == "badnets":
        trig = BadNetsTrigger(key, h, w, c)
        tx = trig.apply(images)
        po, pw = original.probabilities(tx).cpu().numpy(), watermarked.probabilities(tx).cpu().numpy()
        dice = [float(np.mean([dice_iou(p.argmax(0) > 0, lab > 0)[0] for p, lab in zip(pp, labels)])) for pp in (po, pw)]
        out["triggered"] = {"dice_original": dice[0], "dice_watermarked": dice[1],
                            "iou_with_target_original": float(target_iou(po, trig.target).mean()),
                            "iou_with_target_watermarked": float(target_iou(pw, trig.target).mean())}
    else:
        tx, _ = ReferenceTrigger(key, h, w, c).apply(images)
        out["flip_rate_triggered"] = flip_rate(original.probabilities(tx).cpu().numpy(),
                                               watermarked.probabilities(tx).cpu().numpy())
    return out


def run_embed(method: str, model_path: str | Path, data: str | Path, key_path: str | Path, out: str | Path, *,
              labels: str | Path | None = None, label: int | str | None = None, spec: str | Path | None = None,
              steps: int = 600, device: str = "auto", logits: bool = False,
              image_size: tuple[int, int] | None = None, config: BaselineConfig | None = None,
              progress: Progress | None = None) -> BaselineEmbedResult:
    """``stealthmark embed --method reference|badnets``: write OUT in the input's format, the harmlessness
    JSON beside it, and for ``reference`` the detector JSON (:func:`detector_path`)."""
    from .data import load_dataset
    from .models import is_torchscript, load_model, save_model
    from .workflows import harmlessness_path, model_intensity, model_size

    _check_baseline(method)
    progress = progress or Progress()
    out = Path(out)
    inputs = [model_path, key_path, data, labels, spec]
    refuse_overwriting_inputs(out, inputs)
    if method == "reference":
        refuse_overwriting_inputs(detector_path(out), inputs)
    key = load_key(key_path)
    model = load_model(model_path, spec=spec, device=device, logits=logits)
    size = model_size(model, image_size)
    if method == "reference":
        check_fits(size[0], size[1], key.grid)     # its verification occludes the key's QR cells
    intensity = model_intensity(model)
    ds = load_dataset(data, size, labels=labels, label=label, intensity=intensity)
    progress.log(f"{ds.describe()}; method {method}; device {describe_device(model.device)}")
    cfg = replace(config or BaselineConfig(), steps=int(steps))
    module, log, detector = embed_baseline(method, model, key, *ds.train, cfg, progress)
    wm = SegmentationModel(module, model.spec, device=model.device, logits=model.logits)
    harm = baseline_harmlessness(method, model, wm, key, *ds.test)
    meta = dict(model.spec.metadata)
    meta["stealthmark"] = {"method": method, "key_commitment": key.commitment,
                           "embedded": datetime.now(timezone.utc).isoformat(), "training": log.to_json(),
                           "data": ds.describe()}
    new_spec = replace(model.spec, metadata=meta, image_size=list(size), intensity=intensity.to_json())
    fmt = "torchscript" if is_torchscript(model_path) else "state_dict"
    save_model(wm, out, new_spec, fmt=fmt, refuse=inputs)
    hpath = harmlessness_path(out)
    write_text_atomic(hpath, json.dumps(harm, indent=2) + "\n")
    dpath = None
    if detector is not None:
        dpath = str(detector.save(detector_path(out)))
    return BaselineEmbedResult(method=method, model=str(out), format=fmt, harmlessness_file=str(hpath),
                               harmlessness=harm, log=log.to_json(), key_commitment=key.commitment,
                               device=describe_device(model.device), detector_file=dpath)


def verification_images(size: tuple[int, int], key: WatermarkKey, *, image: str | Path | None = None,
                        volume: str | Path | None = None, slices: str | None = None, n_slices: int = 4
                        ) -> tuple[np.ndarray, list[int], str]:
    """Clean (n, H, W) images in model input space from a volume / DICOM folder (chosen slices) or a 2-D
    image, with the slice indices and the source path."""
    from .volume import extract_slices, parse_slice_spec, read_volume, resize_slices
    from .workflows import VERIFY_INTENSITY, auto_slices, read_single_image

    idx: list[int] = []
    if volume is not None:
        vol = read_volume(volume)
        idx = auto_slices(vol, n_slices) if slices in (None, "auto") else parse_slice_spec(slices, vol.shape[0])
        unit, src = extract_slices(VERIFY_INTENSITY.apply(vol.array), idx), volume
    elif image is not None:
        unit, src = VERIFY_INTENSITY.apply(read_single_image(image)), image
    else:
        raise InputError("baseline verification needs images to put the trigger on: give --volume, --dicom or "
                         "--image (there is no key image for the baselines)")
    if unit.shape[1:] != tuple(size):
        unit = np.clip(resize_slices(unit, tuple(size)), 0.0, 1.0)
    lo, hi = key.value_range
    return (lo + (hi - lo) * unit).astype(np.float32), idx, str(src)


def run_verify(method: str, model_path: str | Path, key_path: str | Path, out_dir: str | Path, *,
               image: str | Path | None = None, volume: str | Path | None = None, dicom: str | Path | None = None,
               slices: str | None = None, n_slices: int = 4, detector: str | Path | None = None,
               device: str = "auto", logits: bool = False, batch_size: int = 64,
               image_size: tuple[int, int] | None = None, progress: Progress | None = None
               ) -> BaselineVerification:
    """``stealthmark verify --method reference|badnets``: write report.json (and for ``reference`` qr.png,
    the occlusion picture) into ``out_dir``, atomically."""
    from .models import load_model
    from .report import png_bytes
    from .workflows import model_size

    _check_baseline(method)
    given = [x for x in (image, volume, dicom) if x is not None]
    if len(given) > 1:
        raise InputError("give at most one of --image, --volume and --dicom")
    if method == "badnets" and detector is not None:
        raise InputError("--detector is only used by --method reference")
    if method == "reference" and detector is None:
        raise InputError("--method reference needs --detector, the <model>.detector.json written by "
                         "'stealthmark embed --method reference'")
    out_dir = Path(out_dir)
    refuse_overwriting_inputs(out_dir, [model_path, key_path, detector, *given])
    key = load_key(key_path)
    det = ReferenceDetector.load(detector) if detector is not None else None
    model = load_model(model_path, device=device, logits=logits, max_batch=batch_size)
    size = model_size(model, image_size)
    imgs, idx, src = verification_images(size, key, image=image, volume=volume if volume is not None else dicom,
                                         slices=slices, n_slices=n_slices)
    v = verify_baseline(method, model, key, imgs, detector=det, progress=progress)
    v.report.slices, v.report.source, v.report.model = idx or None, src, str(model_path)
    with atomic_dir(out_dir) as tmp:
        write_text_atomic(tmp / "report.json", json.dumps(v.report.to_json(), indent=2) + "\n")
        if v.explanation is not None:
            write_bytes_atomic(tmp / "qr.png", png_bytes(render(v.explanation.picture, px_per_module=8, quiet_zone=4)))
    return v


def run_from_args(args: Any, progress: Progress, label: int | str | None, image_size: tuple[int, int] | None
                  ) -> tuple[dict[str, Any], str, int]:
    """The CLI's ``embed``/``verify`` with ``--method reference|badnets``: (JSON result, text, exit code)."""
    if args.command == "embed":
        r = run_embed(args.method, args.model, args.data, args.key, args.out, labels=args.labels, label=label,
                      spec=args.spec, steps=args.steps, device=args.device, logits=args.logits,
                      image_size=image_size, progress=progress)
        h = r.harmlessness
        extra = f" and {r.detector_file}" if r.detector_file else ""
        return (r.to_json(), f"wrote {r.model} ({r.format}), {r.harmlessness_file}{extra}\n[{r.method}] held-out "
                f"Dice {h['original']['dice']:.4f} -> {h['watermarked']['dice']:.4f} (drop {h['dice_drop_points']:.2f} "
                f"points), flip rate {h['flip_rate_clean']:.3%}\ndevice {r.device}; {r.log['seconds']:.0f} s", 0)
    unused = [o for o, val in (("--samples", args.samples), ("--seed", args.seed), ("--strength", args.strength))
              if val is not None]
    if unused:
        raise InputError(f"{', '.join(unused)} apply to --method stealthmark only, not {args.method}")
    v = run_verify(args.method, args.model, args.key, args.out, image=args.image, volume=args.volume,
                   dicom=args.dicom, slices=args.slices, n_slices=args.n_slices, detector=args.detector,
                   device=args.device, logits=args.logits, batch_size=args.batch_size, image_size=image_size,
                   progress=progress)
    files = {"report_json": str(Path(args.out) / "report.json")}
    if v.explanation is not None:
        files["qr"] = str(Path(args.out) / "qr.png")
    return ({**v.report.to_json(), "files": files},
            f"{v.report.summary}\ndevice {v.report.device}; report in {args.out}", 0)
