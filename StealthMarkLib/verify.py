"""Black-box verification (METHOD.md section 5).

Only the query interface is used: images in, class probabilities out. Nothing here reads weights.

For each trigger image, LIME (N samples, a fresh seed per image) explains the model's mean normalised
entropy over a G x G grid aligned to the key's QR modules. The per-image coefficient grids are
standardised and averaged, thresholded (Otsu), the function modules are repaired from the key's template,
and the QR is decoded. The evidence is the decoded payload and the agreement of the observed modules with
the key's modules on the data and error-correction modules only, with a one-sided binomial p-value.
"""

from __future__ import annotations

import math
import platform
import time
from dataclasses import asdict, dataclass, field
from itertools import combinations
from typing import Any, Callable, Sequence

import numpy as np

from .errors import InputError
from .key import WatermarkKey
from .lime_engine import LimeAttribution, LimeExplainer
from .progress import Progress
from .qr import DecodeResult, QRTemplate, available_decoders, decode, function_mask, module_agreement, repair

#: p-value at or below which a decoded, matching payload makes the verdict ``owned``.
ALPHA_OWNED = 1e-9
#: p-value above which a model without a matching decode is ``not-owned`` (agreement inside the 99.9% band).
ALPHA_NULL = 1e-3


def software_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("StealthMarkLib", "torch", "monai", "numpy", "lime", "qrcode", "zxing-cpp", "pyzbar"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def binomial_p_value(agree: int, n: int) -> float:
    """One-sided P(X >= agree) for X ~ Binomial(n, 0.5)."""
    from scipy.stats import binom

    return float(binom.sf(agree - 1, n, 0.5))


def null_band(n: int, level: float = 0.999) -> tuple[float, float]:
    """Two-sided ``level`` band of the agreement fraction of a model that knows nothing of the key."""
    from scipy.stats import binom

    lo, hi = binom.interval(level, n, 0.5)
    return float(lo / n), float(hi / n)


def otsu_threshold(values: np.ndarray) -> float:
    """Threshold maximising the between-class variance of a 1-D set of values."""
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if v[0] == v[-1]:
        return float(v[0])
    csum = np.cumsum(v)
    n = len(v)
    k = np.arange(1, n)
    w0, w1 = k / n, 1 - k / n
    m0 = csum[:-1] / k
    m1 = (csum[-1] - csum[:-1]) / (n - k)
    between = w0 * w1 * (m0 - m1) ** 2
    i = int(np.argmax(between))
    return float((v[i] + v[i + 1]) / 2)


def aggregate_attributions(grids: Sequence[np.ndarray]) -> np.ndarray:
    """Average per-image (G, G) coefficient grids after standardising each (mean 0, std 1)."""
    zs = []
    for g in grids:
        g = np.asarray(g, dtype=np.float64)
        sd = g.std()
        zs.append((g - g.mean()) / sd if sd > 0 else g - g.mean())
    return np.mean(zs, axis=0)


@dataclass
class VerificationReport:
    """The result of one verification, as written to report.json (stable field names)."""

    verdict: str
    payload_decoded: str | None
    payload_match: bool
    data_module_agreement: float
    bit_errors: int
    n_data_modules: int
    p_value: float
    n_queries: int
    n_trigger_images: int
    lime_samples: int
    seconds: dict[str, float]
    device: str
    model_sha256: str | None
    key_commitment: str
    decoder: str | None
    software: dict[str, str]
    trigger_mode: str
    alpha_owned: float = ALPHA_OWNED
    null_band_999: tuple[float, float] = (0.0, 1.0)
    slices: list[int] | None = None
    source: str | None = None
    model: str | None = None
    attribution: list[list[float]] = field(default_factory=list)   # aggregated (G, G) grid
    observed_modules: list[list[int]] = field(default_factory=list)  # after thresholding and repair
    # soft-decision decoding: how many of the least certain data modules were flipped to get the decode
    # (0: decoded as thresholded; None: nothing decoded). The agreement and p-value never count the flips.
    decode_flips: int | None = None
    # the same verification with random keys (``verify --null-keys K``; see :func:`null_key_calibration`)
    null_keys: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["null_band_999"] = list(self.null_band_999)
        return d

    @property
    def summary(self) -> str:
        pay = self.payload_decoded if self.payload_decoded is not None else "(no QR decoded)"
        return (f"verdict {self.verdict}: payload {pay}, agreement {self.data_module_agreement:.1%} "
                f"of {self.n_data_modules} data modules, p = {self.p_value:.3g}")


@dataclass
class Verification:
    """The report plus the arrays behind it (for pictures and volume maps)."""

    report: VerificationReport
    attributions: list[LimeAttribution]
    aggregated: np.ndarray           # (G, G) standardised mean attribution
    observed: np.ndarray             # (G, G) bool modules after thresholding and repair


def decide(payload_match: bool, p_value: float) -> str:
    if payload_match and p_value <= ALPHA_OWNED:
        return "owned"
    if not payload_match and p_value > ALPHA_NULL:
        return "not-owned"
    return "inconclusive"


# By default a verification makes at least this many queries in all: one trigger image (the key image) gets
# 4000 LIME samples, four blended slices 1000 each. Measured: on the key image alone N = 1000 left sampling
# noise that cost the decode in some runs (94.7-98.1% agreement for one model, 99.0% with N = 3000).
MIN_DEFAULT_QUERIES = 4000


def default_samples(key: WatermarkKey, n_images: int) -> int:
    """LIME samples per trigger image when none are given: the key's, raised so that the verification makes
    at least :data:`MIN_DEFAULT_QUERIES` queries."""
    return max(int(key.lime.samples), -(-MIN_DEFAULT_QUERIES // max(1, int(n_images))))


#: Soft-decision (Chase) decoding: when the thresholded grid does not decode, up to CHASE_MAX_FLIPS of the
#: CHASE_CANDIDATES data modules whose attribution lies closest to the threshold are flipped, and each such
#: grid is decoded again (at most 12 + 66 + 220 = 298 tries). Reed-Solomon alone corrects up to 5 wrong
#: codewords of QR version 1-M; the attribution says which modules are the likely wrong ones.
CHASE_CANDIDATES = 12
CHASE_MAX_FLIPS = 3


def chase_decode(observed: np.ndarray, certainty: np.ndarray, tmpl: QRTemplate
                 ) -> tuple[DecodeResult, int | None]:
    """Decode ``observed`` (G, G); failing that, retry with the least ``certainty`` data modules flipped.

    Returns the decode result and the number of modules flipped (None when nothing decoded).
    """
    result = decode(observed, tmpl)
    if result.ok:
        return result, 0
    data = ~function_mask(tmpl)
    # function modules sort last (version 1 has 208 data modules, far more than the candidates)
    cand = np.argsort(np.where(data, certainty, np.inf), axis=None)[:CHASE_CANDIDATES]
    fast = available_decoders()[:1]     # one decoder per try; the first usable one (zxing-cpp when present)
    for k in range(1, CHASE_MAX_FLIPS + 1):
        for flip in combinations(cand, k):
            grid = observed.copy()
            grid.flat[list(flip)] = ~grid.flat[list(flip)]
            r = decode(grid, tmpl, decoders=fast)
            if r.ok:
                return r, k
    return result, None


def verify_query(query: Callable, key: WatermarkKey, trigger_images: np.ndarray, *,
                 samples: int | None = None, seed: int | None = None, in_channels: int = 1,
                 batch_size: int = 64, device: Any = None, device_name: str = "cpu",
                 model_sha256: str | None = None, progress: Progress | None = None,
                 spatial_dims: int = 2) -> Verification:
    """Verify ownership through a query function only.

    Args:
        query: images (B, C, H, W) in model input space -> class probabilities (B, K, H, W).
        key: the owner's key.
        trigger_images: (n, H, W) trigger images in model input space (see :class:`TriggerOverlay`),
            repeated over the model's ``in_channels``, or colour (n, C, H, W) images with C = in_channels;
            for a 3-D model (``spatial_dims`` 3), (n, D, H, W) trigger slabs, explained over columns.
        samples: LIME samples per image (default: :func:`default_samples`).
        seed: first LIME seed (image i uses seed + i); default: the key's.
    """
    progress = progress or Progress()
    t0 = time.monotonic()
    imgs = np.asarray(trigger_images, dtype=np.float32)
    if spatial_dims == 3:
        if imgs.ndim != 4 or len(imgs) == 0:
            raise InputError(f"trigger slabs must be (n, D, H, W) with n >= 1, got {imgs.shape}")
        imgs = imgs[:, None]  # (n, 1, D, H, W): grey slabs, repeated over the channels below
    elif imgs.ndim not in (3, 4) or len(imgs) == 0 or (imgs.ndim == 4 and imgs.shape[1] != in_channels):
        raise InputError(f"trigger images must be (n, H, W) or (n, {in_channels}, H, W) with n >= 1, "
                         f"got {imgs.shape}")
    n_samples = int(samples or default_samples(key, len(imgs)))
    if n_samples < 10:
        raise InputError("--samples must be at least 10")
    seed0 = key.lime.seed if seed is None else int(seed)
    explainer = LimeExplainer(query, key.grid, n_samples=n_samples, kernel_width=key.lime.kernel_width,
                              hide_value=key.hide_value, batch_size=batch_size, alpha=key.lime.alpha,
                              scalar=key.lime.scalar, device=device, spatial_dims=spatial_dims)
    progress.start("lime", n_samples * len(imgs))
    try:
        attributions = explainer.attribute_many([np.repeat(img[None], in_channels, axis=0) if img.ndim == 2
                                                 else np.repeat(img, in_channels, axis=0) if spatial_dims == 3
                                                 else img for img in imgs],
                                                seeds=seed0, progress=progress)
    finally:
        progress.finish()
    t_dec = time.monotonic()
    agg = aggregate_attributions([a.coefficients for a in attributions])
    tmpl = key.qr
    thr = otsu_threshold(agg)
    raw = agg > thr
    observed = repair(raw, tmpl)
    result, flips = chase_decode(observed, np.abs(agg - thr), tmpl)
    expected = key.modules()
    agree, n_data = module_agreement(observed, expected, tmpl)
    p = binomial_p_value(agree, n_data)
    match = result.text == key.payload
    seconds_dec = time.monotonic() - t_dec
    q = float(sum(a.seconds_queries for a in attributions))
    lime_total = float(sum(a.seconds_total for a in attributions))
    report = VerificationReport(
        verdict=decide(match, p), payload_decoded=result.text, payload_match=match,
        data_module_agreement=agree / n_data, bit_errors=n_data - agree, n_data_modules=n_data, p_value=p,
        n_queries=n_samples * len(imgs), n_trigger_images=len(imgs), lime_samples=n_samples,
        seconds={"total": round(time.monotonic() - t0, 3), "queries": round(q, 3),
                 "regression": round(max(lime_total - q, 0.0), 3), "decode": round(seconds_dec, 3)},
        device=device_name, model_sha256=model_sha256, key_commitment=key.commitment,
        decoder=result.decoder, decode_flips=flips, software=software_versions(), trigger_mode=key.trigger.mode,
        null_band_999=null_band(n_data),
        attribution=np.round(agg, 5).tolist(), observed_modules=observed.astype(int).tolist(),
    )
    return Verification(report, attributions, agg, observed)


#: what the report says the null keys are (their texture seeds are drawn afresh and never recorded)
NULL_KEYS_NOTE = ("random keys with the claimed key's payload, QR and settings and a fresh texture seed each "
                  "(not recorded), verified the same way on the same model")


def check_null_keys(n_keys: Any) -> None:
    """A count of random keys is 2 or more (one gives no spread)."""
    if isinstance(n_keys, bool) or not isinstance(n_keys, int) or n_keys < 2:
        raise InputError(f"--null-keys must be 0 (none) or at least 2, not {n_keys!r}")


def null_key(key: WatermarkKey, rng: np.random.Generator) -> WatermarkKey:
    """The claimed key with another texture seed: the same QR layout and settings, other tiles."""
    from dataclasses import replace

    return key.replace(texture=replace(key.texture, seed=int(rng.integers(1, 2**62))))


def null_key_calibration(query: Callable, key: WatermarkKey, observed_agreement: float,
                         trigger_images_for: Callable[[WatermarkKey], np.ndarray], n_keys: int, *,
                         rng: np.random.Generator | None = None, progress: Progress | None = None,
                         **verify_kwargs: Any) -> dict[str, Any]:
    """Verify the same model with ``n_keys`` random keys (see :func:`null_key`) and set the claimed key's
    agreement against theirs.

    The binomial p-value treats the data modules as independent coin flips. On a watermarked model they are
    not, for a key that is not its own: all dark cells of a key carry one tile, and the model answers each
    tile it was not trained on with a small systematic change of its own, so the modules move together
    (benchmarks/tile_response.py). A key the model never saw is, before it is used, one random key among
    many; so its agreement should look like theirs. Returns the null keys' agreements, their mean and
    standard deviation, the claimed key's z score against them (the standard deviation used is at least
    the binomial one, 0.5 / sqrt(n), so this is never bolder than the binomial test), its one-sided normal
    p-value, and the rank p-value (1 + #{null keys at or above the claimed agreement}) / (n_keys + 1),
    exact for a key chosen before it was used, whatever the distribution (so never below 1 / (n_keys + 1)).
    """
    check_null_keys(n_keys)
    rng = rng if rng is not None else np.random.default_rng()
    progress = progress or Progress()
    agreements, n_data, n_queries, t0 = [], None, 0, time.monotonic()
    for i in range(n_keys):
        k = null_key(key, rng)
        progress.log(f"null key {i + 1} of {n_keys}")
        r = verify_query(query, k, trigger_images_for(k), progress=progress, **verify_kwargs).report
        agreements.append(r.data_module_agreement)
        n_data, n_queries = r.n_data_modules, n_queries + r.n_queries
    a = np.asarray(agreements, dtype=float)
    mean, sd = float(a.mean()), float(a.std(ddof=1))
    sd_used = max(sd, 0.5 / math.sqrt(n_data))
    z = (float(observed_agreement) - mean) / sd_used
    return {
        "n_keys": n_keys,
        "agreements": [round(float(x), 4) for x in a],
        "mean": round(mean, 4),
        "sd": round(sd, 4),
        "sd_used": round(sd_used, 4),
        "z": round(z, 3),
        "p_value_normal": 0.5 * math.erfc(z / math.sqrt(2.0)),
        "p_value_rank": (1 + int((a >= float(observed_agreement)).sum())) / (n_keys + 1),
        "n_queries": n_queries,
        "seconds": round(time.monotonic() - t0, 3),
        "keys": NULL_KEYS_NOTE,
    }
