"""Vectorised LIME over the G x G key grid: the attribution of a segmentation model's uncertainty.

Each LIME sample hides a random subset of grid cells, the model is queried on the masked images, and its
``(B, K, H, W)`` class probabilities are reduced to one scalar per sample (mean normalised entropy by
default). A weighted ridge regression, exactly as the ``lime`` package fits it, gives one coefficient per
cell. The samples, distances, kernel and ridge reproduce ``lime.lime_image.LimeImageExplainer`` (same
seed -> same masks -> same coefficients to ~1e-14), but the masked images are built as one tensor
operation per batch on the model's device instead of a Python loop per sample.

Usage (Captum-like: built once around a query function, called per image)::

    explainer = LimeExplainer(query, grid=21, n_samples=1000)
    att = explainer.attribute(trigger_image, seed=7)   # att.coefficients: (21, 21)

With ``spatial_dims=3``, a volume ``(C, D, H, W)`` (a slab for a 3-D model) is explained the same way over *columns*: feature
``r*G+c`` is cell ``(r, c)`` of every slice of the slab, hidden in all of them at once, and the query's
``(B, K, D, H, W)`` probabilities are reduced over the whole slab (the scalar of the slices stacked).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .errors import InputError, ModelError
from .grid import cell_index, check_fits
from .progress import Progress

QueryFn = Callable[[torch.Tensor], torch.Tensor]
"""Images ``(B, C, H, W)`` float32 on any device -> class probabilities ``(B, K, H, W)``, K >= 2."""

ProgressFn = Callable[[int, int], None]


# -- sampling ---------------------------------------------------------------------------------------------
def sample_masks(n_samples: int, n_features: int, seed: int) -> np.ndarray:
    """(N, K) uint8 cell masks (1 = visible), drawn exactly as ``lime_image`` draws them.

    ``lime`` uses ``RandomState(seed).randint(0, 2, N * K)`` and sets the first row to all ones (the
    unmasked image). It does so only when ``explain_instance`` gets an explicit ``random_seed``; without one
    it first draws a segmentation seed from the same state.
    """
    if n_samples < 1 or n_features < 1:
        raise InputError(f"need at least one sample and one feature (got {n_samples}, {n_features})")
    try:
        state = np.random.RandomState(seed)
    except (TypeError, ValueError) as exc:
        raise InputError(f"the LIME seed must be an integer in 0..2**32-1, got {seed!r}") from exc
    data = state.randint(0, 2, n_samples * n_features).reshape(n_samples, n_features)
    data[0, :] = 1
    return data.astype(np.uint8)


# -- explained scalars ------------------------------------------------------------------------------------
def _as_float64(probs: torch.Tensor, copy: bool = False) -> torch.Tensor:
    if probs.ndim != 4 or probs.shape[1] < 2:
        raise ModelError(
            f"expected class probabilities of shape (B, K, H, W) with K >= 2, got {tuple(probs.shape)}"
        )
    device = "cpu" if probs.device.type == "mps" else probs.device  # no float64 on Apple GPUs
    return probs.to(device, torch.float64, copy=copy)


def normalised_entropy(probs: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) probabilities -> (B,) float64 mean over pixels of ``-sum_k p log p / log K`` (0..1).

    Computed in float64 so that the small differences LIME regresses on are not lost to rounding.
    Differentiable when ``probs`` requires grad.
    """
    differentiable = probs.requires_grad and torch.is_grad_enabled()
    # in place on a private float64 copy unless autograd needs the graph: ~2x faster on CPU (measured)
    p = _as_float64(probs, copy=not differentiable)
    b, k, h, w = p.shape
    # entr(p) = -p log p, and 0 at p = 0 (no log 0; -inf for p < 0, reported as a model error)
    ent = torch.special.entr(p) if differentiable else torch.special.entr(p, out=p)
    # one flat sum per sample: ~2x faster than a sum over K and then a strided mean over pixels
    return ent.reshape(b, -1).sum(dim=1) / (math.log(k) * h * w)


