"""3-D volumes, label masks and the slices StealthMark feeds to 2-D segmentation models.

A :class:`Volume` holds a voxel array in **KJI order** ``(K, J, I)`` = (slice, row, column), exactly as
``SimpleITK.GetArrayFromImage`` and Slicer's ``arrayFromVolume`` give it, with SimpleITK's geometry
(``spacing`` in I, J, K order, ``origin`` and ``direction`` in LPS). The 3D Slicer module hands volumes
over as such an array plus a 4x4 IJK-to-RAS matrix (:meth:`Volume.from_array`, :attr:`Volume.ijk_to_ras`).

Files are read with SimpleITK: NIfTI, NRRD, MetaImage, or a directory holding one DICOM series.
Every problem a user can cause is raised as :class:`~StealthMarkLib.errors.InputError` naming the path.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .fileio import atomic_path, refuse_overwriting_inputs

__all__ = [
    "Volume",
    "read_volume",
    "read_label",
    "write_volume_like",
    "Intensity",
    "parse_slice_spec",
    "extract_slices",
    "insert_slices",
    "resize_slices",
    "usable_slices",
    "GEOMETRY_TOLERANCE",
    "WRITABLE_SUFFIXES",
]

# LPS (SimpleITK, DICOM) <-> RAS (Slicer, NIfTI): negate the first two world axes.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
GEOMETRY_TOLERANCE = 1e-3
# Single-file formats only: a two-file format (.mhd + .raw, .hdr + .img) cannot be renamed into place atomically.
WRITABLE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


# ---------------------------------------------------------------------------------------------------
# Volume
# ---------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Volume:
    """A 3-D scalar image: a ``(K, J, I)`` float32 array and its SimpleITK geometry.

    ``spacing`` is in (I, J, K) order in mm; ``origin`` (mm) and ``direction`` (9 values, a row-major 3x3
    matrix whose columns are the I, J, K axes) are in LPS, as SimpleITK has them. ``source`` is the file
    or DICOM directory it was read from, if any.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    source: str | None = None

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array, dtype=np.float32)
        if self.array.ndim != 3:
            raise InputError(f"a volume needs a 3-D (K, J, I) array, got shape {self.array.shape}")
        self.spacing = tuple(float(v) for v in self.spacing)  # type: ignore[assignment]
        self.origin = tuple(float(v) for v in self.origin)  # type: ignore[assignment]
        self.direction = tuple(float(v) for v in self.direction)
        if len(self.spacing) != 3 or len(self.origin) != 3 or len(self.direction) != 9:
            raise InputError("a volume needs 3 spacing values, 3 origin values and 9 direction values")
        if not all(math.isfinite(s) and s > 0 for s in self.spacing):
            raise InputError(f"voxel spacing must be positive, got {self.spacing}")
        if self.source is not None:
            self.source = str(self.source)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(K, J, I)``."""
        return tuple(self.array.shape)  # type: ignore[return-value]

    @property
    def ijk_to_ras(self) -> np.ndarray:
        """4x4 matrix mapping a voxel index ``(i, j, k, 1)`` to RAS mm (Slicer's IJKToRAS, nibabel's affine)."""
        lps = np.asarray(self.direction, dtype=np.float64).reshape(3, 3) * np.asarray(self.spacing)[None, :]
        m = np.eye(4)
        m[:3, :3] = _LPS_TO_RAS @ lps
        m[:3, 3] = _LPS_TO_RAS @ np.asarray(self.origin, dtype=np.float64)
        return m

    def to_sitk(self, array: np.ndarray | None = None) -> sitk.Image:
        """A SimpleITK image of ``array`` (default ``self.array``, same shape required) with this geometry."""
        arr = self.array if array is None else np.asarray(array)
        if arr.shape != self.array.shape:
            raise InputError(f"array shape {arr.shape} does not match the volume's shape {self.array.shape}")
        if arr.dtype == np.bool_:
            arr = arr.astype(np.uint8)
        img = sitk.GetImageFromArray(np.ascontiguousarray(arr), isVector=False)
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(self.direction)
        return img

    @classmethod
    def from_sitk(cls, img: sitk.Image, source: str | os.PathLike | None = None) -> "Volume":
        """Wrap a 3-D scalar SimpleITK image (any pixel type; the array becomes float32)."""
        if img.GetDimension() != 3:
            raise InputError(f"a volume must be 3-D, got a {img.GetDimension()}-D image")
        if img.GetNumberOfComponentsPerPixel() != 1:
            raise InputError(
                f"a volume must have one value per voxel, got {img.GetNumberOfComponentsPerPixel()} components"
            )
        arr = sitk.GetArrayViewFromImage(img).astype(np.float32)
        return cls(arr, img.GetSpacing(), img.GetOrigin(), img.GetDirection(), None if source is None else str(source))

    @classmethod
    def from_array(
        cls, array_kji: np.ndarray, ijk_to_ras: np.ndarray, source: str | os.PathLike | None = None
    ) -> "Volume":
        """Build a volume from a ``(K, J, I)`` array and a 4x4 IJK-to-RAS matrix (the inverse of :attr:`ijk_to_ras`)."""
        m = np.asarray(ijk_to_ras, dtype=np.float64)
        if m.shape != (4, 4) or not np.all(np.isfinite(m)):
            raise InputError(f"ijk_to_ras must be a finite 4x4 matrix, got shape {m.shape}")
        lps = _LPS_TO_RAS @ m[:3, :3]
        spacing = np.linalg.norm(lps, axis=0)
        if np.any(spacing <= 0):
            raise InputError(f"ijk_to_ras has a zero-length axis: {m[:3, :3].tolist()}")
        direction = lps / spacing[None, :]
        if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
            raise InputError("ijk_to_ras has sheared (non-orthogonal) axes; only rotations and spacing are supported")
        origin = _LPS_TO_RAS @ m[:3, 3]
        return cls(
            np.asarray(array_kji),
            tuple(spacing.tolist()),
            tuple(origin.tolist()),
            tuple(direction.ravel().tolist()),
            None if source is None else str(source),
        )


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------
def _sitk_reason(exc: BaseException) -> str:
    """The useful part of a SimpleITK exception message (drops the C++ source location)."""
    text = str(exc).strip()
    for marker in ("sitk::ERROR:", "ITK ERROR:", "Description:"):
        if marker in text:
            text = text.rsplit(marker, 1)[1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


@contextlib.contextmanager
def _quiet_itk() -> Iterator[None]:
    """Silence ITK's console warnings (GDCM prints one for every non-DICOM file it looks at)."""
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def _dicom_description(path: str) -> str:
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
        parts = []
        for tag in ("0008|0060", "0008|103e"):
            if reader.HasMetaDataKey(tag):
                parts.append(reader.GetMetaData(tag).strip())
        return " ".join(p for p in parts if p) or "(no description)"
    except RuntimeError:
        return "(unreadable)"


