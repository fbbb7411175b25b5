"""Tests for StealthMarkLib.metrics: Dice/IoU, HD95 and surface Dice (against MONAI), pixel AUC (against
scikit-learn), calibration, and the per-image aggregation of score_segmentation."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from StealthMarkLib.metrics import (
    SegmentationScores,
    dice_iou,
    dice_over_thresholds,
    ece,
    flip_rate,
    hd95_and_surface_dice,
    pixel_auc,
    score_segmentation,
)


def _square(r0, r1, c0, c1, shape=(64, 64)):
    m = np.zeros(shape, bool)
    m[r0:r1, c0:c1] = True
    return m


def _probs_from_masks(masks, p_fg=0.9):
    """(n, H, W) bool masks -> (n, 2, H, W) probabilities with foreground p_fg on the mask, 1 - p_fg off it."""
    fg = np.where(masks, p_fg, 1 - p_fg)
    return np.stack([1 - fg, fg], axis=1)


# -- Dice / IoU --------------------------------------------------------------------------------------------
def test_dice_iou_edge_cases():
    empty = np.zeros((8, 8), bool)
    assert dice_iou(empty, empty) == (1.0, 1.0)
    a, b = _square(0, 4, 0, 4, (8, 8)), _square(4, 8, 4, 8, (8, 8))
    assert dice_iou(a, b) == (0.0, 0.0)
    assert dice_iou(a, empty) == (0.0, 0.0)
    assert dice_iou(a, a) == (1.0, 1.0)


def test_dice_iou_known_values():
    a = _square(0, 10, 0, 10)        # 100 px
    b = _square(0, 10, 5, 15)        # 100 px, 50 shared
    d, j = dice_iou(a, b)
    assert d == pytest.approx(2 * 50 / 200) and j == pytest.approx(50 / 150)
    c = _square(0, 10, 0, 5)         # 50 px inside a
    d, j = dice_iou(c, a)
    assert d == pytest.approx(100 / 150) and j == pytest.approx(0.5)
    # Dice = 2 IoU / (1 + IoU)
    assert d == pytest.approx(2 * j / (1 + j))


def test_dice_iou_integer_masks():
    a, b = _square(0, 10, 0, 10), _square(0, 10, 5, 15)
    expected = dice_iou(a, b)
    assert dice_iou(a.astype(np.uint8) * 255, b.astype(np.uint8) * 255) == expected
    assert dice_iou(a.astype(int), b.astype(int)) == expected


# -- HD95 / surface Dice -----------------------------------------------------------------------------------
def _monai(pred, truth, tol):
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    def onehot(m):
        return torch.from_numpy(np.stack([~m, m]))[None].float()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        h = compute_hausdorff_distance(onehot(pred), onehot(truth), include_background=False, percentile=95)
        s = compute_surface_dice(onehot(pred), onehot(truth), class_thresholds=[tol], include_background=False)
    return float(h), float(s)


@pytest.mark.parametrize("shift", [1, 3, 6])
def test_hd95_shifted_squares(shift):
    a = _square(10, 30, 10, 30)
    b = _square(10, 30, 10 + shift, 30 + shift)
    h, s = hd95_and_surface_dice(a, b)
    # the left and right edges are `shift` apart; nothing is farther
    assert h == pytest.approx(shift)
    assert h == hd95_and_surface_dice(b, a)[0]  # symmetric
    if shift == 1:
        assert s == pytest.approx(1.0)  # every surface pixel within 1 px of the other surface
    else:
        assert 0.0 < s < 1.0


def _brute_force(pred, truth, tol):
    """Surface pixels (a 4-neighbour outside the mask) and all pairwise distances, by brute force."""
    from scipy.spatial.distance import cdist

    def surface(m):
        p = np.pad(m, 1)
        inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
        return np.argwhere(m & ~inner)

    d = cdist(surface(pred), surface(truth))
    d_pt, d_tp = d.min(1), d.min(0)
    hd95 = max(np.percentile(d_pt, 95), np.percentile(d_tp, 95))
    sd = ((d_pt <= tol).sum() + (d_tp <= tol).sum()) / (len(d_pt) + len(d_tp))
    return hd95, sd


@pytest.mark.parametrize("dr, dc", [(4, 3), (-5, 2), (0, 7)])
def test_hd95_matches_brute_force(dr, dc):
    a = _square(10, 30, 10, 30)
    b = _square(10 + dr + 5, 30 + dr + 5, 10 + dc, 36 + dc)
    for tol in (1.0, 2.5):
        assert hd95_and_surface_dice(a, b, tolerance=tol) == pytest.approx(_brute_force(a, b, tol))


@pytest.mark.parametrize("pred, truth, tol", [
    (_square(10, 30, 10, 30), _square(10, 30, 13, 33), 1.0),
    (_square(10, 30, 10, 30), _square(10, 30, 13, 33), 2.0),
    (_square(10, 30, 10, 30), _square(20, 40, 25, 50), 1.0),
    (_square(5, 50, 5, 20), _square(10, 40, 8, 30), 3.0),
])
def test_hd95_and_surface_dice_match_monai(pred, truth, tol):
    ours = hd95_and_surface_dice(pred, truth, tolerance=tol)
    ref = _monai(pred, truth, tol)
    assert ours == pytest.approx(ref, rel=1e-5)


def test_hd95_empty_masks():
    empty = np.zeros((32, 32), bool)
    some = _square(4, 8, 4, 8, (32, 32))
    assert hd95_and_surface_dice(empty, empty) == (0.0, 1.0)
    for p, t in ((empty, some), (some, empty)):
        h, s = hd95_and_surface_dice(p, t)
        assert np.isnan(h) and s == 0.0
    assert hd95_and_surface_dice(some, some) == (0.0, 1.0)


def test_hd95_integer_masks():
    a, b = _square(10, 30, 10, 30), _square(10, 30, 13, 33)
    assert hd95_and_surface_dice(a.astype(np.uint8), b.astype(np.uint8)) == hd95_and_surface_dice(a, b)


# -- AUC and calibration -----------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_pixel_auc_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    truth = rng.random((3, 32, 32)) < 0.3
    scores = np.clip(0.3 * truth + rng.normal(0.4, 0.2, truth.shape), 0, 1)
    scores = np.round(scores, 2)  # plenty of ties
    assert pixel_auc(scores, truth) == pytest.approx(roc_auc_score(truth.ravel(), scores.ravel()), abs=1e-12)


def test_pixel_auc_edge_cases():
    t = np.array([0, 0, 1, 1], bool)
    assert pixel_auc(np.array([0.1, 0.2, 0.8, 0.9]), t) == 1.0
    assert pixel_auc(np.array([0.9, 0.8, 0.2, 0.1]), t) == 0.0
    assert pixel_auc(np.full(4, 0.5), t) == 0.5
    assert np.isnan(pixel_auc(np.random.rand(4), np.zeros(4, bool)))
    assert np.isnan(pixel_auc(np.random.rand(4), np.ones(4, bool)))


def test_ece_perfectly_calibrated():
    # exact: in each bin, the fraction of positives equals the confidence
    scores, truth = [], []
    for p, n_pos in ((0.1, 10), (0.3, 30), (0.5, 50), (0.9, 90)):
        scores += [p] * 100
        truth += [1] * n_pos + [0] * (100 - n_pos)
    assert ece(np.array(scores), np.array(truth)) == pytest.approx(0.0, abs=1e-12)
    assert ece(np.array(scores), np.array(truth, np.uint8) * 255) == pytest.approx(0.0, abs=1e-12)  # 0/255 labels
    # sampled: labels drawn with the scores as probabilities
    rng = np.random.default_rng(0)
    s = rng.random(200_000)
    t = rng.random(s.shape) < s
    assert ece(s, t) < 0.01


def test_ece_overconfident():
    rng = np.random.default_rng(1)
    s = rng.random(100_000)
    t = rng.random(s.shape) < s
    over = np.where(s > 0.5, 1.0, 0.0) * 0.999  # sharpened: claims near-certainty
    e = ece(over, t)
    assert e > 0.2
    assert ece(np.full(4, 0.99), np.array([1, 0, 1, 0])) == pytest.approx(0.49)
    # bins: scores of exactly 1.0 fall in the last bin rather than off the end
    assert ece(np.array([1.0, 1.0]), np.array([1, 1])) == 0.0


# -- aggregate scores --------------------------------------------------------------------------------------
def test_score_segmentation_per_image():
    truth = np.stack([_square(10, 30, 10, 30), _square(10, 30, 10, 30), np.zeros((64, 64), bool)])
    pred = np.stack([_square(10, 30, 10, 30), _square(10, 30, 13, 33), np.zeros((64, 64), bool)])
    probs = _probs_from_masks(pred)
    assert probs.shape == (3, 2, 64, 64)
    s = score_segmentation(probs, truth.astype(np.int64))
    assert isinstance(s, SegmentationScores) and s.n_images == 3
    d1, j1 = dice_iou(pred[1], truth[1])
    assert s.dice == pytest.approx((1.0 + d1 + 1.0) / 3)
    assert s.iou == pytest.approx((1.0 + j1 + 1.0) / 3)
    h1, sd1 = hd95_and_surface_dice(pred[1], truth[1])
    assert s.hd95 == pytest.approx((0.0 + h1 + 0.0) / 3)
    assert s.surface_dice == pytest.approx((1.0 + sd1 + 1.0) / 3)
    fg = probs[:, 1]
    assert s.auc == pytest.approx(roc_auc_score(truth.ravel(), fg.ravel()))
    assert s.ece == pytest.approx(ece(fg, truth))
    assert s.brier == pytest.approx(np.mean((fg - truth) ** 2))
    assert set(s.to_json()) == {"dice", "iou", "hd95", "surface_dice", "auc", "ece", "brier", "n_images",
                                "per_class"}
    assert s.per_class == {"1": {"dice": s.dice, "iou": s.iou, "hd95": s.hd95, "surface_dice": s.surface_dice}}


def test_score_segmentation_empty_prediction_scores_zero():
    # per image, never per column: an empty prediction of a real structure has Dice 0
    truth = _square(20, 40, 20, 40)[None]
    probs = _probs_from_masks(np.zeros_like(truth), p_fg=0.9)
    s = score_segmentation(probs, truth)
    assert s.dice == 0.0 and s.iou == 0.0 and s.surface_dice == 0.0
    assert np.isnan(s.hd95)
    # a NaN distance of one image does not hide the others'
    truth2 = np.concatenate([truth, truth])
    pred2 = np.concatenate([np.zeros_like(truth), truth])
    s2 = score_segmentation(_probs_from_masks(pred2), truth2)
    assert s2.hd95 == 0.0 and s2.dice == pytest.approx(0.5)


def test_score_segmentation_multiclass():
    labels = np.zeros((2, 32, 32), np.int64)
    labels[:, 4:12, 4:12] = 1
    labels[:, 20:28, 20:28] = 2
    probs = np.full((2, 3, 32, 32), 0.05)
    for c in range(3):
        probs[:, c][labels == c] = 0.9
    s = score_segmentation(probs, labels)
    assert s.dice == 1.0 and s.iou == 1.0 and s.hd95 == 0.0 and s.surface_dice == 1.0
    assert s.auc == 1.0  # "any foreground" = 1 - p(background)


def test_flip_rate():
    a = _probs_from_masks(np.stack([_square(0, 8, 0, 8, (16, 16))]))
    assert flip_rate(a, a) == 0.0
    b = _probs_from_masks(np.stack([_square(0, 8, 0, 4, (16, 16))]))
    assert flip_rate(a, b) == pytest.approx(32 / 256)
    # probabilities that move without crossing the decision do not flip
    c = _probs_from_masks(np.stack([_square(0, 8, 0, 8, (16, 16))]), p_fg=0.55)
    assert flip_rate(a, c) == 0.0


def test_dice_over_thresholds():
    truth = np.stack([_square(0, 16, 0, 16, (32, 32))])
    fg = np.where(truth, 0.75, 0.0)
    fg[0, 16:32, 0:16] = 0.35  # false-positive block above thresholds < 0.35
    probs = np.stack([1 - fg, fg], axis=1)
    d = dice_over_thresholds(probs, truth)
    assert list(d) == ["0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9"]
    for t in ("0.1", "0.2", "0.3"):
        assert d[t] == pytest.approx(2 * 256 / (512 + 256))
    for t in ("0.4", "0.5", "0.6", "0.7"):
        assert d[t] == 1.0
    for t in ("0.8", "0.9"):
        assert d[t] == 0.0
    assert dice_over_thresholds(probs, truth, thresholds=(0.5,)) == {"0.5": 1.0}
