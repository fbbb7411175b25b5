"""The bundled sample: a real T1 brain MRI and its brain mask (ITK example data, see ``data/NOTICE``).

``T1.nii.gz`` is 128 x 128 x 62 voxels (I, J, K), 2 x 2 x 3 mm, values 0..255; ``T1_brainmask.nii.gz``
labels the brain 4, 5 and 6 (StealthMark takes any non-zero label as the brain).

The train / held-out split is fixed so that every run, test and benchmark uses the same slices:
the slices (along K, array axis 0) that hold any brain voxel (K = 2..60) are used; a slice ``k`` is
held out when ``(k // 8) % 3 == 2``, i.e. blocks of 8 slices, every third block held out: K = 16..23 and
40..47 (16 slices); the other 43 train. Whole blocks keep neighbouring, near-identical slices on one side.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from .errors import InputError
from .volume import Intensity, Volume, extract_slices, read_label, read_volume, resize_slices, usable_slices

__all__ = [
    "SAMPLE_LABEL",
    "SAMPLE_INTENSITY",
    "SampleSplit",
    "sample_paths",
    "sample_split",
    "load_sample",
]

SAMPLE_LABEL = "any"
SAMPLE_INTENSITY = Intensity(low=0.0, high=255.0, mode="minmax")
_IMAGE, _MASK = "T1.nii.gz", "T1_brainmask.nii.gz"


@dataclass
class SampleSplit:
    """Slice indices along K (array axis 0) of the sample volume used for training and held out."""

    train: list[int]
    held_out: list[int]

    @property
    def slices(self) -> list[int]:
        """All used slices in K order: the rows of :func:`load_sample`'s arrays."""
        return sorted(self.train + self.held_out)

    @property
    def train_rows(self) -> list[int]:
        """Positions of the training slices in :func:`load_sample`'s arrays."""
        row = {k: r for r, k in enumerate(self.slices)}
        return [row[k] for k in self.train]

    @property
    def held_out_rows(self) -> list[int]:
        """Positions of the held-out slices in :func:`load_sample`'s arrays."""
        row = {k: r for r, k in enumerate(self.slices)}
        return [row[k] for k in self.held_out]


def sample_paths() -> tuple[Path, Path]:
    """Paths of the bundled ``(T1.nii.gz, T1_brainmask.nii.gz)``."""
    base = resources.files("StealthMarkLib") / "data"
    paths = []
    for name in (_IMAGE, _MASK):
        p = Path(str(base / name))
        if not p.is_file():
            raise InputError(
                f"the bundled sample file {name} is missing from {p.parent}; reinstall StealthMarkLib "
                "(the sample data ships as package data)"
            )
        paths.append(p)
    return paths[0], paths[1]


def _held_out(k: int) -> bool:
    return (k // 8) % 3 == 2


def _split_from_mask(mask: np.ndarray) -> SampleSplit:
    used = usable_slices(mask, axis=0)
    return SampleSplit(train=[k for k in used if not _held_out(k)], held_out=[k for k in used if _held_out(k)])


def sample_split() -> SampleSplit:
    """The fixed split of the sample's brain slices (see the module docstring)."""
    image_path, mask_path = sample_paths()
    return _split_from_mask(read_label(mask_path, SAMPLE_LABEL))


def load_sample(size: int = 128) -> tuple[np.ndarray, np.ndarray, SampleSplit, Volume]:
    """The sample's brain slices, ready for a 2-D model.

    Returns ``(images, masks, split, volume)``: ``images`` ``(n, size, size)`` float32 in [0, 1]
    (``SAMPLE_INTENSITY``, bilinear resize), ``masks`` ``(n, size, size)`` float32 in {0, 1} (nearest),
    for all ``n`` = 59 slices with brain in K order (``split.slices``; ``split.train_rows`` and
    ``split.held_out_rows`` index these arrays), and the T1 :class:`Volume`.
    """
    size = int(size)
    if size < 1:
        raise InputError(f"the sample size must be positive, got {size}")
    image_path, mask_path = sample_paths()
    volume = read_volume(image_path, what="sample image")
    mask = read_label(mask_path, SAMPLE_LABEL, reference=volume)
    split = _split_from_mask(mask)
    images = SAMPLE_INTENSITY.apply(extract_slices(volume, split.slices))
    masks = extract_slices(mask, split.slices)
    if images.shape[1:] != (size, size):
        images = np.clip(resize_slices(images, (size, size)), 0.0, 1.0)
        masks = resize_slices(masks, (size, size), mode="nearest")
    return images, masks, split, volume
