"""Write a :class:`~StealthMarkLib.volume.Volume` as a DICOM series (one file per K slice).

No multi-file DICOM series ships with any package this project can install, so tests, demos and users'
scripts make one from a NIfTI with :func:`write_dicom_series`; :func:`~StealthMarkLib.volume.read_volume`
reads it back with the same array and geometry.

Pixel data is 16-bit signed. Integer-valued volumes within int16 range are stored as they are; other
integer ranges of at most 65536 values get a rescale intercept; anything else is quantised to 65535 levels
with a rescale slope and intercept (error at most half a slope step).

DICOM cannot store a left-handed voxel grid (the slice normal is always row x column), so a volume whose
direction matrix has a negative determinant is written with its K axis reversed: the same image in space,
read back with the K order flipped and the third direction column negated.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.uid import generate_uid
from pydicom.valuerep import format_number_as_ds

from .errors import InputError
from .fileio import atomic_dir
from .volume import Volume, _sitk_reason

__all__ = ["write_dicom_series"]


def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters)."""
    return str(format_number_as_ds(float(value)))


def _quantise(arr: np.ndarray) -> tuple[np.ndarray, str | None, str | None]:
    """int16 pixel values and the (slope, intercept) DS strings that restore ``arr``; None where not needed."""
    lo, hi = float(arr.min()), float(arr.max())
    if np.array_equal(arr, np.round(arr)):
        if lo >= -32768 and hi <= 32767:
            return arr.astype(np.int16), None, None
        if hi - lo <= 65535:
            intercept = lo + 32768.0
            return (arr.astype(np.float64) - intercept).astype(np.int16), "1", _ds(intercept)
    slope_s = _ds((hi - lo) / 65534.0 * (1 + 1e-9)) if hi > lo else "1"
    intercept_s = _ds((hi + lo) / 2.0)
    slope, intercept = float(slope_s), float(intercept_s)
    stored = np.clip(np.round((arr.astype(np.float64) - intercept) / slope), -32768, 32767)
    return stored.astype(np.int16), slope_s, intercept_s


def write_dicom_series(
    volume: Volume,
    out_dir: str | os.PathLike,
    modality: str = "MR",
    series_description: str = "StealthMark export",
    patient_id: str = "STEALTHMARK-DEMO",
    *,
    patient_name: str = "StealthMark^Demo",
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_number: int = 1,
) -> list[Path]:
    """Write ``volume`` into ``out_dir`` as one DICOM file per K slice; return the paths in slice order.

    The files are written into a temporary directory beside ``out_dir`` and moved in only when all are
    complete. Files of other series already in ``out_dir`` are left alone (file names carry a hash of the
    series UID). ``study_uid`` / ``series_uid`` default to fresh UIDs; pass the same ``study_uid`` to put
    several series in one study.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"cannot write a DICOM series into {out}: it is a file, not a directory")
    modality = str(modality).strip().upper()
    if not re.fullmatch(r"[A-Z0-9_ ]{1,16}", modality):
        raise InputError(f"the DICOM modality must be a short code such as MR or CT, got {modality!r}")

    arr = volume.array
    direction = np.asarray(volume.direction, dtype=np.float64).reshape(3, 3)
    origin = np.asarray(volume.origin, dtype=np.float64)
    spacing = np.asarray(volume.spacing, dtype=np.float64)
    if np.linalg.det(direction) < 0:  # left-handed: write the K axis reversed (see the module docstring)
        origin = origin + direction[:, 2] * spacing[2] * (arr.shape[0] - 1)
        direction = direction.copy()
        direction[:, 2] *= -1
        arr = arr[::-1]
    stored, slope, intercept = _quantise(np.ascontiguousarray(arr))

    img = sitk.GetImageFromArray(stored)
    img.SetSpacing(tuple(spacing.tolist()))
    img.SetOrigin(tuple(origin.tolist()))
    img.SetDirection(tuple(direction.ravel().tolist()))

    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    date, clock = time.strftime("%Y%m%d"), time.strftime("%H%M%S")
    orientation = "\\".join(_ds(v) for v in (*direction[:, 0], *direction[:, 1]))
    shared = {
        "0008|0008": "DERIVED\\SECONDARY",
        "0008|0020": date,
        "0008|0021": date,
        "0008|0030": clock,
        "0008|0031": clock,
        "0008|0060": modality,
        "0008|103e": series_description[:64],
        "0010|0010": patient_name[:64],
        "0010|0020": patient_id[:64],
        "0020|000d": study_uid,
        "0020|000e": series_uid,
        "0020|0011": str(int(series_number)),
        "0020|0052": frame_uid,
        "0020|0037": orientation,
        "0028|0030": f"{_ds(spacing[1])}\\{_ds(spacing[0])}",  # row spacing (J), then column spacing (I)
        "0018|0050": _ds(spacing[2]),
        "0018|0088": _ds(spacing[2]),
    }
    stem = hashlib.sha1(series_uid.encode()).hexdigest()[:8]
    names = [f"{stem}_{k + 1:04d}.dcm" for k in range(stored.shape[0])]

    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()  # keep our study/series UIDs instead of fresh ones per file
    with atomic_dir(out) as tmp:
        for k, name in enumerate(names):
            piece = img[:, :, k]
            for tag, value in shared.items():
                piece.SetMetaData(tag, value)
            piece.SetMetaData("0008|0018", generate_uid())
            piece.SetMetaData("0020|0013", str(k + 1))
            position = img.TransformIndexToPhysicalPoint((0, 0, k))
            piece.SetMetaData("0020|0032", "\\".join(_ds(v) for v in position))
            piece.SetMetaData("0020|1041", _ds(float(np.dot(direction[:, 2], position))))  # slice location
            path = tmp / name
            try:
                writer.SetFileName(str(path))
                writer.Execute(piece)
            except RuntimeError as exc:
                raise InputError(f"cannot write the DICOM series into {out}: {_sitk_reason(exc)}") from None
            if slope is not None:
                # GDCM only writes a fractional slope for float input and then switches to an Enhanced
                # (multi-frame) SOP class; adding the tags afterwards keeps classic single-frame files.
                ds = pydicom.dcmread(path)
                ds.RescaleSlope = slope
                ds.RescaleIntercept = intercept
                ds.RescaleType = "US"
                ds.save_as(path)
    return [out / name for name in names]