def _read_dicom_dir(path: Path, what: str, series_uid: str | None) -> sitk.Image:
    with _quiet_itk():
        ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)))
    if not ids:
        raise InputError(f"the {what} directory {path} holds no DICOM series")
    if series_uid is not None:
        if series_uid not in ids:
            raise InputError(
                f"the {what} directory {path} has no DICOM series {series_uid}; it holds: " + ", ".join(ids)
            )
        chosen = series_uid
    elif len(ids) > 1:
        lines = []
        with _quiet_itk():
            for sid in ids:
                files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), sid)
                lines.append(f"  {sid}  {_dicom_description(files[0])} ({len(files)} files)")
        listing = "\n".join(lines)
        raise InputError(
            f"the {what} directory {path} holds {len(ids)} DICOM series; choose one with its series UID "
            f"(--series-uid UID, or series_uid=...):\n{listing}"
        )
    else:
        chosen = ids[0]
    with _quiet_itk():
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), chosen)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        try:
            return reader.Execute()
        except RuntimeError as exc:
            raise InputError(f"cannot read the DICOM series {chosen} in {path}: {_sitk_reason(exc)}") from None


def _read_file(path: Path, what: str) -> sitk.Image:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with _quiet_itk():
            reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"cannot read the {what} file {path}: {_sitk_reason(exc)}") from None
    dim, size = reader.GetDimension(), reader.GetSize()
    if dim == 4 and size[3] == 1:
        pass  # a 3-D volume stored with a singleton time axis: taken as 3-D below
    elif dim != 3:
        raise InputError(
            f"the {what} file {path} is a {dim}-D image of size {'x'.join(map(str, size))}; "
            "StealthMark needs a 3-D volume (a single slice may be stored as 3-D with one slice)"
        )
    if reader.GetNumberOfComponents() != 1:
        raise InputError(
            f"the {what} file {path} has {reader.GetNumberOfComponents()} values per voxel (colour or vector "
            "image); StealthMark needs a scalar (grey-value) volume"
        )
    try:
        with _quiet_itk():
            img = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"cannot read the {what} file {path}: {_sitk_reason(exc)}") from None
    if img.GetDimension() == 4:
        img = sitk.Extract(img, list(img.GetSize()[:3]) + [0], [0, 0, 0, 0])
    return img


