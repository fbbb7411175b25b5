"""Training and evaluation data for embedding: annotated slices in the model's input space.

``--data`` may be

- a volume file (NIfTI, NRRD, MHA) or a DICOM series directory, with its label volume given by
  ``--labels`` (or found beside a volume file as ``<name>_label``/``_labels``/``_seg``/``_mask``);
- a folder of volumes with label volumes, either side by side (``case1.nii.gz`` + ``case1_seg.nii.gz``)
  or in ``images/`` and ``labels/`` subfolders under the same names;
- a folder of 2-D PNG/JPEG images with masks of the same names in ``images/`` and ``masks/`` (or
  ``labels/``) subfolders: the layout of public fundus and polyp sets. For a model with 3 input channels
  the images are read as RGB and kept as (n, 3, H, W), each channel mapped to [0, 1] by the model's
  intensity on its own (:func:`channel_intensity`); otherwise they are read as grey.

Multi-class models (K > 2 outputs) with no ``--label``: every label of the masks is kept as a class. Label
values already in 0..K-1 are the classes; otherwise the distinct non-zero values of all masks, sorted,
become classes 1, 2, ... (at most K - 1 of them).

Slices whose mask is not empty are used. Intensities are mapped to [0, 1] per volume (percentiles 0.5 and
99.5 by default, recorded in the model's spec) and slices resized to the model's input size. The split is
fixed: consecutive blocks of 8 slice positions, every third block held out for the harmlessness figures.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import InputError
from .volume import Intensity, Volume, extract_slices, read_label, read_volume, resize_slices, usable_slices

DEFAULT_INTENSITY = Intensity(low=0.5, high=99.5, mode="percentile")
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
LABEL_TAGS = ("_label", "_labels", "_seg", "_mask")


@dataclass
class SliceDataset:
    """Annotated slices ready for a 2-D model.

    images: (n, H, W) float32 in [0, 1], or (n, C, H, W) for colour images; labels: (n, H, W) int64
    (0 background, 1 the chosen structure, or classes 1..K-1); held_out: bool (n,), True for slices kept out
    of training; class_values: for multi-class data, the label value behind each class (0, v1, v2, ...).
    """

    images: np.ndarray
    labels: np.ndarray
    held_out: np.ndarray
    sources: list[str] = field(default_factory=list)
    class_values: list[int] | None = None

    @property
    def train(self) -> tuple[np.ndarray, np.ndarray]:
        return self.images[~self.held_out], self.labels[~self.held_out]

    @property
    def test(self) -> tuple[np.ndarray, np.ndarray]:
        return self.images[self.held_out], self.labels[self.held_out]

    def describe(self) -> str:
        extra = ""
        if self.images.ndim == 4:
            extra += f", {self.images.shape[1]} channels"
        if self.class_values is not None:
            extra += f", classes 0..{len(self.class_values) - 1} from label values {self.class_values}"
        return (f"{len(self.images)} annotated slices from {len(self.sources)} source(s): "
                f"{int((~self.held_out).sum())} for training, {int(self.held_out.sum())} held out{extra}")


def held_out_positions(indices: Sequence[int]) -> np.ndarray:
    """The fixed split: slice positions in blocks of 8, every third block held out."""
    return np.array([(k // 8) % 3 == 2 for k in indices], dtype=bool)


def _name_stem(p: Path) -> str:
    name = p.name
    for suf in VOLUME_SUFFIXES + IMAGE_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return p.stem


def _is_volume_file(p: Path) -> bool:
    return p.is_file() and p.name.lower().endswith(VOLUME_SUFFIXES)


def _label_beside(p: Path) -> Path | None:
    stem = _name_stem(p)
    for f in sorted(p.parent.iterdir()):
        if f != p and _is_volume_file(f) and _name_stem(f) in {stem + t for t in LABEL_TAGS}:
            return f
    return None


def _volume_pairs(folder: Path) -> list[tuple[Path, Path]]:
    img_dir, lab_dir = folder / "images", folder / "labels"
    if img_dir.is_dir() and lab_dir.is_dir():
        pairs = []
        labels = {_name_stem(f): f for f in lab_dir.iterdir() if _is_volume_file(f)}
        for f in sorted(img_dir.iterdir()):
            if _is_volume_file(f):
                if _name_stem(f) not in labels:
                    raise InputError(f"{f} has no label volume of the same name in {lab_dir}")
                pairs.append((f, labels[_name_stem(f)]))
        return pairs
    pairs = []
    for f in sorted(folder.iterdir()):
        if _is_volume_file(f) and not any(_name_stem(f).endswith(t) for t in LABEL_TAGS):
            lab = _label_beside(f)
            if lab is not None:
                pairs.append((f, lab))
    return pairs


def _has_dicom(folder: Path) -> bool:
    for f in list(folder.iterdir())[:50]:
        if f.is_file():
            try:
                with open(f, "rb") as fh:
                    fh.seek(128)
                    if fh.read(4) == b"DICM":
                        return True
            except OSError:
                continue
    return False


def volume_slices(volume: Volume, mask: np.ndarray, size: tuple[int, int], intensity: Intensity,
                  axis: int = 0) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Annotated slices of one volume: images (n, H, W) in [0, 1], labels (n, H, W), slice indices."""
    idx = usable_slices(mask, axis=axis)
    if not idx:
        raise InputError(f"the mask of {volume.source} is empty along axis {axis}")
    norm = intensity.apply(volume.array)
    imgs = extract_slices(norm, idx, axis=axis)
    labs = extract_slices(mask.astype(np.float32), idx, axis=axis)
    if imgs.shape[1:] != tuple(size):
        imgs = np.clip(resize_slices(imgs, tuple(size)), 0.0, 1.0)
        labs = resize_slices(labs, tuple(size), mode="nearest")
    if mask.dtype == bool:
        return imgs.astype(np.float32), (labs > 0.5).astype(np.int64), idx
    return imgs.astype(np.float32), np.rint(labs).astype(np.int64), idx  # a multi-class label map


