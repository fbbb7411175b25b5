"""Training and evaluation data for embedding: annotated slices in the model's input space.

``--data`` may be

- a volume file (NIfTI, NRRD, MHA) or a DICOM series directory, with its label volume given by
  ``--labels`` (or found beside a volume file as ``<name>_label``/``_labels``/``_seg``/``_mask``);
- a folder of volumes with label volumes, either side by side (``case1.nii.gz`` + ``case1_seg.nii.gz``)
  or in ``images/`` and ``labels/`` subfolders under the same names;
- a folder of 2-D PNG/JPEG slices with masks of the same names in ``images/`` and ``masks/`` subfolders.

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

    images: (n, H, W) float32 in [0, 1]; labels: (n, H, W) int64 (0 background, 1 the chosen structure);
    held_out: bool (n,), True for slices kept out of training.
    """

    images: np.ndarray
    labels: np.ndarray
    held_out: np.ndarray
    sources: list[str] = field(default_factory=list)

    @property
    def train(self) -> tuple[np.ndarray, np.ndarray]:
        return self.images[~self.held_out], self.labels[~self.held_out]

    @property
    def test(self) -> tuple[np.ndarray, np.ndarray]:
        return self.images[self.held_out], self.labels[self.held_out]

    def describe(self) -> str:
        return (f"{len(self.images)} annotated slices from {len(self.sources)} source(s): "
                f"{int((~self.held_out).sum())} for training, {int(self.held_out.sum())} held out")


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
    return imgs.astype(np.float32), (labs > 0.5).astype(np.int64), idx


def _png_dataset(folder: Path, size: tuple[int, int]) -> SliceDataset:
    from PIL import Image

    img_dir, mask_dir = folder / "images", folder / "masks"
    files = sorted(f for f in img_dir.iterdir() if f.name.lower().endswith(IMAGE_SUFFIXES))
    masks = {_name_stem(f): f for f in mask_dir.iterdir() if f.name.lower().endswith(IMAGE_SUFFIXES)}
    images, labels, keep = [], [], []
    for i, f in enumerate(files):
        if _name_stem(f) not in masks:
            raise InputError(f"{f} has no mask of the same name in {mask_dir}")
        try:
            im = np.asarray(Image.open(f).convert("L"), dtype=np.float32) / 255.0
            mk = np.asarray(Image.open(masks[_name_stem(f)]).convert("L")) > 127
        except OSError as exc:
            raise InputError(f"cannot read {f} or its mask: {exc}") from None
        if im.shape != mk.shape:
            raise InputError(f"{f} is {im.shape} but its mask is {mk.shape}")
        if mk.any():
            images.append(im), labels.append(mk.astype(np.float32)), keep.append(i)
    if len(images) < 4:
        raise InputError(f"{folder} has {len(images)} images with a non-empty mask; at least 4 are needed")
    imgs = np.clip(np.concatenate([resize_slices(a[None], size) for a in images]), 0.0, 1.0)
    labs = np.concatenate([resize_slices(a[None], size, mode="nearest") for a in labels]) > 0.5
    return SliceDataset(imgs.astype(np.float32), labs.astype(np.int64), held_out_positions(range(len(imgs))),
                        [str(folder)])


def load_dataset(data: str | os.PathLike, size: tuple[int, int], labels: str | os.PathLike | None = None,
                 label: int | str | None = None, intensity: Intensity = DEFAULT_INTENSITY,
                 axis: int = 0) -> SliceDataset:
    """Read ``--data`` (see the module docstring) into a :class:`SliceDataset` at ``size`` (H, W)."""
    data = Path(data)
    if not data.exists():
        raise InputError(f"training data not found: {data}")
    if data.is_dir() and (data / "images").is_dir() and (data / "masks").is_dir():
        return _png_dataset(data, tuple(size))
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
        mask = read_label(lab_path, label, reference=vol)
        imgs, labs, idx = volume_slices(vol, mask, tuple(size), intensity, axis)
        all_i.append(imgs), all_l.append(labs), all_h.append(held_out_positions(idx))
        sources.append(str(img_path))
    ds = SliceDataset(np.concatenate(all_i), np.concatenate(all_l), np.concatenate(all_h), sources)
    if len(ds.images) < 4 or ds.held_out.sum() == 0 or (~ds.held_out).sum() < 2:
        raise InputError(f"{data} gives {len(ds.images)} annotated slices; embedding needs at least 2 for training "
                         "and 1 held out (at least 17 consecutive annotated slices in one volume)")
    return ds
