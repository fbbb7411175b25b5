"""Soft-decision (Chase) decoding of the attribution grid: the least certain data modules are flipped when the
thresholded grid does not decode; the evidence (agreement, p-value) never counts the flips. Real decoders."""

from __future__ import annotations

import numpy as np

from StealthMarkLib.key import create_key
from StealthMarkLib.qr import decode, function_mask
from StealthMarkLib.verify import CHASE_MAX_FLIPS, chase_decode


def _errors_until_decode_fails(key, rng):
    tmpl, grid = key.qr, key.modules().copy()
    data = np.flatnonzero(~function_mask(tmpl))
    flipped = []
    for idx in rng.permutation(data):
        grid.flat[idx] = ~grid.flat[idx]
        flipped.append(int(idx))
        if not decode(grid, tmpl).ok:
            return grid, flipped
    raise AssertionError("the grid never stopped decoding")


def test_flipping_the_least_certain_modules_recovers_the_payload():
    key = create_key("SM:BENCH-0001", seed=1)
    for trial in range(3):
        grid, flipped = _errors_until_decode_fails(key, np.random.default_rng(trial))
        certainty = np.ones(grid.shape)
        certainty.flat[flipped[-CHASE_MAX_FLIPS:]] = 0.01    # the attribution was unsure about these
        result, flips = chase_decode(grid, certainty, key.qr)
        assert result.text == key.payload and 1 <= flips <= CHASE_MAX_FLIPS


def test_certain_errors_are_not_searched():
    key = create_key("SM:BENCH-0001", seed=1)
    grid, flipped = _errors_until_decode_fails(key, np.random.default_rng(0))
    certainty = np.ones(grid.shape)
    certainty.flat[flipped] = 5.0                           # the wrong modules look certain: nothing to find
    result, flips = chase_decode(grid, certainty, key.qr)
    assert result.text is None and flips is None


def test_a_clean_grid_decodes_without_flips():
    key = create_key("SM:BENCH-0001", seed=1)
    result, flips = chase_decode(key.modules(), np.ones(key.modules().shape), key.qr)
    assert result.text == key.payload and flips == 0


def test_random_grids_never_decode():
    key = create_key("SM:BENCH-0001", seed=1)
    rng = np.random.default_rng(5)
    for _ in range(10):
        grid = rng.random(key.modules().shape) < 0.5
        result, flips = chase_decode(grid, rng.random(grid.shape), key.qr)
        assert result.text is None and flips is None