def channel_intensity(image: np.ndarray, intensity: Intensity) -> np.ndarray:
    """(C, H, W) colour image -> [0, 1] float32, each channel mapped by ``intensity`` on its own
    (percentile bounds per channel)."""
    return np.stack([intensity.apply(ch) for ch in np.asarray(image, dtype=np.float32)])


def _mask_dir(folder: Path) -> Path | None:
    for name in ("masks", "labels"):
        d = folder / name
        if d.is_dir() and any(f.name.lower().endswith(IMAGE_SUFFIXES) for f in d.iterdir()):
            return d
    return None


def _is_png_folder(folder: Path) -> bool:
    img_dir = folder / "images"
    return (folder.is_dir() and img_dir.is_dir() and _mask_dir(folder) is not None
            and any(f.name.lower().endswith(IMAGE_SUFFIXES) for f in img_dir.iterdir()))


def class_map(raw_labels: Sequence[np.ndarray], classes: int, what: str) -> tuple[list[np.ndarray], list[int]]:
    """Integer label maps -> classes 0..K-1 (see the module docstring) and the value behind each class."""
    values = sorted({int(v) for a in raw_labels for v in np.unique(a)} - {0})
    if not values:
        raise InputError(f"the masks of {what} are all empty")
    if values[-1] <= classes - 1:
        return [np.asarray(a, dtype=np.int64) for a in raw_labels], list(range(classes))
    if len(values) > classes - 1:
        raise InputError(f"the masks of {what} hold {len(values)} labels {values}, more than the model's "
                         f"{classes - 1} foreground classes: choose one with --label N")
    lut = {v: i + 1 for i, v in enumerate(values)}
    out = []
    for a in raw_labels:
        m = np.zeros(a.shape, dtype=np.int64)
        for v, c in lut.items():
            m[a == v] = c
        out.append(m)
    return out, [0] + values