def _nifti_nonfinite(path: Path) -> int:
    """NaN/Inf voxels in a floating-point NIfTI file.

    ITK's NIfTI reader silently replaces them with 0, so they are counted with nibabel instead.
    """
    if not path.name.lower().endswith((".nii", ".nii.gz", ".hdr", ".img", ".hdr.gz", ".img.gz")):
        return 0
    try:
        import nibabel

        img = nibabel.load(str(path))
        if img.get_data_dtype().kind not in "fc":
            return 0
        data = np.asanyarray(img.dataobj)
        return int(data.size - np.count_nonzero(np.isfinite(data)))
    except Exception:  # noqa: BLE001 - SimpleITK already read the file; nibabel is only a second look
        return 0


def read_volume(path: str | os.PathLike, what: str = "volume", series_uid: str | None = None) -> Volume:
    """Read a 3-D scalar volume: NIfTI (.nii, .nii.gz), NRRD, MetaImage (.mha/.mhd), or a DICOM directory.

    A directory must hold one DICOM series, or ``series_uid`` must pick one. ``what`` names the input in
    error messages ("image", "mask", ...). The array is returned as float32 in (K, J, I) order.

    Raises:
        InputError: missing or unreadable path, a directory without DICOM or with several series, a 2-D,
            4-D or multi-component image, or NaN/Inf voxels.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"the {what} {p} does not exist")
    if p.is_dir():
        img = _read_dicom_dir(p, what, series_uid)
    else:
        if series_uid is not None:
            raise InputError(f"a series UID only selects a series in a DICOM directory, but {p} is a file")
        img = _read_file(p, what)
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"the {what} {p} is not a 3-D scalar volume")
    native = sitk.GetArrayViewFromImage(img)
    bad = 0
    if np.issubdtype(native.dtype, np.floating):
        bad = int(native.size - np.count_nonzero(np.isfinite(native)))
    with np.errstate(over="ignore"):
        arr = native.astype(np.float32)
    if bad == 0:  # float64 values beyond float32's range become Inf on conversion
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if bad == 0 and p.is_file() and np.issubdtype(native.dtype, np.floating):
        bad = _nifti_nonfinite(p)
    if bad:
        raise InputError(
            f"the {what} {p} contains {bad} NaN/Inf voxels; replace them (e.g. with 0) before using it"
        )
    return Volume(arr, img.GetSpacing(), img.GetOrigin(), img.GetDirection(), str(p))


def _format_values(values: np.ndarray, limit: int = 20) -> str:
    shown = [int(v) if float(v).is_integer() else float(v) for v in values[:limit]]
    text = "[" + ", ".join(str(v) for v in shown)
    return text + (f", ... ({len(values)} values)]" if len(values) > limit else "]")


def _geometry_differences(a: Volume, b: Volume, tol: float = GEOMETRY_TOLERANCE) -> list[str]:
    if a.array.shape != b.array.shape:
        return [f"shape (K, J, I) {a.array.shape} vs {b.array.shape}"]
    out = []
    for name in ("spacing", "origin", "direction"):
        va, vb = np.asarray(getattr(a, name)), np.asarray(getattr(b, name))
        if not np.allclose(va, vb, rtol=0.0, atol=tol):
            out.append(f"{name} {tuple(np.round(va, 4).tolist())} vs {tuple(np.round(vb, 4).tolist())}")
    return out


def read_label(
    path_or_volume: str | os.PathLike | Volume,
    label: int | str | None = None,
    reference: Volume | None = None,
) -> np.ndarray:
    """Read a label map as a boolean ``(K, J, I)`` mask.

    ``label``: ``None`` requires a binary file (values {0, 1} or {0, v}); an int (or a string of digits)
    selects that label; ``"any"`` takes every non-zero voxel. With ``reference``, the mask's geometry must
    match it (shape exactly, spacing/origin/direction within ``GEOMETRY_TOLERANCE``).

    Raises:
        InputError: unreadable file, several labels without ``label``, a label that is absent, an empty
            mask, or a geometry that does not match ``reference``.
    """
    vol = path_or_volume if isinstance(path_or_volume, Volume) else read_volume(path_or_volume, what="mask")
    name = vol.source or "mask"
    if reference is not None:
        diffs = _geometry_differences(vol, reference)
        if diffs:
            raise InputError(
                f"the mask {name} does not match the image {reference.source or ''} voxel for voxel: "
                + "; ".join(diffs)
                + " (mask vs image); resample the mask onto the image first"
            )
    arr = vol.array
    if isinstance(label, str):
        text = label.strip().lower()
        if text == "any":
            label = "any"
        elif re.fullmatch(r"[+-]?\d+", text):
            label = int(text)
        else:
            raise InputError(f"--label must be an integer or 'any', got {label!r}")
    elif label is not None and (isinstance(label, bool) or not isinstance(label, (int, np.integer))):
        raise InputError(f"--label must be an integer or 'any', got {label!r}")

    if label == "any":
        mask = arr != 0
    elif label is None:
        values = np.unique(arr)
        labels = values[values != 0]
        if len(labels) > 1:
            raise InputError(
                f"the mask {name} has labels {_format_values(labels)}: choose one with --label N "
                "(or --label any for all non-zero)"
            )
        mask = arr != 0
    else:
        mask = arr == int(label)
        if not mask.any():
            values = np.unique(arr)
            raise InputError(
                f"label {int(label)} is not in the mask {name}; labels present: {_format_values(values[values != 0])}"
            )
    if not mask.any():
        raise InputError(f"the mask {name} is empty (no foreground voxels)")
    return mask


# ---------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------
def write_volume_like(array_kji: np.ndarray, reference: Volume, path: str | os.PathLike) -> Path:
    """Write ``array_kji`` as float32 with ``reference``'s geometry, atomically.

    The format follows the suffix (one of ``WRITABLE_SUFFIXES``). The reference's own file is never
    overwritten; an existing file at ``path`` is replaced only once the new one is complete.
    """
    target = Path(path)
    refuse_overwriting_inputs(target, [reference.source])
    name = target.name.lower()
    if not name.endswith(WRITABLE_SUFFIXES):
        raise InputError(f"cannot write {target}: use one of the suffixes {', '.join(WRITABLE_SUFFIXES)}")
    arr = np.asarray(array_kji)
    if arr.shape != reference.array.shape:
        raise InputError(
            f"cannot write {target}: the array's shape {arr.shape} differs from the reference volume's "
            f"{reference.array.shape} (K, J, I)"
        )
    img = reference.to_sitk(arr.astype(np.float32))
    with atomic_path(target) as tmp:
        try:
            sitk.WriteImage(img, str(tmp), useCompression=not name.endswith(".nii"))
        except RuntimeError as exc:
            raise InputError(f"cannot write {target}: {_sitk_reason(exc)}") from None
    return target


# ---------------------------------------------------------------------------------------------------
# Intensity normalisation
# ---------------------------------------------------------------------------------------------------
_MODES = ("minmax", "percentile")


@dataclass(frozen=True)
class Intensity:
    """Maps raw voxel values into the model's input space [0, 1]: ``clip((x - low) / (high - low), 0, 1)``.

    ``mode="minmax"``: ``low``/``high`` are fixed values (e.g. 0 and 255). ``mode="percentile"``: they are
    percentiles (e.g. 0.5 and 99.5) computed per volume from its finite voxels.
    """

    low: float
    high: float
    mode: str = "minmax"

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise InputError(f"intensity mode must be one of {', '.join(_MODES)}, got {self.mode!r}")
        try:
            low, high = float(self.low), float(self.high)
        except (TypeError, ValueError):
            raise InputError(f"intensity low/high must be numbers, got {self.low!r}, {self.high!r}") from None
        if not (math.isfinite(low) and math.isfinite(high)) or not low < high:
            raise InputError(f"intensity needs finite low < high, got low={self.low}, high={self.high}")
        if self.mode == "percentile" and not (0.0 <= low and high <= 100.0):
            raise InputError(f"percentiles must lie in 0..100, got {low}..{high}")
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)

    def bounds(self, reference_array: np.ndarray) -> tuple[float, float]:
        """The raw values that map to 0 and 1 (``reference_array`` is only used in percentile mode)."""
        if self.mode == "minmax":
            return self.low, self.high
        ref = np.asarray(reference_array, dtype=np.float64)
        ref = ref[np.isfinite(ref)]
        if ref.size == 0:
            raise InputError("cannot compute intensity percentiles of an empty array")
        lo, hi = np.percentile(ref, [self.low, self.high])
        return float(lo), float(hi)

    def apply(self, array: np.ndarray, reference_array: np.ndarray | None = None) -> np.ndarray:
        """``array`` mapped to [0, 1] as float32 (percentile bounds from ``reference_array`` or ``array``)."""
        x = np.asarray(array, dtype=np.float32)
        lo, hi = self.bounds(x if reference_array is None else reference_array)
        if hi <= lo:  # a constant reference: the limit of the ramp is a step at lo
            return (x > lo).astype(np.float32)
        out = (x - np.float32(lo)) / np.float32(hi - lo)
        return np.clip(out, 0.0, 1.0, out=out).astype(np.float32, copy=False)

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "low": self.low, "high": self.high}

    @classmethod
    def from_json(cls, data: dict[str, Any] | str) -> "Intensity":
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as exc:
                raise InputError(f"intensity settings are not valid JSON: {exc}") from None
        if not isinstance(data, dict) or not {"low", "high"} <= set(data):
            raise InputError(f"intensity settings need 'low' and 'high' (and 'mode'), got {data!r}")
        return cls(low=data["low"], high=data["high"], mode=data.get("mode", "minmax"))


# ---------------------------------------------------------------------------------------------------
# Slices
# ---------------------------------------------------------------------------------------------------
_INT = r"\s*\d+\s*"


def parse_slice_spec(spec: str | None, n_slices: int) -> list[int]:
    """Slice indices (sorted, unique) chosen by ``spec`` among ``0..n_slices-1``.

    Forms: ``None``, ``""`` or ``"all"``; an index ``"12"``; a Python-style half-open range ``"10:50"`` or
    ``"10:50:2"`` (``"10:"`` and ``":20"`` too); comma-separated mixtures ``"3,10:20"``. Negative indices
    are not accepted.
    """
    if n_slices < 1:
        raise InputError("the volume has no slices")
    valid = f"valid slices are 0..{n_slices - 1}"
    if spec is None or not str(spec).strip() or str(spec).strip().lower() == "all":
        return list(range(n_slices))
    chosen: set[int] = set()
    for token in str(spec).split(","):
        token = token.strip()
        if re.fullmatch(r"\d+", token):
            k = int(token)
            if k >= n_slices:
                raise InputError(f"slice {k} in {spec!r} is out of range: {valid}")
            chosen.add(k)
            continue
        m = re.fullmatch(r"(\d*)\s*:\s*(\d*)(?:\s*:\s*(\d+))?", token)
        if not m:
            raise InputError(
                f"cannot read the slice choice {spec!r} at {token!r}: use 'all', '12', '10:50', '10:50:2' "
                f"or a comma-separated mixture such as '3,10:20'; {valid}"
            )
        start = int(m.group(1)) if m.group(1) else 0
        stop = int(m.group(2)) if m.group(2) else n_slices
        step = int(m.group(3)) if m.group(3) else 1
        if step < 1:
            raise InputError(f"the step in {token!r} must be at least 1")
        if start >= n_slices or stop > n_slices:
            raise InputError(f"the range {token!r} in {spec!r} is out of range: {valid} (stop may be {n_slices})")
        if start >= stop:
            raise InputError(f"the range {token!r} in {spec!r} selects no slice: {valid}")
        chosen.update(range(start, stop, step))
    return sorted(chosen)


def _as_array(volume: Volume | np.ndarray) -> np.ndarray:
    arr = volume.array if isinstance(volume, Volume) else np.asarray(volume)
    if arr.ndim != 3:
        raise InputError(f"need a 3-D (K, J, I) array, got shape {arr.shape}")
    return arr


def _check_axis(axis: int) -> int:
    if axis not in (0, 1, 2):
        raise InputError(f"axis must be 0 (K), 1 (J) or 2 (I), got {axis}")
    return int(axis)


def _check_indices(indices: Sequence[int], n: int, axis: int) -> np.ndarray:
    idx = np.asarray(list(indices), dtype=np.int64).reshape(-1)
    bad = idx[(idx < 0) | (idx >= n)]
    if bad.size:
        raise InputError(f"slice {int(bad[0])} is out of range along axis {axis}: valid slices are 0..{n - 1}")
    return idx


def extract_slices(volume: Volume | np.ndarray, indices: Sequence[int], axis: int = 0) -> np.ndarray:
    """``(n, H, W)`` float32 stack of the chosen slices along array axis 0 (K), 1 (J) or 2 (I).

    Axis 0 gives ``(J, I)`` slices, axis 1 ``(K, I)``, axis 2 ``(K, J)``; no flip is applied. A bool or
    integer mask array works too.
    """
    arr = _as_array(volume)
    axis = _check_axis(axis)
    idx = _check_indices(indices, arr.shape[axis], axis)
    return np.moveaxis(np.take(arr, idx, axis=axis), axis, 0).astype(np.float32)


def insert_slices(
    array_kji_shape: Sequence[int],
    slices_maps: np.ndarray,
    indices: Sequence[int],
    axis: int = 0,
    fill: float = 0.0,
) -> np.ndarray:
    """Paint ``(n, H, W)`` per-slice maps back into a ``(K, J, I)`` float32 array (inverse of :func:`extract_slices`).

    Voxels of slices not listed in ``indices`` get ``fill``.
    """
    shape = tuple(int(s) for s in array_kji_shape)
    if len(shape) != 3:
        raise InputError(f"need a 3-D (K, J, I) shape, got {shape}")
    axis = _check_axis(axis)
    idx = _check_indices(indices, shape[axis], axis)
    maps = np.asarray(slices_maps, dtype=np.float32)
    want = (len(idx),) + tuple(s for a, s in enumerate(shape) if a != axis)
    if maps.shape != want:
        raise InputError(f"slice maps have shape {maps.shape}, expected {want} for axis {axis} of {shape}")
    out = np.full(shape, fill, dtype=np.float32)
    np.moveaxis(out, axis, 0)[idx] = maps
    return out


def resize_slices(slices: np.ndarray, size: tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """Resize an ``(n, H, W)`` stack to ``size = (H', W')`` as float32.

    ``mode="bilinear"`` (``align_corners=False``) for images; ``mode="nearest"`` for masks and label maps
    (keeps the set of values; uses torch's ``nearest-exact``, which is centred like bilinear).
    """
    import torch
    import torch.nn.functional as F

    arr = np.asarray(slices, dtype=np.float32)
    if arr.ndim != 3:
        raise InputError(f"need an (n, H, W) stack of slices, got shape {arr.shape}")
    h, w = (int(s) for s in size)
    if h < 1 or w < 1:
        raise InputError(f"the target size must be positive, got {size}")
    if mode not in ("bilinear", "nearest"):
        raise InputError(f"resize mode must be 'bilinear' or 'nearest', got {mode!r}")
    if arr.shape[1:] == (h, w):
        return arr.copy()
    if arr.shape[0] == 0:
        return np.zeros((0, h, w), dtype=np.float32)
    t = torch.from_numpy(np.ascontiguousarray(arr))[:, None]
    with torch.no_grad():
        if mode == "bilinear":
            r = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)
        else:
            r = F.interpolate(t, size=(h, w), mode="nearest-exact")
    return r[:, 0].numpy().astype(np.float32, copy=False)


def usable_slices(mask_kji: np.ndarray, axis: int = 0, min_pixels: int = 1) -> list[int]:
    """Indices of the slices along ``axis`` whose mask has at least ``min_pixels`` foreground pixels."""
    arr = _as_array(mask_kji)
    axis = _check_axis(axis)
    other = tuple(a for a in range(3) if a != axis)
    counts = np.count_nonzero(arr, axis=other)
    return [int(k) for k in np.nonzero(counts >= max(int(min_pixels), 1))[0]]
