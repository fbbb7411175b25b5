"""QR codec for the watermark: encode a payload, know the function modules, repair, render and decode.

A QR symbol of version ``v`` is a G x G grid of modules (``G = 17 + 4 v``); one module is one LIME cell.
Grids are ``(G, G)`` bool arrays, ``True`` = dark module, row-major, without quiet zone.

The verifier's grid is noisy, so the function modules (finders, separators, timing, alignment, format and
version information, the dark module) are known from the :class:`QRTemplate` and replaced before decoding
(:func:`repair`): only the data and error-correction modules carry information, and Reed-Solomon repairs
those. The template fixes the mask so that the format bits are known too.

Example::

    >>> t = QRTemplate(version=1, level="M", mask=0)
    >>> grid = encode("SM:ACME-0001", t)           # (21, 21) bool
    >>> decode(grid, t).text
    'SM:ACME-0001'
"""

from __future__ import annotations

import importlib
import logging
import numbers
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import InputError, PayloadTooLongError

__all__ = [
    "LEVELS",
    "QRTemplate",
    "encode",
    "function_mask",
    "function_modules",
    "repair",
    "render",
    "save_png",
    "DecodeResult",
    "available_decoders",
    "decode",
    "module_agreement",
]

logger = logging.getLogger(__name__)

LEVELS = ("L", "M", "Q", "H")
MAX_VERSION = 10
DECODERS = ("zxing-cpp", "pyzbar")

# Two-bit error-correction indicator of the format information (ISO/IEC 18004 table 12; L=01 M=00 Q=11 H=10).
_EC_BITS = {"L": 1, "M": 0, "Q": 3, "H": 2}

# Data codewords per version 1..10 (ISO/IEC 18004 table 7); capacity follows from it.
_DATA_CODEWORDS = {
    "L": (19, 34, 55, 80, 108, 136, 156, 194, 232, 274),
    "M": (16, 28, 44, 64, 86, 108, 124, 154, 182, 216),
    "Q": (13, 22, 34, 48, 62, 76, 88, 110, 132, 154),
    "H": (9, 16, 26, 36, 46, 60, 66, 86, 100, 122),
}

# Alignment pattern centre coordinates per version (ISO/IEC 18004 annex E); version 1 has none.
_ALIGNMENT_CENTRES = {
    1: (),
    2: (6, 18),
    3: (6, 22),
    4: (6, 26),
    5: (6, 30),
    6: (6, 34),
    7: (6, 22, 38),
    8: (6, 24, 42),
    9: (6, 26, 46),
    10: (6, 28, 50),
}

_FORMAT_GENERATOR = 0b10100110111  # BCH(15, 5) generator
_FORMAT_XOR = 0b101010000010010  # format mask so the format bits are never all zero
_VERSION_GENERATOR = 0b1111100100101  # BCH(18, 6) generator


# --------------------------------------------------------------------------------------------- template


@dataclass(frozen=True)
class QRTemplate:
    """The public shape of the watermark's QR symbol: version, error-correction level and a fixed mask.

    Args:
        version: QR version 1..10 (G = 17 + 4 * version modules a side).
        level: error-correction level, one of ``LEVELS`` (case-insensitive).
        mask: mask pattern 0..7. Fixed, so that the format information (a function module) is known.
    """

    version: int = 1
    level: str = "M"
    mask: int = 0

    def __post_init__(self) -> None:
        # Accept "m" as well as "M" without making the dataclass mutable.
        if isinstance(self.level, str):
            object.__setattr__(self, "level", self.level.upper())

    @property
    def size(self) -> int:
        """G, the number of modules a side."""
        return 17 + 4 * int(self.version)

    def max_payload(self) -> int:
        """Largest byte-mode payload (in UTF-8 bytes) that fits this version and level."""
        self.validate()
        data_bits = 8 * _DATA_CODEWORDS[self.level][self.version - 1]
        count_bits = 8 if self.version <= 9 else 16  # byte-mode character count indicator
        return (data_bits - 4 - count_bits) // 8

    def validate(self) -> None:
        """Raise :class:`InputError` unless version, level and mask are usable."""
        v = self.version
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 1 <= v <= MAX_VERSION:
            raise InputError(f"QR version must be an integer 1..{MAX_VERSION}, got {v!r}")
        if self.level not in LEVELS:
            raise InputError(f"QR error-correction level must be one of {', '.join(LEVELS)}, got {self.level!r}")
        m = self.mask
        if isinstance(m, bool) or not isinstance(m, numbers.Integral) or not 0 <= m <= 7:
            raise InputError(f"QR mask pattern must be an integer 0..7, got {m!r}")


