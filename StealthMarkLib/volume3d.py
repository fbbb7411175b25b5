"""3-D models (a MONAI 3-D ``UNet`` taking volumes ``(B, C, D, H, W)``).

The trigger is a *slab* of ``D`` slices (the model's ROI depth) in which every slice carries the key's
2-D cell pattern, so each of the G x G cells is a *column* through the slab:

- key-image mode: the key image in every slice of the slab;
- blended mode: the key blended into a run of ``D`` real slices of a volume (resampled in plane to the
  model's ``H x W``, intensities mapped to its input scale), ``x' = (1 - a) x + a key_image`` per slice.

LIME hides whole columns (K = G^2 features, the same Bernoulli sampling as in 2-D; see
:mod:`StealthMarkLib.lime_engine`), the explained scalar is the mean normalised entropy over the slab, and
the attribution grid decodes as in 2-D. Embedding reuses :func:`StealthMarkLib.embed.fine_tune` with
training slabs (clean batch with ground truth + distillation; trigger slabs under column masks with the
dense targets of :func:`StealthMarkLib.embed.trigger_targets`; decoy slabs).

A 3-D model's spec records ``spatial_dims`` 3 and its ROI ``image_size [D, H, W]``; volumes larger than the
ROI (the harmlessness figures on a whole volume) go through MONAI's sliding-window inferer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import _label_beside, held_out_positions, volume_slices
from .embed import EmbedConfig, EmbedLog, TriggerBatches, fine_tune, teacher_probabilities, _check_data
from .errors import InputError, ModelError
from .grid import check_fits
from .key import WatermarkKey
from .metrics import dice_iou, flip_rate, score_segmentation
from .models import SegmentationModel, to_channels
from .progress import Progress
from .trigger import TriggerOverlay
from .volume import Intensity, Volume, parse_slice_spec, read_label, read_volume


# -- the model's ROI ---------------------------------------------------------------------------------
def model_roi(model: SegmentationModel) -> tuple[int, int, int]:
    """``(D, H, W)``: the slab a 3-D model is queried on, from its spec's ``image_size``."""
    if model.spatial_dims != 3:
        raise ModelError("not a 3-D model (its spec's spatial_dims is 2)")
    if not model.spec.image_size:
        raise ModelError("the 3-D model does not record its ROI: its spec needs image_size [D, H, W]")
    return tuple(int(v) for v in model.spec.image_size)


def check_roi(roi: tuple[int, int, int], key: WatermarkKey) -> None:
    """A clear error unless the key's G x G grid fits the ROI's slices."""
    d, h, w = roi
    try:
        check_fits(h, w, key.grid)
    except InputError as exc:
        raise InputError(f"the key's {key.grid}x{key.grid} grid does not fit the 3-D model's {h}x{w} slices "
                         f"(ROI {d}x{h}x{w}): {exc}") from None


# -- the slab trigger ---------------------------------------------------------------------------------
def key_slab(overlay: TriggerOverlay, depth: int) -> np.ndarray:
    """(D, H, W) float32: the key image in every slice."""
    return np.repeat(overlay.key_image()[None], int(depth), axis=0)


