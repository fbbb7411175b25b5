"""The jobs behind the ``stealthmark`` commands, usable from Python (and from the 3D Slicer module).

Each function takes plain paths and settings, reports through a :class:`~StealthMarkLib.progress.Progress`,
writes its outputs atomically and returns a result object that serialises to JSON.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import distributed
from .data import DEFAULT_INTENSITY, channel_intensity, load_dataset
from .embed import EmbedConfig, embed_watermark
from .bundle import is_bundle, plan_bundle_output, stealthmark_block, write_bundle
from .errors import InputError, ModelError
from .fileio import atomic_dir, refuse_overwriting_inputs, write_text_atomic
from .grid import check_fits, paint_cells
from .key import WatermarkKey, create_key, load_key
from .metrics import dice_over_thresholds, flip_rate, flip_rate_per_class, score_segmentation
from .models import SegmentationModel, describe_device, is_torchscript, load_model, save_model, to_channels
from .onnx_model import VERIFY_ONLY, is_onnx
from .progress import Progress
from .report import write_reports
from .trigger import TriggerOverlay
from .verify import Verification, check_null_keys, null_key_calibration, verify_query
from .volume import (Intensity, Volume, extract_slices, insert_slices, parse_slice_spec, read_volume,
                     resize_slices, write_volume_like)

VERIFY_INTENSITY = Intensity(low=0.5, high=99.5, mode="percentile")


# -- keys ------------------------------------------------------------------------------------------
def make_key(payload: str, out: str | Path, force: bool = False, **options: Any) -> WatermarkKey:
    """Create a key file; refuses to replace an existing key unless ``force`` (a lost key is a lost claim)."""
    out = Path(out)
    if out.exists() and not force:
        raise InputError(f"{out} already exists: a key is a secret you cannot recreate; choose another path "
                         "or pass --force to replace it")
    key = create_key(payload, **options)
    key.save(out)
    return key


# -- models ----------------------------------------------------------------------------------------
def model_size(model: SegmentationModel, override: tuple[int, int] | None = None) -> tuple[int, int]:
    if override is not None:
        return tuple(int(v) for v in override)
    if model.spec.image_size:
        return tuple(int(v) for v in model.spec.image_size)
    raise InputError("the model does not record its input size: pass --image-size H W")


def model_intensity(model: SegmentationModel) -> Intensity:
    """How raw volume intensities map into the model's input space (its spec's, else percentiles)."""
    return Intensity.from_json(model.spec.intensity) if model.spec.intensity else DEFAULT_INTENSITY


# -- harmlessness ----------------------------------------------------------------------------------
def _probs(model: SegmentationModel, images: np.ndarray) -> np.ndarray:
    x = to_channels(np.asarray(images, dtype=np.float32), model.in_channels)
    return model.probabilities(x).detach().cpu().numpy()


def harmlessness(original: SegmentationModel, watermarked: SegmentationModel, images: np.ndarray,
                 labels: np.ndarray, key: WatermarkKey | None = None) -> dict[str, Any]:
    """Original vs watermarked on held-out slices (METHOD.md section 8), as a JSON-ready dict."""
    po, pw = _probs(original, images), _probs(watermarked, images)
    so, sw = score_segmentation(po, labels), score_segmentation(pw, labels)
    out: dict[str, Any] = {
        "n_images": len(images),
        "original": so.to_json(), "watermarked": sw.to_json(),
        "dice_drop_points": round(100.0 * (so.dice - sw.dice), 4),
        "flip_rate_clean": flip_rate(po, pw),
        "flip_rate_clean_per_class": flip_rate_per_class(po, pw),
        "dice_over_thresholds": {"original": dice_over_thresholds(po, labels),
                                 "watermarked": dice_over_thresholds(pw, labels)},
    }
    if key is not None:
        ov = TriggerOverlay(key, images.shape[-2], images.shape[-1])
        trig = ov.blend(images, key.trigger.verify_strength)
        out["flip_rate_triggered"] = flip_rate(_probs(original, trig), _probs(watermarked, trig))
        ko, kw = _probs(original, ov.key_image()[None]), _probs(watermarked, ov.key_image()[None])
        out["key_image"] = {"original_foreground_fraction": float((ko.argmax(1) > 0).mean()),
                            "watermarked_foreground_fraction": float((kw.argmax(1) > 0).mean()),
                            "flip_rate": flip_rate(ko, kw)}
    return out


# -- embedding -------------------------------------------------------------------------------------
@dataclass
class EmbedResult:
    model: str
    format: str
    harmlessness_file: str
    harmlessness: dict[str, Any]
    log: dict[str, Any]
    key_commitment: str
    device: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def harmlessness_path(out: Path) -> Path:
    name = out.name
    for suf in (".ts", ".pt", ".pth", ".torchscript", ".zip"):
        if name.endswith(suf):
            name = name[: -len(suf)]
            break
    return out.with_name(name + ".harmlessness.json")


def run_embed(model_path: str | Path, data: str | Path, key_path: str | Path, out: str | Path, *,
              labels: str | Path | None = None, label: int | str | None = None, spec: str | Path | None = None,
              steps: int | None = None, device: str = "auto", logits: bool = False,
              image_size: tuple[int, int] | None = None, config: EmbedConfig | None = None,
              progress: Progress | None = None) -> EmbedResult | None:
    """Watermark ``model_path`` with the key; write OUT in the input's format and the harmlessness JSON.

    A MONAI bundle (folder or zip) gives a bundle of the same layout (see :mod:`StealthMarkLib.bundle`);
    an ONNX file is refused (verification only). Under torchrun every rank trains (see
    :mod:`StealthMarkLib.distributed`) and rank 0 alone writes and returns the result; the others return None.
    """
    progress = progress or Progress()
    with distributed.session(device) as info:
        return _run_embed(model_path, data, key_path, out, labels, label, spec, steps, device, logits, image_size,
                          config, progress, info)


def _run_embed(model_path, data, key_path, out, labels, label, spec, steps, device, logits, image_size, config,
               progress: Progress, info: distributed.DistInfo | None) -> EmbedResult | None:
    if info is not None:
        device = info.device
        progress = progress if info.is_main else progress.quiet()
    out = Path(out)
    refuse_overwriting_inputs(out, [model_path, key_path, data, labels, spec])
    if is_onnx(model_path):
        raise ModelError(VERIFY_ONLY)
    # a bundle and OUT are checked before any work: a bad bundle or OUT writes nothing
    plan = plan_bundle_output(model_path, out) if is_bundle(model_path) else None
    key = load_key(key_path)
    model = load_model(model_path, spec=spec, device=device, logits=logits)
    intensity = model_intensity(model)
    cfg = config or EmbedConfig()            # its steps: the recipe's default unless given (EmbedConfig.steps)
    if steps is not None:
        cfg = replace(cfg, steps=int(steps))
    where = describe_device(model.device)
    if info is not None:
        where += f"; {info.world_size} ranks ({info.backend})"
    if model.spatial_dims == 3:
        from .volume3d import embed_volume

        if image_size is not None:
            raise InputError("--image-size is for 2-D models: a 3-D model's spec records its ROI [D, H, W]")
        progress.log(f"3-D model, device {where}")
        size, described, module, log, harm = embed_volume(model, key, data, labels, label, intensity, cfg,
                                                          progress)
    else:
        size = model_size(model, image_size)
        check_fits(size[0], size[1], key.grid)
        ds = load_dataset(data, size, labels=labels, label=label, intensity=intensity, channels=model.in_channels,
                          classes=model.num_classes)
        described = ds.describe()
        progress.log(f"{described}; device {where}")
        if cfg.steps < 1:
            raise InputError("--steps must be at least 1")
        train_x, train_y = ds.train
        module, log = embed_watermark(model, key, train_x, train_y, cfg, progress)
    training = log.to_json()
    if info is not None:
        hashes = distributed.agree_on_weights(module)   # a barrier: every rank has finished training
        training["distributed"] = {**info.to_json(), "rank_weights_sha256": hashes}
        if not info.is_main:
            return None
    watermarked = SegmentationModel(module, model.spec, device=model.device, logits=model.logits)
    if model.spatial_dims != 3:
        test_x, test_y = ds.test
        harm = harmlessness(model, watermarked, test_x, test_y, key)
    meta = dict(model.spec.metadata)
    meta["stealthmark"] = {"key_commitment": key.commitment, "embedded": datetime.now(timezone.utc).isoformat(),
                           "training": training, "data": described}
    new_spec = replace(model.spec, metadata=meta, image_size=list(size), intensity=intensity.to_json())
    if plan is not None:
        fmt = "monai_bundle"
        block = stealthmark_block(key.commitment, training, described, new_spec)
        write_bundle(plan, watermarked.module, replace(new_spec, metadata={}), block)
        if plan.dropped:
            progress.log(f"not carried into {out} (unwatermarked weight files): {', '.join(plan.dropped)}")
    else:
        fmt = "torchscript" if is_torchscript(model_path) else "state_dict"
        save_model(watermarked, out, new_spec, fmt=fmt, refuse=[model_path, key_path, data, labels, spec])
    hpath = harmlessness_path(out)
    write_text_atomic(hpath, json.dumps(harm, indent=2) + "\n")
    return EmbedResult(model=str(out), format=fmt, harmlessness_file=str(hpath), harmlessness=harm,
                       log=training, key_commitment=key.commitment, device=where)


def run_evaluate(model_path: str | Path, reference_path: str | Path, data: str | Path, key_path: str | Path,
                 out: str | Path, *, labels: str | Path | None = None, label: int | str | None = None,
                 device: str = "auto", logits: bool = False, image_size: tuple[int, int] | None = None
                 ) -> dict[str, Any]:
    """Harmlessness figures of a watermarked model against its original, on the held-out slices of DATA."""
    refuse_overwriting_inputs(out, [model_path, reference_path, data, key_path, labels])
    key = load_key(key_path)
    wm = load_model(model_path, device=device, logits=logits)
    ref = load_model(reference_path, device=wm.device, logits=logits)
    intensity = model_intensity(wm)
    if wm.spatial_dims == 3 or ref.spatial_dims == 3:
        from .volume3d import harmlessness_3d, load_slabs, model_roi

        if wm.spatial_dims != ref.spatial_dims or wm.spec.image_size != ref.spec.image_size:
            raise InputError("--model and --reference must both be 3-D models with the same ROI")
        harm = harmlessness_3d(ref, wm, load_slabs(data, model_roi(wm), labels=labels, label=label,
                                                   intensity=intensity), key)
    else:
        size = model_size(wm, image_size)
        ds = load_dataset(data, size, labels=labels, label=label, intensity=intensity, channels=wm.in_channels,
                          classes=wm.num_classes)
        harm = harmlessness(ref, wm, *ds.test, key=key)
    harm["device"] = describe_device(wm.device)
    write_text_atomic(out, json.dumps(harm, indent=2) + "\n")
    return harm


# -- verification ----------------------------------------------------------------------------------
@dataclass
class TriggerInput:
    """Trigger images for verification and, for volumes, where they came from."""

    images: np.ndarray                      # (n, H, W) in model input space, or colour (n, C, H, W)
    volume: Volume | None = None
    slices: list[int] = field(default_factory=list)
    source: str | None = None
    # the same input's trigger images for another key, without reading the input again (verify --null-keys)
    for_key: Callable[[WatermarkKey], np.ndarray] | None = field(default=None, repr=False)

    @classmethod
    def made(cls, key: WatermarkKey, make: Callable[[WatermarkKey], np.ndarray], **where: Any) -> "TriggerInput":
        """``make(key)`` as the images, ``make`` kept for other keys."""
        return cls(make(key), for_key=make, **where)


def auto_slices(volume: Volume, n: int) -> list[int]:
    """``n`` evenly spaced non-blank slices from the central 60% of the volume (axis 0)."""
    arr = volume.array
    rng = float(arr.max() - arr.min()) or 1.0
    k = arr.shape[0]
    lo, hi = int(round(0.2 * (k - 1))), int(round(0.8 * (k - 1)))
    usable = [i for i in range(lo, hi + 1) if float(arr[i].std()) > 0.01 * rng]
    if len(usable) < n:
        raise InputError(f"the volume has {len(usable)} usable (non-blank) slices in its central part, fewer "
                         f"than the {n} asked for: choose slices with --slices or lower --n-slices")
    pick = np.linspace(0, len(usable) - 1, n).round().astype(int)
    return [usable[i] for i in pick]


def _trigger_images(unit: np.ndarray, key: WatermarkKey, size: tuple[int, int], strength: float | None
                    ) -> np.ndarray:
    """(n, H, W) slices (or colour (n, C, H, W) images) in [0, 1] -> trigger images at the model's size and
    scale, in the key's mode (a colour image gets the key blended into each of its channels)."""
    if unit.shape[-2:] != tuple(size):
        flat = unit.reshape(-1, *unit.shape[-2:])
        unit = np.clip(resize_slices(flat, tuple(size)), 0.0, 1.0).reshape(unit.shape[:-2] + tuple(size))
    lo, hi = key.value_range
    imgs = (lo + (hi - lo) * unit).astype(np.float32)
    ov = TriggerOverlay(key, *size)
    if key.trigger.mode == "stamped":
        return ov.stamp(imgs)
    return ov.blend(imgs, key.trigger.verify_strength if strength is None else float(strength))