# --------------------------------------------------------------------------------------------- encoding


def encode(payload: str, template: QRTemplate) -> np.ndarray:
    """Encode ``payload`` (byte mode, UTF-8) as exactly ``template``'s version, level and mask.

    Returns:
        (G, G) bool module grid, ``True`` = dark, no quiet zone.

    Raises:
        InputError: empty payload or bad template.
        PayloadTooLongError: the payload does not fit; the message names the largest length that does.
    """
    import qrcode
    import qrcode.constants
    import qrcode.util

    template.validate()
    if not isinstance(payload, str):
        raise InputError(f"the QR payload must be a string, got {type(payload).__name__}")
    if payload == "":
        raise InputError("the QR payload is empty: give a short owner string such as 'SM:ACME-0001'")
    data = payload.encode("utf-8")
    cap = template.max_payload()
    if len(data) > cap:
        raise PayloadTooLongError(
            f"the payload is {len(data)} bytes (UTF-8) but QR version {template.version} at level "
            f"{template.level} holds at most {cap} bytes: shorten it, choose a higher version or a lower "
            f"error-correction level ({_capacity_hint(template.version, len(data))})"
        )
    ec = {
        "L": qrcode.constants.ERROR_CORRECT_L,
        "M": qrcode.constants.ERROR_CORRECT_M,
        "Q": qrcode.constants.ERROR_CORRECT_Q,
        "H": qrcode.constants.ERROR_CORRECT_H,
    }[template.level]
    qr = qrcode.QRCode(
        version=int(template.version), error_correction=ec, border=0, mask_pattern=int(template.mask)
    )
    # Byte mode always, so capacity and the decoded text do not depend on the payload's characters.
    qr.add_data(qrcode.util.QRData(data, mode=qrcode.util.MODE_8BIT_BYTE), optimize=0)
    qr.make(fit=False)
    grid = np.asarray(qr.get_matrix(), dtype=bool)
    if grid.shape != (template.size, template.size):  # qrcode must not have changed the version
        raise AssertionError(f"qrcode produced a {grid.shape} matrix for version {template.version}")
    return grid


def _capacity_hint(version: int, n_bytes: int) -> str:
    """Say which (version, level) pairs up to MAX_VERSION would hold ``n_bytes``."""
    fits = []
    for level in LEVELS:
        for v in range(1, MAX_VERSION + 1):
            if QRTemplate(v, level).max_payload() >= n_bytes:
                fits.append(f"{level} from version {v}")
                break
    if not fits:
        return f"nothing up to version {MAX_VERSION} holds {n_bytes} bytes"
    return "fits at " + ", ".join(fits)


# ----------------------------------------------------------------------------------- function modules


def _bch(data: int, generator: int) -> int:
    """Append the BCH remainder of ``data`` (polynomial division over GF(2)) to ``data``."""
    g_len = generator.bit_length()
    rem = data << (g_len - 1)
    while rem.bit_length() >= g_len:
        rem ^= generator << (rem.bit_length() - g_len)
    return (data << (g_len - 1)) | rem


def _format_bits(template: QRTemplate) -> int:
    """The 15 format-information bits for this level and mask."""
    return _bch((_EC_BITS[template.level] << 3) | int(template.mask), _FORMAT_GENERATOR) ^ _FORMAT_XOR


def _version_bits(version: int) -> int:
    """The 18 version-information bits (versions >= 7)."""
    return _bch(version, _VERSION_GENERATOR)