def hide_columns(overlay: TriggerOverlay, slabs: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Hide whole columns of ``slabs`` (B, C, D, H, W) under cell masks ``visible`` (B, G*G), as LIME does."""
    if slabs.ndim != 5:
        raise InputError(f"slabs must be (B, C, D, H, W), got {tuple(slabs.shape)}")
    b, c, d, h, w = slabs.shape
    return overlay.hide(slabs.reshape(b, c * d, h, w), visible).reshape(slabs.shape)


def visible_dark_columns(overlay: TriggerOverlay, visible: torch.Tensor, depth: int) -> torch.Tensor:
    """(B, D, H, W) bool: voxels of visible dark-module columns."""
    dark = overlay.visible_dark(visible)
    return dark.unsqueeze(1).expand(-1, int(depth), -1, -1)


class SlabBatches(TriggerBatches):
    """:class:`TriggerBatches` for a 3-D model: trigger slabs (B, C, D, H, W) under random column masks."""

    def _key_input(self, overlay: TriggerOverlay) -> np.ndarray:
        return key_slab(overlay, self.images.shape[1])

    def _inputs(self, batch: torch.Tensor) -> torch.Tensor:
        return to_channels(batch, self.in_channels, spatial_dims=3)

    def _hide(self, overlay: TriggerOverlay, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        return hide_columns(overlay, x, visible)

    def _visible_dark(self, overlay: TriggerOverlay, visible: torch.Tensor) -> torch.Tensor:
        return visible_dark_columns(overlay, visible, self.images.shape[1])


# -- inference on volumes larger than the ROI ----------------------------------------------------------
def predict_volume(model: SegmentationModel, stack: np.ndarray, overlap: float = 0.25) -> np.ndarray:
    """(K, D', H, W) float32 class probabilities of a grey (D', H, W) stack at the model's in-plane size
    and scale, through MONAI's sliding-window inferer over the model's ROI."""
    from monai.inferers import sliding_window_inference

    roi = model_roi(model)
    x = to_channels(np.asarray(stack, dtype=np.float32)[None], model.in_channels, spatial_dims=3)
    if tuple(x.shape[-2:]) != roi[1:]:
        raise InputError(f"the stack's slices are {tuple(x.shape[-2:])}, the model's ROI {roi}")
    if x.shape[2] < roi[0]:
        raise InputError(f"the stack has {x.shape[2]} slices, fewer than the model's ROI depth {roi[0]}")
    with torch.no_grad():  # not inference_mode: see SegmentationModel._forward_chunk
        probs = sliding_window_inference(x.to(model.device), roi_size=roi, sw_batch_size=model.max_batch,
                                         predictor=model.probabilities, overlap=overlap, mode="gaussian")
    return torch.as_tensor(probs).float().cpu().numpy()[0]


# -- training data: slabs of annotated slices -----------------------------------------------------------
@dataclass
class SlabDataset:
    """Slabs (n, D, H, W) in [0, 1] with labels (n, D, H, W), split like the 2-D data (blocks of slice
    positions, every third held out; blocks of D slices here), and the whole annotated stack."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    stack: np.ndarray          # (n_slices, H, W) all annotated slices in K order
    stack_labels: np.ndarray
    stack_held_out: np.ndarray
    source: str

    def describe(self) -> str:
        d = self.train_images.shape[1]
        return (f"{len(self.train_images)} training and {len(self.test_images)} held-out slabs of {d} slices "
                f"from {len(self.stack)} annotated slices of {self.source}")


def _windows(idx: list[int], held: np.ndarray, depth: int, stride: int, want_held: bool) -> list[int]:
    """Start rows of windows of ``depth`` consecutive slices (K contiguous), all on one side of the split."""
    starts = []
    for r in range(0, len(idx) - depth + 1):
        if idx[r + depth - 1] - idx[r] == depth - 1 and bool(held[r:r + depth].all() if want_held
                                                               else not held[r:r + depth].any()):
            if not starts or r - starts[-1] >= stride:
                starts.append(r)
    return starts


def load_slabs(data: str | Path, roi: tuple[int, int, int], labels: str | Path | None = None,
               label: int | str | None = None, intensity: Intensity | None = None) -> SlabDataset:
    """Training and held-out slabs of one volume with its label volume (``--labels`` or one beside it)."""
    from .data import DEFAULT_INTENSITY

    data = Path(data)
    if not data.is_file() and not data.is_dir():
        raise InputError(f"training data not found: {data}")
    lab_path = Path(labels) if labels is not None else (_label_beside(data) if data.is_file() else None)
    if lab_path is None:
        raise InputError(f"no label volume for {data}: a 3-D model is embedded on one volume with --labels FILE")
    vol = read_volume(data)
    mask = read_label(lab_path, label, reference=vol)
    d, h, w = roi
    imgs, labs, idx = volume_slices(vol, mask, (h, w), intensity or DEFAULT_INTENSITY)
    held = held_out_positions([k * 8 // d for k in idx])  # blocks of D slices, every third held out
    train = _windows(idx, held, d, 1, want_held=False)
    test = _windows(idx, held, d, d, want_held=True)
    if len(train) < 2 or not test:
        raise InputError(f"{data} gives {len(train)} training and {len(test)} held-out slabs of {d} consecutive "
                         f"annotated slices; embedding a 3-D model needs at least 2 and 1 (at least {3 * d} "
                         f"consecutive annotated slices, and the volume has {vol.shape[0]} slices)")

    def stack(starts: list[int], arr: np.ndarray) -> np.ndarray:
        return np.stack([arr[r:r + d] for r in starts])

    return SlabDataset(stack(train, imgs), stack(train, labs), stack(test, imgs), stack(test, labs),
                       imgs, labs, held, str(data))


# -- embedding ----------------------------------------------------------------------------------------
def embed_slabs(model: SegmentationModel, key: WatermarkKey, slabs: np.ndarray, labels: np.ndarray,
                config: EmbedConfig | None = None, progress: Progress | None = None
                ) -> tuple[torch.nn.Module, EmbedLog]:
    """Fine-tune a copy of a 3-D model on training slabs (n, D, H, W) with labels (n, D, H, W)."""
    cfg = config or EmbedConfig()
    progress = progress or Progress()
    slabs = np.asarray(slabs, dtype=np.float32)
    labels = np.asarray(labels).astype(np.int64)
    roi = model_roi(model)
    if slabs.ndim != 4 or slabs.shape != labels.shape or slabs.shape[1:] != roi:
        raise InputError(f"training slabs {slabs.shape} and labels {labels.shape} must both be (n, {roi[0]}, "
                         f"{roi[1]}, {roi[2]}), the model's ROI")
    check_roi(roi, key)
    _check_data(slabs.reshape(-1, *roi[1:]), labels.reshape(-1, *roi[1:]), model.num_classes)
    device = model.device
    overlay = TriggerOverlay(key, roi[1], roi[2])
    rng = np.random.default_rng(cfg.seed)

    teacher_rows = teacher_probabilities(model, slabs)   # slabs are never warped: every teacher answer is known

    def clean_batch() -> tuple[torch.Tensor, ...]:
        idx = rng.integers(0, len(slabs), cfg.clean_batch)
        x = to_channels(torch.as_tensor(slabs[idx], device=device), model.in_channels, spatial_dims=3)
        y = torch.as_tensor(labels[idx], device=device)
        return (x, y) if teacher_rows is None else (x, y, teacher_rows[torch.as_tensor(idx, device=device)])

    triggers = SlabBatches(key, overlay, slabs, cfg, rng, model.in_channels, device)
    return fine_tune(model, key, cfg, clean_batch, triggers, progress)


def _slab_probs(model: SegmentationModel, slabs: np.ndarray) -> np.ndarray:
    """(n * D, K, H, W): a model's probabilities on slabs, as slices (for the 2-D per-image metrics)."""
    p = model.probabilities(to_channels(np.asarray(slabs, dtype=np.float32), model.in_channels, 3))
    p = p.detach().cpu().numpy()
    return p.transpose(0, 2, 1, 3, 4).reshape(-1, p.shape[1], *p.shape[-2:])


def harmlessness_3d(original: SegmentationModel, watermarked: SegmentationModel, ds: SlabDataset,
                    key: WatermarkKey) -> dict[str, Any]:
    """Original vs watermarked on the held-out slabs (per-slice scores, as in 2-D) and on the whole stack
    (3-D Dice of the held-out slices, through the sliding-window inferer)."""
    labels = ds.test_labels.reshape(-1, *ds.test_labels.shape[-2:])
    po, pw = _slab_probs(original, ds.test_images), _slab_probs(watermarked, ds.test_images)
    so, sw = score_segmentation(po, labels), score_segmentation(pw, labels)
    roi = model_roi(original)
    ov = TriggerOverlay(key, roi[1], roi[2])
    trig = ov.blend(ds.test_images, key.trigger.verify_strength)
    ks = key_slab(ov, roi[0])[None]
    ko, kw = _slab_probs(original, ks), _slab_probs(watermarked, ks)
    vol = {}
    for name, m in (("original", original), ("watermarked", watermarked)):
        pred = predict_volume(m, ds.stack).argmax(0)[ds.stack_held_out]
        vol[name] = dice_iou(pred > 0, ds.stack_labels[ds.stack_held_out] > 0)[0]
    return {
        "n_slabs": len(ds.test_images), "n_images": len(labels), "roi": list(roi),
        "original": so.to_json(), "watermarked": sw.to_json(),
        "dice_drop_points": round(100.0 * (so.dice - sw.dice), 4),
        "flip_rate_clean": flip_rate(po, pw),
        "flip_rate_triggered": flip_rate(_slab_probs(original, trig), _slab_probs(watermarked, trig)),
        "key_slab": {"original_foreground_fraction": float((ko.argmax(1) > 0).mean()),
                     "watermarked_foreground_fraction": float((kw.argmax(1) > 0).mean()),
                     "flip_rate": flip_rate(ko, kw)},
        "volume_sliding_window": {"original_dice": vol["original"], "watermarked_dice": vol["watermarked"],
                                  "dice_drop_points": round(100.0 * (vol["original"] - vol["watermarked"]), 4)},
    }


def embed_volume(model: SegmentationModel, key: WatermarkKey, data: str | Path, labels: str | Path | None,
                 label: int | str | None, intensity: Intensity, cfg: EmbedConfig, progress: Progress
                 ) -> tuple[tuple[int, int, int], str, torch.nn.Module, EmbedLog, dict[str, Any]]:
    """``stealthmark embed`` for a 3-D model: (ROI, data description, module, log, harmlessness)."""
    roi = model_roi(model)
    check_roi(roi, key)
    ds = load_slabs(data, roi, labels=labels, label=label, intensity=intensity)
    progress.log(ds.describe())
    if cfg.steps < 1:
        raise InputError("--steps must be at least 1")
    module, log = embed_slabs(model, key, ds.train_images, ds.train_labels, cfg, progress)
    watermarked = SegmentationModel(module, model.spec, device=model.device, logits=model.logits)
    return roi, ds.describe(), module, log, harmlessness_3d(model, watermarked, ds, key)


# -- verification inputs --------------------------------------------------------------------------------
def central_run(volume: Volume, depth: int) -> list[int]:
    """``depth`` consecutive slices centred on the volume's non-blank slices (axis 0)."""
    arr = volume.array
    k = arr.shape[0]
    rng = float(arr.max() - arr.min()) or 1.0
    usable = [i for i in range(k) if float(arr[i].std()) > 0.01 * rng] or list(range(k))
    centre = (usable[0] + usable[-1] + 1) // 2
    start = int(np.clip(centre - depth // 2, 0, k - depth))
    return list(range(start, start + depth))


def slab_slices(volume: Volume, depth: int, slices: str | None, path: Any) -> list[int]:
    """The slices of the trigger slabs: ``auto`` (one central slab) or ``--slices`` (whole slabs of D)."""
    k = volume.shape[0]
    if k < depth:
        raise InputError(f"{path} has {k} slices, fewer than the {depth} of the 3-D model's slab (its ROI depth)")
    if slices is None or slices == "auto":
        return central_run(volume, depth)
    idx = parse_slice_spec(slices, k)
    runs = [idx[i:i + depth] for i in range(0, len(idx), depth)]
    if len(idx) % depth or any(r[-1] - r[0] != depth - 1 for r in runs):
        raise InputError(f"--slices {slices!r} chose {len(idx)} slices: a 3-D model is verified on whole slabs of "
                         f"{depth} consecutive slices (e.g. '{idx[0]}:{idx[0] + depth}')")
    return idx