def foreground_probability(probs: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) probabilities -> (B,) float64 mean over pixels of the probability of classes 1..K-1."""
    p = _as_float64(probs)
    b, _, h, w = p.shape
    return p[:, 1:].reshape(b, -1).sum(dim=1) / (h * w)


SCALARS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "entropy": normalised_entropy,
    "foreground": foreground_probability,
}


# -- LIME regression (numpy, float64) ----------------------------------------------------------------------
def lime_kernel(distances: np.ndarray, kernel_width: float = 0.25) -> np.ndarray:
    """LIME's exponential kernel: ``sqrt(exp(-d^2 / width^2))``."""
    d = np.asarray(distances, dtype=np.float64)
    return np.sqrt(np.exp(-(d**2) / float(kernel_width) ** 2))


def cosine_distances_to_first(Z: np.ndarray) -> np.ndarray:
    """(N,) cosine distance of each row of ``Z`` to row 0, as ``sklearn.metrics.pairwise_distances``.

    Rows of zero norm are at distance 1 (sklearn leaves them unnormalised); results are clipped to [0, 2].
    """
    Z = np.asarray(Z, dtype=np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", Z, Z))
    norms[norms == 0.0] = 1.0
    Zn = Z / norms[:, None]
    sim = Zn @ Zn[0]
    return np.clip(1.0 - sim, 0.0, 2.0)


@dataclass
class RidgeFit:
    """A weighted ridge fit: ``y ~ Z @ coefficients + intercept``; ``score`` is the weighted R^2."""

    coefficients: np.ndarray
    intercept: float
    score: float


def _solve_spd(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.solve(A, b)
    except np.linalg.LinAlgError:  # alpha = 0 and a rank-deficient design: least squares, like sklearn
        return np.linalg.lstsq(A, b, rcond=None)[0]


def _one_blas_thread() -> contextlib.AbstractContextManager:
    # a ridge of a few hundred features takes ~10 ms on one thread; OpenBLAS's thread pool, spinning
    # against torch's threads or a busy machine, made the same solve 10-30x slower (measured)
    try:
        from threadpoolctl import threadpool_limits  # installed with scikit-learn
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def weighted_ridge(Z: np.ndarray, y: np.ndarray, weights: np.ndarray, alpha: float = 1.0) -> RidgeFit:
    """``sklearn.linear_model.Ridge(alpha, fit_intercept=True).fit(Z, y, sample_weight=weights)`` in closed form.

    Centre ``Z`` and ``y`` on their weighted means, scale rows by ``sqrt(w)``, solve the normal equations
    (primal when N >= K, dual when K > N, as sklearn's Cholesky solver does), then recover the intercept.
    """
    Z = np.asarray(Z, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if Z.ndim != 2 or Z.shape[0] != y.shape[0] or w.shape[0] != y.shape[0]:
        raise InputError(f"shape mismatch: Z {Z.shape}, y {y.shape}, weights {w.shape}")
    if alpha < 0 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise InputError("ridge needs alpha >= 0 and finite, non-negative weights with a positive sum")
    n, k = Z.shape
    z_off = np.average(Z, axis=0, weights=w)
    y_off = float(np.average(y, weights=w))
    sw = np.sqrt(w)
    Xc = (Z - z_off) * sw[:, None]
    yc = (y - y_off) * sw
    with _one_blas_thread():
        if k > n:
            dual = _solve_spd(Xc @ Xc.T + alpha * np.eye(n), yc)
            coef = Xc.T @ dual
        else:
            coef = _solve_spd(Xc.T @ Xc + alpha * np.eye(k), Xc.T @ yc)
    intercept = y_off - float(z_off @ coef)
    # weighted R^2 as sklearn's r2_score(force_finite=True)
    resid = y - (Z @ coef + intercept)
    num = float(np.sum(w * resid**2))
    den = float(np.sum(w * (y - np.average(y, weights=w)) ** 2))
    if den == 0.0:
        score = 1.0 if num == 0.0 else 0.0
    else:
        score = 1.0 - num / den
    return RidgeFit(coefficients=coef, intercept=intercept, score=score)


# -- the explainer -----------------------------------------------------------------------------------------
@dataclass
class LimeAttribution:
    """LIME attribution of the explained scalar over the G x G grid (cell ``(r, c)`` = feature ``r*G+c``)."""

    coefficients: np.ndarray  # (G, G) float64
    intercept: float
    score: float  # weighted R^2 of the local linear model
    responses: np.ndarray  # (N,) explained scalar per sample; [0] is the unmasked image
    n_samples: int
    seconds_queries: float  # inside the query function (forward passes), synchronised on CUDA
    seconds_total: float
    masks: np.ndarray | None = field(default=None, repr=False)  # (N, G*G) uint8 when keep_masks=True

    @property
    def grid(self) -> int:
        return int(self.coefficients.shape[0])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with stable field names (masks left out)."""
        return {
            "grid": self.grid,
            "coefficients": self.coefficients.tolist(),
            "intercept": float(self.intercept),
            "score": float(self.score),
            "responses": self.responses.tolist(),
            "n_samples": int(self.n_samples),
            "seconds_queries": float(self.seconds_queries),
            "seconds_total": float(self.seconds_total),
        }


def _resolve_device(device: torch.device | str | None) -> torch.device | None:
    if device is None:
        return None
    if isinstance(device, str) and device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"unknown device {device!r}") from exc


def _synchronise(*devices: torch.device) -> None:
    for dev in devices:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        elif dev.type == "mps":
            torch.mps.synchronize()


class LimeExplainer:
    """LIME attribution of a segmentation model's uncertainty over a G x G cell grid.

    Args:
        query: images ``(B, C, H, W)`` float32 -> probabilities ``(B, K, H, W)`` (K >= 2, summing to 1).
        grid: G, cells per side (one per QR module).
        n_samples: N, LIME samples per image (the first is the unmasked image).
        kernel_width: width of LIME's kernel on cosine distances (``lime_image`` default 0.25).
        hide_value: what a hidden cell becomes: a number in the model's input space, or ``"mean"`` (each
            hidden cell takes its own per-channel mean, like ``lime``'s ``hide_color=None``).
        batch_size: images per query call.
        alpha: ridge penalty (``lime`` uses 1).
        scalar: the explained scalar, a name in :data:`SCALARS` or a callable ``(B, K, H, W) -> (B,)``.
        device: where masked images are built and sent to ``query``; ``None`` = the image's own device
            (CPU for numpy), ``"auto"`` = CUDA, then MPS, then CPU.
        spatial_dims: 2 for images; 3 for volumes ``(C, D, H, W)`` explained over columns through the slices
            (the query then returns ``(B, K, D, H, W)``).
    """

    def __init__(self, query: QueryFn, grid: int, n_samples: int = 1000, kernel_width: float = 0.25,
                 hide_value: float | str = "mean", batch_size: int = 64, alpha: float = 1.0,
                 scalar: str | Callable[[torch.Tensor], torch.Tensor] = "entropy",
                 device: torch.device | str | None = None, spatial_dims: int = 2) -> None:
        if not callable(query):
            raise InputError("query must be a callable: images (B, C, H, W) -> probabilities (B, K, H, W)")
        if int(grid) < 1:
            raise InputError(f"grid must be >= 1, got {grid}")
        if spatial_dims not in (2, 3):
            raise InputError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        self.spatial_dims = int(spatial_dims)
        if int(n_samples) < 2:
            raise InputError(f"LIME needs at least 2 samples, got {n_samples}")
        if int(batch_size) < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        if not float(kernel_width) > 0:
            raise InputError(f"kernel_width must be > 0, got {kernel_width}")
        if not float(alpha) >= 0:
            raise InputError(f"alpha must be >= 0, got {alpha}")
        if isinstance(hide_value, str):
            if hide_value != "mean":
                raise InputError(f"hide_value must be a number or 'mean', got {hide_value!r}")
        elif not math.isfinite(float(hide_value)):
            raise InputError(f"hide_value must be finite, got {hide_value}")
        if isinstance(scalar, str):
            if scalar not in SCALARS:
                raise InputError(f"unknown explained scalar {scalar!r}; choose one of {sorted(SCALARS)}")
            self.scalar_fn = SCALARS[scalar]
        elif callable(scalar):
            self.scalar_fn = scalar
        else:
            raise InputError("scalar must be a name or a callable (B, K, H, W) -> (B,)")
        self.query = query
        self.grid = int(grid)
        self.n_samples = int(n_samples)
        self.kernel_width = float(kernel_width)
        self.hide_value = hide_value if isinstance(hide_value, str) else float(hide_value)
        self.batch_size = int(batch_size)
        self.alpha = float(alpha)
        self.scalar = scalar if isinstance(scalar, str) else getattr(scalar, "__name__", "custom")
        self.device = _resolve_device(device)
        self._index_cache: dict[tuple[int, int, str], torch.Tensor] = {}

    # -- helpers ------------------------------------------------------------------------------------------
    def _prepare_image(self, image: Any) -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            t = image.detach()
        else:
            try:
                t = torch.from_numpy(np.ascontiguousarray(np.asarray(image)))
            except TypeError as exc:
                raise InputError(f"the image must be a numeric array, got {type(image).__name__}") from exc
        if self.spatial_dims == 3:
            if t.ndim != 4:
                raise InputError(f"the volume must be (C, D, H, W), got shape {tuple(t.shape)}")
        else:
            if t.ndim == 2:
                t = t[None]
            if t.ndim != 3:
                raise InputError(f"the image must be (C, H, W) or (H, W), got shape {tuple(t.shape)}")
        if t.is_complex() or t.dtype == torch.bool:
            raise InputError(f"the image must be real-valued, got {t.dtype}")
        check_fits(int(t.shape[-2]), int(t.shape[-1]), self.grid)
        if not bool(torch.isfinite(t).all()):
            raise InputError("the image contains NaN or Inf values")
        device = self.device if self.device is not None else t.device
        return t.to(device=device, dtype=torch.float32)

    def _cell_index(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        key = (h, w, str(device))
        idx = self._index_cache.get(key)
        if idx is None:
            idx = torch.from_numpy(cell_index(h, w, self.grid).reshape(-1)).to(device)
            self._index_cache[key] = idx
        return idx

    def _hidden_image(self, img: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """(C, H, W) (or (C, D, H, W)) float32: what every pixel becomes when its cell (column) is hidden."""
        if not isinstance(self.hide_value, str):
            return torch.full_like(img, self.hide_value)
        # per-cell, per-channel means in float64 (as lime does), computed on the CPU (MPS has no float64)
        c = img.shape[0]
        k = self.grid * self.grid
        flat = img.reshape(c, -1).to("cpu", torch.float64)
        idx_cpu = idx.cpu().repeat(flat.shape[1] // idx.numel())  # a column: the cell in every slice
        sums = torch.zeros(c, k, dtype=torch.float64).index_add_(1, idx_cpu, flat)
        counts = torch.bincount(idx_cpu, minlength=k).to(torch.float64)
        means = sums / counts
        return means[:, idx_cpu].reshape(img.shape).to(device=img.device, dtype=torch.float32)

    # -- public API ---------------------------------------------------------------------------------------
    def attribute(self, image: Any, seed: int, progress: ProgressFn | Progress | None = None,
                  keep_masks: bool = False) -> LimeAttribution:
        """LIME attribution of ``image`` ((C, H, W) or (H, W), or a volume (C, D, H, W) explained over columns;
        model input space) with sampler ``seed``.

        ``progress(done, total)`` is called after each batch; an exception it raises (a cancel) stops the
        run and propagates.
        """
        t0 = time.perf_counter()
        if isinstance(progress, Progress):
            progress = progress.callback()
        img = self._prepare_image(image)
        dev = img.device
        h, w = img.shape[-2:]
        pixel_mask = (1,) * (img.ndim - 2) + (h, w)  # (1, H, W), or (1, 1, H, W): one mask for all slices
        k = self.grid * self.grid
        n = self.n_samples
        idx = self._cell_index(h, w, dev)
        hidden = self._hidden_image(img, idx)[None]  # (1, C, H, W)
        img_b = img[None]
        masks = sample_masks(n, k, seed)
        masks_dev = torch.from_numpy(masks).to(dev).bool()

        responses = []
        seconds_queries = 0.0
        with torch.no_grad():  # not inference_mode: see SegmentationModel._forward_chunk
            for start in range(0, n, self.batch_size):
                stop = min(start + self.batch_size, n)
                # (b, K) cell masks -> (b, 1, H, W) pixel masks by one gather through the cell index
                visible = masks_dev[start:stop].index_select(1, idx).view(stop - start, *pixel_mask)
                batch = torch.where(visible, img_b, hidden)
                _synchronise(dev)
                tq = time.perf_counter()
                probs = self.query(batch)
                if isinstance(probs, torch.Tensor):
                    _synchronise(dev, probs.device)
                seconds_queries += time.perf_counter() - tq
                probs = self._check_output(probs, stop - start, img.ndim + 1)
                if probs.ndim == 5:  # a slab's slices stacked: the scalar over the whole volume
                    probs = probs.reshape(*probs.shape[:2], -1, probs.shape[-1])
                responses.append(torch.as_tensor(self.scalar_fn(probs)).reshape(-1).to("cpu", torch.float64))
                if progress is not None:
                    progress(stop, n)
        y = torch.cat(responses).numpy()
        if y.shape[0] != n:
            raise ModelError(f"the explained scalar gave {y.shape[0]} values for {n} samples")
        if not np.all(np.isfinite(y)):
            raise ModelError("the model's output gave a NaN or Inf explained scalar; check its probabilities")

        weights = lime_kernel(cosine_distances_to_first(masks), self.kernel_width)
        fit = weighted_ridge(masks, y, weights, self.alpha)
        return LimeAttribution(
            coefficients=fit.coefficients.reshape(self.grid, self.grid),
            intercept=fit.intercept,
            score=fit.score,
            responses=y,
            n_samples=n,
            seconds_queries=seconds_queries,
            seconds_total=time.perf_counter() - t0,
            masks=masks if keep_masks else None,
        )

    def attribute_many(self, images: Sequence[Any], seeds: Sequence[int] | int,
                       progress: ProgressFn | Progress | None = None,
                       keep_masks: bool = False) -> list[LimeAttribution]:
        """One attribution per image; ``seeds`` is one seed per image, or a base seed (image i gets seed+i).

        ``progress(done, total)`` counts samples over all images.
        """
        images = list(images)
        if isinstance(seeds, (int, np.integer)):
            seeds = [int(seeds) + i for i in range(len(images))]
        seeds = list(seeds)
        if len(seeds) != len(images):
            raise InputError(f"got {len(images)} images but {len(seeds)} seeds")
        if isinstance(progress, Progress):
            progress = progress.callback()
        total = len(images) * self.n_samples
        out = []
        for i, (image, seed) in enumerate(zip(images, seeds)):
            inner = None
            if progress is not None:
                offset = i * self.n_samples
                cb = progress

                def inner(done: int, _total: int, offset: int = offset, cb: ProgressFn = cb) -> None:
                    cb(offset + done, total)

            out.append(self.attribute(image, seed, progress=inner, keep_masks=keep_masks))
        return out

    @staticmethod
    def _check_output(probs: Any, b: int, ndim: int = 4) -> torch.Tensor:
        if not isinstance(probs, torch.Tensor):
            try:
                probs = torch.as_tensor(np.asarray(probs))
            except (TypeError, ValueError) as exc:
                raise ModelError(f"the query returned {type(probs).__name__}, not a tensor") from exc
        if probs.ndim != ndim or probs.shape[0] != b or probs.shape[1] < 2:
            shape = "K, H, W" if ndim == 4 else "K, D, H, W"
            raise ModelError(
                f"the query must return probabilities of shape ({b}, {shape}) with K >= 2, "
                f"got {tuple(probs.shape)}"
            )
        return probs