def _format_positions(g: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(row, col) of format bit i (0 = least significant) in the two copies."""
    first = []  # around the top-left finder: column 8 going down, then row 8 going left
    for i in range(15):
        if i < 6:
            first.append((i, 8))
        elif i < 8:
            first.append((i + 1, 8))
        elif i == 8:
            first.append((8, 7))
        else:
            first.append((8, 14 - i))
    second = []  # row 8 from the right edge, then column 8 at the bottom
    for i in range(15):
        if i < 8:
            second.append((8, g - 1 - i))
        else:
            second.append((g - 15 + i, 8))
    return first, second


def _build_function(template: QRTemplate) -> tuple[np.ndarray, np.ndarray]:
    """(mask, values) of the function modules, both (G, G) bool."""
    template.validate()
    g = template.size
    mask = np.zeros((g, g), dtype=bool)
    val = np.zeros((g, g), dtype=bool)

    # Finder patterns (7x7) with their one-module light separators.
    finder = np.zeros((7, 7), dtype=bool)
    finder[[0, 6], :] = finder[:, [0, 6]] = True
    finder[2:5, 2:5] = True
    for r0, c0 in ((0, 0), (0, g - 7), (g - 7, 0)):
        rs, cs = slice(max(r0 - 1, 0), min(r0 + 8, g)), slice(max(c0 - 1, 0), min(c0 + 8, g))
        mask[rs, cs] = True
        val[rs, cs] = False
        val[r0 : r0 + 7, c0 : c0 + 7] = finder

    # Timing patterns on row 6 and column 6, dark at even indices.
    idx = np.arange(8, g - 8)
    mask[6, idx] = mask[idx, 6] = True
    val[6, idx] = val[idx, 6] = idx % 2 == 0

    # Alignment patterns (5x5), except where they would overlap a finder.
    centres = _ALIGNMENT_CENTRES[template.version]
    align = np.ones((5, 5), dtype=bool)
    align[1:4, 1:4] = False
    align[2, 2] = True
    last = centres[-1] if centres else None
    for r in centres:
        for c in centres:
            if (r, c) in ((6, 6), (6, last), (last, 6)):
                continue
            mask[r - 2 : r + 3, c - 2 : c + 3] = True
            val[r - 2 : r + 3, c - 2 : c + 3] = align

    # Format information, both copies, plus the always-dark module.
    bits = _format_bits(template)
    for copy in _format_positions(g):
        for i, (r, c) in enumerate(copy):
            mask[r, c] = True
            val[r, c] = bool((bits >> i) & 1)
    mask[g - 8, 8] = val[g - 8, 8] = True

    # Version information (6x3 blocks beside the top-right and bottom-left finders), versions >= 7.
    if template.version >= 7:
        vbits = _version_bits(template.version)
        for i in range(18):
            r, c = i // 3, g - 11 + i % 3
            bit = bool((vbits >> i) & 1)
            mask[r, c] = mask[c, r] = True
            val[r, c] = val[c, r] = bit
    return mask, val


def function_mask(template: QRTemplate) -> np.ndarray:
    """(G, G) bool, ``True`` at the function modules; everything else is a data or error-correction module."""
    return _build_function(template)[0]


def function_modules(template: QRTemplate) -> np.ndarray:
    """(G, G) bool: the correct values of the function modules (``False`` outside :func:`function_mask`)."""
    return _build_function(template)[1]


def _as_grid(modules: np.ndarray, template: QRTemplate | None = None, name: str = "modules") -> np.ndarray:
    """Check a (G, G) grid of booleans or 0/1 values and return it as a new bool array."""
    a = np.asarray(modules)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise InputError(f"{name} must be a square (G, G) module grid, got shape {a.shape}")
    if template is not None and a.shape[0] != template.size:
        raise InputError(
            f"{name} is {a.shape[0]}x{a.shape[1]} but QR version {template.version} has "
            f"{template.size}x{template.size} modules"
        )
    if a.dtype == bool:
        return a.copy()
    if not np.issubdtype(a.dtype, np.number) or not np.isin(a, (0, 1)).all():
        raise InputError(f"{name} must hold booleans or 0/1 values (threshold the scores first)")
    return a.astype(bool)


def repair(modules: np.ndarray, template: QRTemplate) -> np.ndarray:
    """Copy of a (G, G) module grid with every function module set to the template's value."""
    template.validate()
    out = _as_grid(modules, template)
    mask, val = _build_function(template)
    out[mask] = val[mask]
    return out


def module_agreement(observed: np.ndarray, expected: np.ndarray, template: QRTemplate) -> tuple[int, int]:
    """(agreeing, n): how many of the n data + error-correction modules agree between two (G, G) grids."""
    template.validate()
    obs = _as_grid(observed, template, "observed")
    exp = _as_grid(expected, template, "expected")
    data = ~function_mask(template)
    return int((obs == exp)[data].sum()), int(data.sum())


# ------------------------------------------------------------------------------------------- rendering


def render(modules: np.ndarray, px_per_module: int = 8, quiet_zone: int = 4) -> np.ndarray:
    """Draw a module grid as a picture.

    Args:
        modules: (G, G) bool or 0/1 grid, ``True`` = dark.
        px_per_module: pixels a side per module (>= 1).
        quiet_zone: light modules added on every side (the standard asks for 4).

    Returns:
        uint8 (H, W) image with H = W = (G + 2 * quiet_zone) * px_per_module; 0 = dark, 255 = light.
    """
    grid = _as_grid(modules)
    if isinstance(px_per_module, bool) or not isinstance(px_per_module, numbers.Integral) or px_per_module < 1:
        raise InputError(f"px_per_module must be an integer >= 1, got {px_per_module!r}")
    if isinstance(quiet_zone, bool) or not isinstance(quiet_zone, numbers.Integral) or quiet_zone < 0:
        raise InputError(f"quiet_zone must be an integer >= 0, got {quiet_zone!r}")
    padded = np.pad(grid, int(quiet_zone), constant_values=False)
    img = np.where(padded, 0, 255).astype(np.uint8)
    return np.repeat(np.repeat(img, int(px_per_module), axis=0), int(px_per_module), axis=1)


def save_png(modules: np.ndarray, path, px_per_module: int = 8, quiet_zone: int = 4) -> None:
    """Render a module grid (see :func:`render`) and write it as a grayscale PNG, atomically."""
    from PIL import Image

    from .fileio import atomic_path

    img = render(modules, px_per_module=px_per_module, quiet_zone=quiet_zone)
    with atomic_path(path) as tmp:
        Image.fromarray(img, mode="L").save(tmp, format="PNG")


# -------------------------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class DecodeResult:
    """Outcome of :func:`decode`.

    Attributes:
        text: the decoded payload, or ``None``.
        decoder: the decoder that returned it (``"zxing-cpp"`` or ``"pyzbar"``), or ``None``.
        tried: the decoders tried, in order.
    """

    text: str | None
    decoder: str | None
    tried: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.text is not None


# Indirection so tests can simulate a missing library (e.g. pyzbar without libzbar0).
_import_module = importlib.import_module
_PYZBAR_WARNED = False
_UNUSABLE: set[str] = set()  # decoders that failed to import: a failed import is retried slowly every time

_DECODER_MODULES = {"zxing-cpp": "zxingcpp", "pyzbar": "pyzbar.pyzbar"}


def _load(name: str):
    """The decoder's module, or ``None`` when it cannot be imported (pyzbar warns once per process)."""
    global _PYZBAR_WARNED
    if name in _UNUSABLE:
        return None
    try:
        return _import_module(_DECODER_MODULES[name])
    except ImportError as exc:
        _UNUSABLE.add(name)
        if name == "pyzbar" and not _PYZBAR_WARNED:
            _PYZBAR_WARNED = True
            msg = (
                f"pyzbar is not usable ({exc}); it needs the system zbar library, e.g. "
                "`apt-get install --no-install-recommends libzbar0`. Using zxing-cpp alone."
            )
            logger.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
        return None


def available_decoders() -> tuple[str, ...]:
    """The usable QR decoders, in the order :func:`decode` tries them."""
    return tuple(name for name in DECODERS if _load(name) is not None)


def _read_zxing(mod, img: np.ndarray) -> str | None:
    hits = mod.read_barcodes(img, formats=mod.BarcodeFormat.QRCode)
    for hit in hits:
        if hit.valid and hit.text:
            return hit.text
    return None


def _read_pyzbar(mod, img: np.ndarray) -> str | None:
    from PIL import Image

    hits = mod.decode(Image.fromarray(img, mode="L"), symbols=[mod.ZBarSymbol.QRCODE])
    for hit in hits:
        if hit.data:
            return hit.data.decode("utf-8", errors="replace")
    return None


_READERS = {"zxing-cpp": _read_zxing, "pyzbar": _read_pyzbar}


def _is_module_grid(a: np.ndarray) -> bool:
    """A bool array, or a square array of 0/1 values (a rendered picture holds 0/255)."""
    if a.dtype == bool:
        return True
    return a.ndim == 2 and a.shape[0] == a.shape[1] and np.issubdtype(a.dtype, np.number) and bool(
        np.isin(a, (0, 1)).all()
    )


def decode(
    grid_or_image: np.ndarray,
    template: QRTemplate | None = None,
    decoders: Sequence[str] | None = None,
    px_per_module: int = 8,
) -> DecodeResult:
    """Decode a module grid or a rendered picture.

    Args:
        grid_or_image: either a (G, G) bool / 0-1 module grid (``True`` = dark), which is repaired when
            ``template`` is given and rendered with a quiet zone; or a uint8 (H, W) picture (0 = dark),
            decoded as it is. Thresholding noisy scores into a grid is the caller's job.
        template: the key's QR template; used to repair the function modules of a grid.
        decoders: names to try in order (default: :func:`available_decoders`, zxing-cpp first).
            Unusable ones are skipped.
        px_per_module: rendering scale for a grid.

    Returns:
        :class:`DecodeResult`; ``ok`` is False when no decoder found a QR code.

    Raises:
        InputError: an unknown decoder name, no usable decoder, or an array that is neither a grid nor a
            uint8 picture.
    """
    if decoders is None:
        names = DECODERS
    else:
        names = tuple(decoders)
        unknown = [n for n in names if n not in DECODERS]
        if unknown:
            raise InputError(f"unknown QR decoder(s) {unknown}; choose from {', '.join(DECODERS)}")
    loaded = [(n, m) for n in names if (m := _load(n)) is not None]
    if not loaded:
        raise InputError(
            f"no usable QR decoder among {', '.join(names)}: install zxing-cpp (`pip install zxing-cpp`), "
            "or pyzbar with the system zbar library (`apt-get install --no-install-recommends libzbar0`)"
        )

    a = np.asarray(grid_or_image)
    if _is_module_grid(a):
        grid = repair(a, template) if template is not None else _as_grid(a)
        img = render(grid, px_per_module=px_per_module, quiet_zone=4)
    elif a.dtype == np.uint8 and (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3, 4))):
        img = a if a.ndim == 2 else _to_gray(a)
    else:
        raise InputError(
            f"decode needs a (G, G) bool/0-1 module grid or a uint8 (H, W) picture, "
            f"got {a.dtype} with shape {a.shape}"
        )
    img = np.ascontiguousarray(img)

    tried = []
    for name, mod in loaded:
        tried.append(name)
        try:
            text = _READERS[name](mod, img)
        except Exception as exc:  # a decoder crash is a failed attempt, not a verdict
            logger.debug("QR decoder %s failed: %s", name, exc)
            text = None
        if text is not None:
            return DecodeResult(text=text, decoder=name, tried=tuple(tried))
    return DecodeResult(text=None, decoder=None, tried=tuple(tried))


def _to_gray(a: np.ndarray) -> np.ndarray:
    """uint8 (H, W, C) picture to (H, W) gray (alpha ignored)."""
    if a.shape[2] == 1:
        return a[:, :, 0]
    rgb = a[:, :, :3].astype(np.float32)
    return np.clip(rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32) + 0.5, 0, 255).astype(np.uint8)
