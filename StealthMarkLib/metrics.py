"""Harmlessness measures (METHOD.md section 8), computed per image and then averaged (never per column).

All functions take numpy arrays: ``probs`` (n, K, H, W) class probabilities, ``labels`` (n, H, W) integers.
For binary models the foreground is class 1; for K > 2 the figures are averaged over classes 1..K-1
(each image and class one term), and :attr:`SegmentationScores.per_class` gives them class by class.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


def dice_iou(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two boolean masks; both empty counts as a perfect 1.0."""
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)  # a 0/255 mask is a mask too
    inter = np.logical_and(pred, truth).sum()
    total = pred.sum() + truth.sum()
    union = np.logical_or(pred, truth).sum()
    if total == 0:
        return 1.0, 1.0
    return float(2 * inter / total), float(inter / union)


def _surface(mask: np.ndarray) -> np.ndarray:
    from scipy.ndimage import binary_erosion

    return mask & ~binary_erosion(mask, border_value=0)


def hd95_and_surface_dice(pred: np.ndarray, truth: np.ndarray, tolerance: float = 1.0
                          ) -> tuple[float, float]:
    """95th-percentile symmetric Hausdorff distance (pixels) and surface Dice at ``tolerance`` pixels.

    NaN when either mask is empty (the distance is undefined), except both empty: (0, 1).
    """
    from scipy.ndimage import distance_transform_edt

    # integer masks would turn `~` into a bitwise not and the surface masks into fancy indices
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if not pred.any() and not truth.any():
        return 0.0, 1.0
    if not pred.any() or not truth.any():
        return float("nan"), 0.0
    sp, st = _surface(pred), _surface(truth)
    d_to_truth = distance_transform_edt(~st)[sp]
    d_to_pred = distance_transform_edt(~sp)[st]
    hd95 = float(max(np.percentile(d_to_truth, 95), np.percentile(d_to_pred, 95)))
    sd = float(((d_to_truth <= tolerance).sum() + (d_to_pred <= tolerance).sum()) / (len(d_to_truth) + len(d_to_pred)))
    return hd95, sd


def pixel_auc(scores: np.ndarray, truth: np.ndarray) -> float:
    """ROC-AUC over all pixels pooled (Mann-Whitney with ties), NaN when one class is absent."""
    from scipy.stats import rankdata

    s, t = scores.ravel().astype(np.float64), truth.ravel().astype(bool)
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[t].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def ece(scores: np.ndarray, truth: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error of foreground probabilities, equal-width bins, pooled pixels."""
    s, t = scores.ravel(), truth.ravel().astype(bool).astype(np.float64)
    which = np.minimum((s * bins).astype(int), bins - 1)
    count = np.bincount(which, minlength=bins)
    conf = np.bincount(which, weights=s, minlength=bins)
    acc = np.bincount(which, weights=t, minlength=bins)
    nz = count > 0
    return float(np.abs(conf[nz] - acc[nz]).sum() / len(s))


@dataclass
class SegmentationScores:
    dice: float
    iou: float
    hd95: float
    surface_dice: float
    auc: float
    ece: float
    brier: float
    n_images: int
    per_class: dict = field(default_factory=dict)   # {"1": {"dice", "iou", "hd95", "surface_dice"}, ...}

    def to_json(self) -> dict:
        return asdict(self)


def score_segmentation(probs: np.ndarray, labels: np.ndarray) -> SegmentationScores:
    """Per-image Dice/IoU/HD95/surface Dice averaged over images; AUC/ECE/Brier over pooled pixels."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    k = probs.shape[1]
    pred = probs.argmax(1)
    per = {"dice": [], "iou": [], "hd95": [], "sd": []}
    per_class = {}
    for c in range(1, k):
        cls = {"dice": [], "iou": [], "hd95": [], "sd": []}
        for i in range(len(probs)):
            d, j = dice_iou(pred[i] == c, labels[i] == c)
            h, s = hd95_and_surface_dice(pred[i] == c, labels[i] == c)
            for name, v in (("dice", d), ("iou", j), ("hd95", h), ("sd", s)):
                per[name].append(v), cls[name].append(v)
        per_class[str(c)] = {"dice": float(np.mean(cls["dice"])), "iou": float(np.mean(cls["iou"])),
                             "hd95": _nanmean(cls["hd95"]), "surface_dice": float(np.mean(cls["sd"]))}
    fg = 1.0 - probs[:, 0]                 # probability of "any foreground"
    truth = labels > 0
    return SegmentationScores(
        dice=float(np.mean(per["dice"])), iou=float(np.mean(per["iou"])),
        hd95=_nanmean(per["hd95"]),
        surface_dice=float(np.mean(per["sd"])), auc=pixel_auc(fg, truth), ece=ece(fg, truth),
        brier=float(np.mean((fg - truth) ** 2)), n_images=len(probs), per_class=per_class,
    )


def _nanmean(values: list[float]) -> float:
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def flip_rate(probs_a: np.ndarray, probs_b: np.ndarray) -> float:
    """Fraction of pixels whose argmax class differs between two models' outputs."""
    return float(np.mean(np.asarray(probs_a).argmax(1) != np.asarray(probs_b).argmax(1)))


def flip_rate_per_class(probs_a: np.ndarray, probs_b: np.ndarray) -> dict[str, float | None]:
    """For each class c, the fraction of the pixels that ``probs_a`` gives to c whose argmax changes in
    ``probs_b`` (None where ``probs_a`` gives c no pixel): is the argmax of every class preserved?"""
    a, b = np.asarray(probs_a).argmax(1), np.asarray(probs_b).argmax(1)
    out: dict[str, float | None] = {}
    for c in range(np.asarray(probs_a).shape[1]):
        sel = a == c
        out[str(c)] = float(np.mean(b[sel] != c)) if sel.any() else None
    return out


def dice_over_thresholds(probs: np.ndarray, labels: np.ndarray,
                         thresholds: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
                         ) -> dict[str, float]:
    """Mean per-image Dice of ``foreground probability > t`` for each threshold t."""
    fg = 1.0 - np.asarray(probs)[:, 0]
    truth = np.asarray(labels) > 0
    return {f"{t:.1f}": float(np.mean([dice_iou(fg[i] > t, truth[i])[0] for i in range(len(fg))]))
            for t in thresholds}