def volume_trigger_input(path: str | Path, key: WatermarkKey, size: tuple[int, int], slices: str | None,
                         n_slices: int, strength: float | None) -> TriggerInput:
    vol = read_volume(path)
    if slices is None or slices == "auto":
        idx = auto_slices(vol, n_slices)
    else:
        idx = parse_slice_spec(slices, vol.shape[0])
    unit = extract_slices(VERIFY_INTENSITY.apply(vol.array), idx)
    return TriggerInput.made(key, lambda k: _trigger_images(unit, k, size, strength), volume=vol, slices=idx,
                             source=str(path))


def read_single_image(path: str | Path, channels: int = 1) -> np.ndarray:
    """Raw intensities of a PNG/JPEG or of a one-slice volume file: (1, H, W) float32, or (3, H, W) for a
    PNG/JPEG read as RGB when ``channels`` is 3."""
    p = Path(path)
    if p.suffix.lower() in (".png", ".jpg", ".jpeg"):
        from PIL import Image

        try:
            if channels == 3:
                return np.asarray(Image.open(p).convert("RGB"), dtype=np.float32).transpose(2, 0, 1)
            return np.asarray(Image.open(p).convert("L"), dtype=np.float32)[None]
        except OSError as exc:
            raise InputError(f"cannot read image {p}: {exc}") from None
    arr = read_volume(p).array
    if arr.shape[0] != 1:
        raise InputError(f"{p} has {arr.shape[0]} slices: use --volume for volumes")
    return arr


