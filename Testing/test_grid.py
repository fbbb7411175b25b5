"""Tests for StealthMarkLib.grid: the G x G cell layout shared by the trigger, the LIME engine and the QR."""

from __future__ import annotations

import numpy as np
import pytest

from StealthMarkLib.errors import InputError
from StealthMarkLib.grid import MIN_PX_PER_CELL, cell_edges, cell_index, cell_means, check_fits, paint_cells

SIZES = [(128, 128), (50, 77), (42, 42), (256, 100), (63, 64)]


@pytest.mark.parametrize("length, g", [(128, 21), (42, 21), (50, 21), (77, 21), (100, 25), (7, 3), (9, 3)])
def test_cell_edges(length, g):
    e = cell_edges(length, g)
    assert e.shape == (g + 1,)
    assert e[0] == 0 and e[-1] == length
    sizes = np.diff(e)
    assert np.all(sizes >= length // g) and np.all(sizes <= -(-length // g))  # near-equal: floor or ceil
    assert sizes.sum() == length
    # edges as documented: floor(i * length / g)
    np.testing.assert_array_equal(e, [int(np.floor(i * length / g)) for i in range(g + 1)])


def test_cell_edges_known():
    np.testing.assert_array_equal(cell_edges(10, 4), [0, 2, 5, 7, 10])
    np.testing.assert_array_equal(cell_edges(6, 3), [0, 2, 4, 6])


@pytest.mark.parametrize("h, w", SIZES)
@pytest.mark.parametrize("g", [21, 25])
def test_cell_index(h, w, g):
    if h < 2 * g or w < 2 * g:
        with pytest.raises(InputError):
            cell_index(h, w, g)
        return
    idx = cell_index(h, w, g)
    assert idx.shape == (h, w) and idx.dtype == np.int64
    ids, counts = np.unique(idx, return_counts=True)
    np.testing.assert_array_equal(ids, np.arange(g * g))          # every id 0..G*G-1 present
    # row-major: id = r * G + c, with r from the row edges and c from the column edges
    re, ce = cell_edges(h, g), cell_edges(w, g)
    for r in (0, g // 2, g - 1):
        for c in (0, g // 3, g - 1):
            block = idx[re[r]:re[r + 1], ce[c]:ce[c + 1]]
            assert np.all(block == r * g + c)
    assert idx[0, 0] == 0 and idx[0, -1] == g - 1 and idx[-1, 0] == (g - 1) * g and idx[-1, -1] == g * g - 1
    # ids grow along rows and down columns
    assert np.all(np.diff(idx, axis=1) >= 0) and np.all(np.diff(idx, axis=0) >= 0)
    # near-equal cells: pixel counts differ by at most one row plus one column
    hs, ws = np.diff(re), np.diff(ce)
    assert hs.max() - hs.min() <= 1 and ws.max() - ws.min() <= 1
    assert counts.min() >= MIN_PX_PER_CELL**2
    assert counts.min() == hs.min() * ws.min() and counts.max() == hs.max() * ws.max()


def test_cell_index_small_known():
    idx = cell_index(4, 6, 2)
    np.testing.assert_array_equal(idx, [[0, 0, 0, 1, 1, 1],
                                        [0, 0, 0, 1, 1, 1],
                                        [2, 2, 2, 3, 3, 3],
                                        [2, 2, 2, 3, 3, 3]])


@pytest.mark.parametrize("h, w", SIZES)
def test_paint_and_means_are_inverse(h, w):
    g = 21
    values = np.random.default_rng(h * w).normal(size=(g, g))
    img = paint_cells(values, h, w)
    assert img.shape == (h, w)
    idx = cell_index(h, w, g)
    np.testing.assert_array_equal(img, values.reshape(-1)[idx])
    np.testing.assert_allclose(cell_means(img, g), values, rtol=0, atol=1e-12)
    # booleans (QR modules) paint too
    mods = values > 0
    painted = paint_cells(mods, h, w)
    assert painted.dtype == bool
    np.testing.assert_array_equal(cell_means(painted.astype(float), g) > 0.5, mods)


def test_cell_means_known():
    img = np.arange(24, dtype=float).reshape(4, 6)
    np.testing.assert_allclose(cell_means(img, 2), [[4.0, 7.0], [16.0, 19.0]])


def test_cell_means_of_texture_cancels():
    # a +/-1 checkerboard with even cells averages to 0 in every cell
    yy, xx = np.mgrid[0:42, 0:42]
    checker = ((yy + xx) % 2) * 2.0 - 1.0
    np.testing.assert_allclose(cell_means(checker, 21), 0.0, atol=1e-12)


def test_check_fits_message():
    check_fits(42, 42, 21)
    check_fits(42, 1000, 21)
    for h, w in [(41, 42), (42, 41), (40, 40), (0, 0)]:
        with pytest.raises(InputError) as info:
            check_fits(h, w, 21)
        msg = str(info.value)
        assert f"({h}x{w})" in msg
        assert "21x21 key grid" in msg
        assert "at least 42x42 pixels" in msg
        assert "2 px per cell" in msg
    with pytest.raises(InputError, match="at least 50x50"):
        check_fits(49, 128, 25)


def test_paint_cells_too_small():
    with pytest.raises(InputError, match="42x42"):
        paint_cells(np.zeros((21, 21)), 30, 30)
