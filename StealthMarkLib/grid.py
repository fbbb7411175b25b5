"""The G x G cell grid shared by the trigger, the LIME engine and the QR codec.

Cell ``(r, c)`` has feature id ``r * G + c`` (row-major, ids 0..G*G-1, as the ``lime`` package wants) and
covers rows ``floor(r * H / G) .. floor((r + 1) * H / G) - 1`` and the same for columns, so an image of
any size >= 2 px per cell is split into near-equal cells aligned to the QR modules.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError

MIN_PX_PER_CELL = 2


def cell_edges(length: int, g: int) -> np.ndarray:
    """Edges (g + 1 integers) splitting ``length`` pixels into ``g`` near-equal cells."""
    return (np.arange(g + 1) * length) // g


def check_fits(height: int, width: int, g: int) -> None:
    """Raise :class:`InputError` unless every cell gets at least ``MIN_PX_PER_CELL`` pixels a side."""
    need = g * MIN_PX_PER_CELL
    if height < need or width < need:
        raise InputError(
            f"the image ({height}x{width}) is too small for a {g}x{g} key grid: "
            f"it needs at least {need}x{need} pixels ({MIN_PX_PER_CELL} px per cell)"
        )


def cell_index(height: int, width: int, g: int) -> np.ndarray:
    """(H, W) int64 map of feature ids, row-major over the G x G grid."""
    check_fits(height, width, g)
    rows = np.repeat(np.arange(g), np.diff(cell_edges(height, g)))
    cols = np.repeat(np.arange(g), np.diff(cell_edges(width, g)))
    return rows[:, None] * g + cols[None, :]


def paint_cells(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """Expand a (G, G) grid of per-cell values to an (H, W) image (each cell filled with its value)."""
    values = np.asarray(values)
    g = values.shape[0]
    return values.reshape(-1)[cell_index(height, width, g)]


def cell_means(image: np.ndarray, g: int) -> np.ndarray:
    """(G, G) mean of a 2-D image over each cell."""
    h, w = image.shape
    idx = cell_index(h, w, g).ravel()
    sums = np.bincount(idx, weights=image.ravel().astype(np.float64), minlength=g * g)
    counts = np.bincount(idx, minlength=g * g)
    return (sums / counts).reshape(g, g)