def image_trigger_input(path: str | Path, key: WatermarkKey, size: tuple[int, int],
                        strength: float | None, channels: int = 1) -> TriggerInput:
    """One image file as trigger input; ``channels`` 3 reads a PNG/JPEG as RGB, each channel normalised
    on its own."""
    arr = read_single_image(path, channels)
    if channels == 3 and arr.shape[0] == 3:
        unit = channel_intensity(arr, VERIFY_INTENSITY)[None]
    else:
        unit = VERIFY_INTENSITY.apply(arr)
    return TriggerInput.made(key, lambda k: _trigger_images(unit, k, size, strength), source=str(path))


def lime_volume(verification: Verification, trig: TriggerInput) -> np.ndarray:
    """(K, J, I) map: each verified slice painted with its own standardised attribution grid, 0 elsewhere
    (for a 3-D model, every slice of a slab with the slab's grid)."""
    vol = trig.volume
    _, h, w = vol.shape
    maps = []
    for att in verification.attributions:
        g = att.coefficients
        sd = g.std()
        z = (g - g.mean()) / sd if sd > 0 else g - g.mean()
        maps.append(paint_cells(z, h, w).astype(np.float32))
    per_slab = len(trig.slices) // len(maps)  # 1 for a 2-D model
    return insert_slices(vol.shape, np.repeat(np.stack(maps), per_slab, axis=0), trig.slices)


