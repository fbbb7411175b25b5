"""Tests for StealthMarkLib.lime_engine: equivalence with the real ``lime`` package on a real MONAI UNet,
the regression pieces against scikit-learn, and the engine's own behaviour (batching, seeds, progress,
cancellation, bad inputs, a planted signal)."""

from __future__ import annotations

import os

os.environ["TQDM_DISABLE"] = "1"  # lime's per-sample tqdm bar

import numpy as np
import pytest
import torch
from lime import lime_image
from monai.networks.nets import UNet
from sklearn.linear_model import Ridge
from sklearn.metrics import pairwise_distances

from StealthMarkLib.errors import Cancelled, InputError, ModelError
from StealthMarkLib.grid import cell_index, cell_means
from StealthMarkLib.lime_engine import (
    SCALARS,
    LimeAttribution,
    LimeExplainer,
    cosine_distances_to_first,
    lime_kernel,
    normalised_entropy,
    sample_masks,
    weighted_ridge,
)
from StealthMarkLib.progress import Progress

TOL = 1e-6  # max |ours - lime| relative to max |lime coefficient|


# -- fixtures ----------------------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def unet() -> torch.nn.Module:
    torch.manual_seed(0)
    net = UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2),
               num_res_units=1).eval()
    assert sum(p.numel() for p in net.parameters()) <= 100_000
    return net