def _png_dataset(folder: Path, size: tuple[int, int], channels: int = 1, classes: int = 2,
                 intensity: Intensity | None = None) -> SliceDataset:
    from PIL import Image

    img_dir, mask_dir = folder / "images", _mask_dir(folder)
    if channels not in (1, 3):
        raise InputError(f"image folders feed models with 1 (grey) or 3 (RGB) input channels, not {channels}")
    files = sorted(f for f in img_dir.iterdir() if f.name.lower().endswith(IMAGE_SUFFIXES))
    masks = {_name_stem(f): f for f in mask_dir.iterdir() if f.name.lower().endswith(IMAGE_SUFFIXES)}
    images, labels, keep = [], [], []
    for i, f in enumerate(files):
        if _name_stem(f) not in masks:
            raise InputError(f"{f} has no mask of the same name in {mask_dir}")
        try:
            if channels == 3:
                rgb = np.asarray(Image.open(f).convert("RGB"), dtype=np.float32).transpose(2, 0, 1)
                im = channel_intensity(rgb, intensity) if intensity is not None else rgb / 255.0
            else:
                im = np.asarray(Image.open(f).convert("L"), dtype=np.float32) / 255.0
            raw = np.asarray(Image.open(masks[_name_stem(f)]).convert("L"))
        except OSError as exc:
            raise InputError(f"cannot read {f} or its mask: {exc}") from None
        mk = raw if classes > 2 else (raw > 127)
        if im.shape[-2:] != mk.shape:
            raise InputError(f"{f} is {im.shape[-2:]} but its mask is {mk.shape}")
        if mk.any():
            images.append(im), labels.append(mk), keep.append(i)
    if len(images) < 17:  # the fixed split holds out images 16-23, 40-47, ...
        raise InputError(f"{folder} has {len(images)} images with a non-empty mask; at least 17 are needed "
                         "(16 for training, then held-out ones for the harmlessness figures)")
    values = None
    if classes > 2:
        labels, values = class_map(labels, classes, str(mask_dir))
    resized = []
    for a in images:
        flat = a.reshape(-1, *a.shape[-2:])
        resized.append(np.clip(resize_slices(flat, size), 0.0, 1.0).reshape(a.shape[:-2] + tuple(size)))
    imgs = np.stack(resized)
    labs = np.concatenate([resize_slices(a[None].astype(np.float32), size, mode="nearest") for a in labels])
    labs = np.rint(labs).astype(np.int64) if classes > 2 else (labs > 0.5).astype(np.int64)
    return SliceDataset(imgs.astype(np.float32), labs, held_out_positions(range(len(imgs))), [str(folder)],
                        class_values=values)


def load_dataset(data: str | os.PathLike, size: tuple[int, int], labels: str | os.PathLike | None = None,
                 label: int | str | None = None, intensity: Intensity = DEFAULT_INTENSITY,
                 axis: int = 0, channels: int = 1, classes: int = 2) -> SliceDataset:
    """Read ``--data`` (see the module docstring) into a :class:`SliceDataset` at ``size`` (H, W).

    ``channels``: the model's input channels (3 keeps colour images as RGB); ``classes``: its number of
    classes K (K > 2 with ``label`` None keeps every label of the masks as a class).
    """
    data = Path(data)
    if not data.exists():
        raise InputError(f"training data not found: {data}")
    multi = classes > 2 and label is None
    if _is_png_folder(data):
        return _png_dataset(data, tuple(size), channels=channels, classes=classes if multi else 2,
                            intensity=intensity if channels == 3 else None)
    if labels is not None:
        pairs = [(data, Path(labels))]
    elif data.is_file():
        lab = _label_beside(data)
        if lab is None:
            raise InputError(f"no label volume for {data}: pass --labels FILE (or name it "
                             f"{_name_stem(data)}_label{''.join(data.suffixes)})")
        pairs = [(data, lab)]
    elif _has_dicom(data):
        raise InputError(f"{data} is a DICOM series: pass its label volume with --labels FILE")
    else:
        pairs = _volume_pairs(data)
        if not pairs:
            raise InputError(f"{data} holds no volumes with label volumes ('case.nii.gz' + 'case_seg.nii.gz', "
                             "or images/ and labels/ subfolders), and no images/ + masks/ PNG slices")
    all_i, all_l, all_h, sources = [], [], [], []
    for img_path, lab_path in pairs:
        vol = read_volume(img_path)
        if multi:  # every label a class: the label map itself, after read_label's geometry checks
            lab_vol = read_volume(lab_path, what="mask")
            read_label(lab_vol, "any", reference=vol)
            mask = np.rint(lab_vol.array).astype(np.int64)
        else:
            mask = read_label(lab_path, label, reference=vol)
        imgs, labs, idx = volume_slices(vol, mask, tuple(size), intensity, axis)
        all_i.append(imgs), all_l.append(labs), all_h.append(held_out_positions(idx))
        sources.append(str(img_path))
    values = None
    if multi:
        all_l, values = class_map(all_l, classes, ", ".join(str(p[1]) for p in pairs))
    ds = SliceDataset(np.concatenate(all_i), np.concatenate(all_l), np.concatenate(all_h), sources,
                      class_values=values)
    if len(ds.images) < 4 or ds.held_out.sum() == 0 or (~ds.held_out).sum() < 2:
        raise InputError(f"{data} gives {len(ds.images)} annotated slices; embedding needs at least 2 for training "
                         "and 1 held out (at least 17 consecutive annotated slices in one volume)")
    return ds