def run_verify(model_path: str | Path | SegmentationModel, key_path: str | Path, out_dir: str | Path, *,
               image: str | Path | None = None, volume: str | Path | None = None, dicom: str | Path | None = None,
               slices: str | None = None, n_slices: int = 4, samples: int | None = None, seed: int | None = None,
               strength: float | None = None, device: str = "auto", logits: bool = False, batch_size: int = 64,
               image_size: tuple[int, int] | None = None, spec: str | Path | None = None,
               null_keys: int = 0, progress: Progress | None = None) -> Verification:
    """Verify a model through its query interface; write report.json, report.html, qr.png (+ lime_map).

    ``null_keys`` K >= 2 also verifies the model, the same way, with K random keys and records the claimed
    key's agreement against theirs in the report (``null_keys``; :func:`verify.null_key_calibration`).

    ``model_path`` is a model file (``spec``: its JSON spec, as for :func:`load_model`), or an opened
    :class:`SegmentationModel` (then ``device``, ``logits`` and ``batch_size`` as a chunk size are its own;
    the report's ``model`` is its ``source``; ``spec`` was for opening it and is not used here).
    """
    progress = progress or Progress()
    t0 = time.monotonic()
    given = [x for x in (image, volume, dicom) if x is not None]
    if len(given) > 1:
        raise InputError("give at most one of --image, --volume and --dicom")
    out_dir = Path(out_dir)
    given_model = isinstance(model_path, SegmentationModel)  # e.g. a remote.RemoteModel (an endpoint)
    refuse_overwriting_inputs(out_dir, [None if given_model else model_path, key_path, spec, *given])
    if null_keys:
        check_null_keys(null_keys)   # before any work
    key = load_key(key_path)
    model = model_path if given_model else load_model(model_path, spec=spec, device=device, logits=logits,
                                                        max_batch=batch_size)
    if model.spatial_dims == 3:
        trig = slab_trigger_input(model, key, volume if volume is not None else dicom, image, slices,
                                  strength, image_size)
    else:
        trig = _trigger_input(model, key, image, volume, dicom, slices, n_slices, strength, image_size)
    dev = model.device_description
    progress.log(f"verifying on {len(trig.images)} trigger {'slab' if model.spatial_dims == 3 else 'image'}(s), "
                 f"device {dev}")
    how = dict(samples=samples, seed=seed, in_channels=model.in_channels, batch_size=batch_size,
               device=model.device, device_name=dev, model_sha256=model.sha256, spatial_dims=model.spatial_dims)
    v = verify_query(model, key, trig.images, progress=progress, **how)
    if null_keys:
        v.report.null_keys = null_key_calibration(model, key, v.report.data_module_agreement, trig.for_key,
                                                  null_keys, progress=progress, **how)
    v.report.slices = trig.slices or None
    v.report.source = trig.source
    v.report.model = model.source if given_model else str(model_path)
    with atomic_dir(out_dir) as tmp:
        if trig.volume is not None:
            write_volume_like(lime_volume(v, trig), trig.volume, tmp / "lime_map.nii.gz")
        v.report.seconds["total"] = round(time.monotonic() - t0, 3)
        write_reports(v, tmp)
    return v