@pytest.fixture(scope="module")
def query(unet):
    def q(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.softmax(unet(images), dim=1)

    return q


def grey_image(size: int, seed: int = 0) -> np.ndarray:
    """A smooth blob plus noise, float32 in [0, 1], so the UNet's uncertainty varies over the image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    blob = np.exp(-((yy - 0.45) ** 2 + (xx - 0.55) ** 2) / 0.05)
    return np.clip(0.7 * blob + 0.2 * rng.random((size, size)), 0, 1).astype(np.float32)


def entropy_numpy(probs: np.ndarray) -> np.ndarray:
    """Independent float64 reference of the normalised entropy, (B, K, H, W) -> (B,)."""
    p = probs.astype(np.float64)
    k = p.shape[1]
    return (-(p * np.log(np.maximum(p, np.finfo(np.float64).tiny))).sum(axis=1) / np.log(k)).mean(axis=(1, 2))


def lime_reference(query, image: np.ndarray, grid: int, hide, n: int, seed: int, batch: int):
    """Coefficients (G*G,), intercept and score from the real lime package, explaining the entropy."""
    h, w = image.shape

    def classifier_fn(rgb: np.ndarray) -> np.ndarray:
        # lime turns grey images into (B, H, W, 3); the model sees channel 0
        x = torch.from_numpy(rgb[..., 0].astype(np.float32))[:, None]
        s = entropy_numpy(query(x).numpy())
        return np.stack([1.0 - s, s], axis=1)

    explainer = lime_image.LimeImageExplainer(kernel_width=0.25, random_state=seed)
    # random_seed given -> lime does not draw a segmentation seed from random_state before the masks
    exp = explainer.explain_instance(
        image.astype(np.float64), classifier_fn, labels=(1,), top_labels=None, hide_color=hide,
        num_samples=n, batch_size=batch, segmentation_fn=lambda img: cell_index(h, w, grid),
        num_features=100000, random_seed=0,
    )
    coef = np.zeros(grid * grid)
    for feature, value in exp.local_exp[1]:
        coef[feature] = value
    return coef, float(exp.intercept[1]), float(exp.score)


# -- equivalence with lime ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "size,grid,hide",
    [(64, 8, 0.0), (64, 21, "mean"), (44, 21, 0.25), (44, 13, "mean")],
)
def test_matches_lime_package(query, size, grid, hide):
    image = grey_image(size, seed=grid)
    n, seed, batch = 250, 11 + grid, 50
    ref_coef, ref_icpt, ref_score = lime_reference(query, image, grid, None if hide == "mean" else hide,
                                                   n, seed, batch)
    att = LimeExplainer(query, grid, n_samples=n, hide_value=hide, batch_size=batch).attribute(image, seed)
    scale = np.abs(ref_coef).max()
    assert scale > 0
    assert att.coefficients.shape == (grid, grid)
    assert np.abs(att.coefficients.ravel() - ref_coef).max() / scale <= TOL
    assert abs(att.intercept - ref_icpt) / scale <= TOL
    assert abs(att.score - ref_score) <= TOL
    assert att.n_samples == n and att.responses.shape == (n,)
    assert 0 < att.seconds_queries <= att.seconds_total


def test_sample_masks_equal_lime_draw():
    n, k, seed = 37, 25, 4
    z = sample_masks(n, k, seed)
    assert z.dtype == np.uint8 and z.shape == (n, k)
    assert np.all(z[0] == 1) and set(np.unique(z)) <= {0, 1}
    image = np.zeros((10, 10, 3))
    segments = cell_index(10, 10, 5)
    data, _ = lime_image.LimeImageExplainer(random_state=seed).data_labels(
        image, image, segments, lambda b: np.zeros((len(b), 2)), n, batch_size=10)
    np.testing.assert_array_equal(z, data)


# -- regression pieces against scikit-learn ----------------------------------------------------------------
@pytest.mark.parametrize("n,k", [(120, 16), (40, 81)])  # primal and dual (K > N) regimes
def test_weighted_ridge_matches_sklearn(n, k):
    rng = np.random.default_rng(n)
    z = rng.integers(0, 2, (n, k)).astype(np.float64)
    y = z @ rng.normal(size=k) + 0.1 * rng.normal(size=n)
    w = rng.random(n) + 0.05
    fit = weighted_ridge(z, y, w, alpha=1.0)
    ref = Ridge(alpha=1.0, fit_intercept=True).fit(z, y, sample_weight=w)
    np.testing.assert_allclose(fit.coefficients, ref.coef_, rtol=0, atol=1e-10)
    assert fit.intercept == pytest.approx(ref.intercept_, abs=1e-10)
    assert fit.score == pytest.approx(ref.score(z, y, sample_weight=w), abs=1e-12)


@pytest.mark.parametrize("value", [0.25, 0.3])  # 0.3 leaves rounding residue: sklearn's quirks are kept
def test_weighted_ridge_constant_target(value):
    z = np.random.default_rng(0).integers(0, 2, (20, 4))
    y, w = np.full(20, value), np.ones(20)
    fit = weighted_ridge(z, y, w)
    ref = Ridge(alpha=1.0).fit(z, y, sample_weight=w)
    np.testing.assert_allclose(fit.coefficients, 0, atol=1e-15)
    assert fit.intercept == pytest.approx(value)
    assert fit.score == ref.score(z, y, sample_weight=w)


def test_distances_and_kernel_match_lime():
    z = sample_masks(50, 30, 1).astype(np.int64)
    z[7] = 0  # a row of zero norm
    ref = pairwise_distances(z, z[0].reshape(1, -1), metric="cosine").ravel()
    np.testing.assert_allclose(cosine_distances_to_first(z), ref, rtol=0, atol=1e-15)
    d = np.linspace(0, 1, 11)
    np.testing.assert_allclose(lime_kernel(d, 0.25), np.sqrt(np.exp(-(d**2) / 0.25**2)), rtol=1e-15)


# -- explained scalars -------------------------------------------------------------------------------------
def test_normalised_entropy_bounds():
    for k in (2, 3, 5):
        uniform = torch.full((2, k, 4, 4), 1.0 / k)
        np.testing.assert_allclose(normalised_entropy(uniform).numpy(), 1.0, atol=1e-6)
        onehot = torch.zeros(2, k, 4, 4)
        onehot[:, 1] = 1
        out = normalised_entropy(onehot)
        assert out.dtype == torch.float64 and out.shape == (2,)
        np.testing.assert_array_equal(out.numpy(), 0.0)
    p = torch.softmax(torch.randn(3, 4, 6, 6), 1)
    np.testing.assert_allclose(normalised_entropy(p).numpy(), entropy_numpy(p.numpy()), rtol=1e-12)
    # float64 input is not modified in place; inference tensors and autograd both work
    p64 = p.double()
    before = p64.clone()
    normalised_entropy(p64)
    assert torch.equal(p64, before)
    with torch.inference_mode():
        p_inf = p * 1
    np.testing.assert_allclose(normalised_entropy(p_inf).numpy(), entropy_numpy(p.numpy()), rtol=1e-12)
    logits = torch.randn(2, 2, 4, 4, requires_grad=True)
    normalised_entropy(torch.softmax(logits, 1)).sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_foreground_scalar_and_custom_scalars():
    p = torch.softmax(torch.randn(3, 3, 5, 5), 1)
    np.testing.assert_allclose(SCALARS["foreground"](p).numpy(), p[:, 1:].double().sum(1).mean((1, 2)).numpy(),
                               rtol=1e-12)
    image = grey_image(24)
    by_name = LimeExplainer(pixel_query, 4, n_samples=40, scalar="foreground").attribute(image, seed=1)
    as_numpy = LimeExplainer(pixel_query, 4, n_samples=40,
                             scalar=lambda q: q[:, 1].double().mean((1, 2)).numpy()).attribute(image, seed=1)
    np.testing.assert_allclose(by_name.responses, as_numpy.responses, rtol=1e-12)
    np.testing.assert_allclose(by_name.coefficients, as_numpy.coefficients, rtol=1e-9, atol=1e-15)


# -- engine behaviour --------------------------------------------------------------------------------------
def pixel_query(images: torch.Tensor) -> torch.Tensor:
    """A pure-torch stand-in model: foreground probability from a local average, one sample at a time
    (so its output does not depend on the batch size)."""

    def one(x: torch.Tensor) -> torch.Tensor:
        fg = torch.sigmoid(4 * (torch.nn.functional.avg_pool2d(x[:, :1], 3, 1, 1) - 0.5))
        return torch.cat([1 - fg, fg], 1)

    return torch.cat([one(images[i:i + 1]) for i in range(images.shape[0])])


def test_batching_invariance(query):
    image = grey_image(44, seed=3)
    # the engine adds no batch dependence: with a batch-independent model, results are identical
    a = LimeExplainer(pixel_query, 13, n_samples=100, batch_size=7).attribute(image, seed=5)
    b = LimeExplainer(pixel_query, 13, n_samples=100, batch_size=64).attribute(image, seed=5)
    np.testing.assert_array_equal(a.coefficients, b.coefficients)
    np.testing.assert_array_equal(a.responses, b.responses)
    # a real UNet's float32 kernels depend slightly on the batch size: equal to ~1e-9
    a = LimeExplainer(query, 8, n_samples=100, batch_size=7).attribute(image, seed=5)
    b = LimeExplainer(query, 8, n_samples=100, batch_size=64).attribute(image, seed=5)
    assert np.abs(a.coefficients - b.coefficients).max() / np.abs(b.coefficients).max() <= TOL


def test_seeds_reproducible_and_keep_masks():
    image = grey_image(42, seed=1)
    explainer = LimeExplainer(pixel_query, 7, n_samples=60, batch_size=32)
    a = explainer.attribute(image, seed=9, keep_masks=True)
    b = explainer.attribute(torch.from_numpy(image)[None], seed=9)
    c = explainer.attribute(image, seed=10)
    np.testing.assert_array_equal(a.coefficients, b.coefficients)
    assert not np.array_equal(a.coefficients, c.coefficients)
    assert b.masks is None
    np.testing.assert_array_equal(a.masks, sample_masks(60, 49, 9))
    assert set(a.to_dict()) >= {"coefficients", "intercept", "score", "responses", "n_samples"}
    many = explainer.attribute_many([image, image], seeds=[9, 10])
    assert isinstance(many[0], LimeAttribution)
    np.testing.assert_array_equal(many[0].coefficients, a.coefficients)
    np.testing.assert_array_equal(many[1].coefficients, c.coefficients)


def test_masked_images_hide_cells_with_their_channel_means():
    rng = np.random.default_rng(2)
    image = rng.random((2, 30, 33)).astype(np.float32)  # two channels, non-divisible sizes
    seen = []

    def recording(images: torch.Tensor) -> torch.Tensor:
        seen.append(images.clone())
        return pixel_query(images)

    g, n = 6, 20
    att = LimeExplainer(recording, g, n_samples=n, batch_size=8).attribute(image, seed=3, keep_masks=True)
    batch = torch.cat(seen).numpy()
    assert batch.shape == (n, 2, 30, 33) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[0], image)  # row 0: nothing hidden
    idx = cell_index(30, 33, g)
    means = np.stack([cell_means(image[ch], g).ravel()[idx] for ch in range(2)]).astype(np.float32)
    for i in (1, 7, 19):
        visible = att.masks[i][idx].astype(bool)
        np.testing.assert_array_equal(batch[i], np.where(visible, image, means))
    seen.clear()
    LimeExplainer(recording, g, n_samples=n, hide_value=-1.5).attribute(image, seed=3)
    hidden = ~att.masks[5][idx].astype(bool)
    np.testing.assert_array_equal(torch.cat(seen).numpy()[5][:, hidden], -1.5)


def test_progress_reports_and_cancel():
    image = grey_image(42)
    calls = []
    LimeExplainer(pixel_query, 7, n_samples=100, batch_size=30).attribute(
        image, seed=1, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(30, 100), (60, 100), (90, 100), (100, 100)]

    n_queries = []

    def counting(images):
        n_queries.append(len(images))
        return pixel_query(images)

    def cancel(done, total):
        raise Cancelled("cancelled by the user")

    with pytest.raises(Cancelled):
        LimeExplainer(counting, 7, n_samples=100, batch_size=30).attribute(image, seed=1, progress=cancel)
    assert n_queries == [30]

    # a Progress reporter works too: cancelling it stops the run at the next batch
    reporter = Progress()
    reporter.cancel()
    n_queries.clear()
    with pytest.raises(Cancelled):
        LimeExplainer(counting, 7, n_samples=100, batch_size=30).attribute(image, seed=1, progress=reporter)
    assert n_queries == [30]


def test_bad_inputs_raise():
    explainer = LimeExplainer(pixel_query, 21, n_samples=10)
    with pytest.raises(InputError, match="too small"):
        explainer.attribute(np.zeros((40, 64), np.float32), seed=0)
    bad = grey_image(64)
    bad[3, 5] = np.nan
    with pytest.raises(InputError, match="NaN"):
        explainer.attribute(bad, seed=0)
    bad[3, 5] = np.inf
    with pytest.raises(InputError, match="NaN or Inf"):
        explainer.attribute(torch.from_numpy(bad), seed=0)
    with pytest.raises(InputError):
        explainer.attribute(np.zeros((1, 1, 64, 64), np.float32), seed=0)
    with pytest.raises(InputError):
        LimeExplainer(pixel_query, 21, hide_value="zero")
    with pytest.raises(InputError):
        LimeExplainer(pixel_query, 21, scalar="variance")
    with pytest.raises(InputError, match="seed"):
        explainer.attribute(grey_image(64), seed=-1)
    with pytest.raises(ModelError):
        LimeExplainer(lambda x: x[:, :1], 8, n_samples=10).attribute(grey_image(32), seed=0)


def test_planted_signal_gives_positive_coefficients_on_planted_cells():
    g, size = 9, 45
    planted = {(1, 2), (4, 4), (6, 1), (7, 7), (2, 6)}
    rng = np.random.default_rng(0)
    image = (0.1 * rng.random((size, size))).astype(np.float32)
    idx = cell_index(size, size, g)
    for r, c in planted:
        image[idx == r * g + c] += 0.8

    def uncertain_where_bright(images: torch.Tensor) -> torch.Tensor:
        # foreground probability rises from ~0.02 towards 0.45 with local brightness: more entropy there
        fg = 0.02 + 0.43 * torch.nn.functional.avg_pool2d(images[:, :1], 3, 1, 1).clamp(0, 1)
        return torch.cat([1 - fg, fg], 1)

    att = LimeExplainer(uncertain_where_bright, g, n_samples=300, hide_value=0.0).attribute(image, seed=2)
    coef = att.coefficients
    threshold = 0.5 * min(coef[rc] for rc in planted)
    assert threshold > 0
    assert {tuple(rc) for rc in np.argwhere(coef > threshold)} == planted
    assert att.score > 0.9