def slab_trigger_input(model: SegmentationModel, key: WatermarkKey, path: str | Path | None,
                       image: str | Path | None, slices: str | None, strength: float | None,
                       image_size: tuple[int, int] | None) -> TriggerInput:
    """Trigger slabs (n, D, H, W) for a 3-D model: the key slab, or the key blended into whole slabs of D
    slices of the volume at ``path`` (resampled in plane to the model's size)."""
    from .volume3d import check_roi, key_slab, model_roi, slab_slices

    if image is not None:
        raise InputError("a 3-D model is verified on a volume (--volume or --dicom) or on the key slab, "
                         "not on a 2-D --image")
    if image_size is not None:
        raise InputError("--image-size is for 2-D models: a 3-D model's spec records its ROI [D, H, W]")
    roi = model_roi(model)
    check_roi(roi, key)
    d, h, w = roi
    if path is None:
        return TriggerInput.made(key, lambda k: key_slab(TriggerOverlay(k, h, w), d)[None])
    vol = read_volume(path)
    idx = slab_slices(vol, d, slices, path)
    unit = extract_slices(VERIFY_INTENSITY.apply(vol.array), idx)
    return TriggerInput.made(key, lambda k: _trigger_images(unit, k, (h, w), strength).reshape(-1, d, h, w),
                             volume=vol, slices=idx, source=str(path))


def _trigger_input(model: SegmentationModel, key: WatermarkKey, image: str | Path | None,
                   volume: str | Path | None, dicom: str | Path | None, slices: str | None, n_slices: int,
                   strength: float | None, image_size: tuple[int, int] | None) -> TriggerInput:
    """Trigger images (n, H, W) for a 2-D model."""
    size = model_size(model, image_size)
    check_fits(size[0], size[1], key.grid)
    if volume is not None or dicom is not None:
        return volume_trigger_input(volume if volume is not None else dicom, key, size, slices, n_slices, strength)
    if image is not None:
        return image_trigger_input(image, key, size, strength, channels=model.in_channels)
    return TriggerInput.made(key, lambda k: TriggerOverlay(k, *size).key_image()[None])
