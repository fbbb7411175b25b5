"""Tests for StealthMarkLib.trigger: the key image and its per-cell textures, the blended and stamped
modes, and hiding cells exactly as the LIME engine does (compared through the engine's public behaviour)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from StealthMarkLib.errors import InputError
from StealthMarkLib.grid import cell_index
from StealthMarkLib.key import create_key
from StealthMarkLib.lime_engine import LimeExplainer, sample_masks
from StealthMarkLib.trigger import MAX_DECOY_SIMILARITY, TriggerOverlay, decoy_tiles, secret_tile, shift_similarity

SIZES = [(128, 128), (50, 77), (42, 42)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def key():
    return create_key("SM:ACME-0001", seed=1234)


def _cell_stats(values: np.ndarray, cells: np.ndarray, g: int) -> np.ndarray:
    """(G*G,) standard deviation of ``values`` over each cell."""
    idx = cells.ravel()
    v = values.ravel().astype(np.float64)
    n = np.bincount(idx, minlength=g * g)
    mean = np.bincount(idx, weights=v, minlength=g * g) / n
    sq = np.bincount(idx, weights=v * v, minlength=g * g) / n
    return np.sqrt(np.maximum(sq - mean**2, 0.0))


# -- layout and textures -----------------------------------------------------------------------------------
@pytest.mark.parametrize("h, w", SIZES)
def test_layout(key, h, w):
    ov = TriggerOverlay(key, h, w)
    assert (ov.height, ov.width, ov.grid) == (h, w, 21)
    assert ov.cells.shape == (h, w) and ov.cells.dtype == np.int64
    assert (ov.cells == cell_index(h, w, 21)).all()
    assert (ov.dark_cells == key.modules().reshape(-1)).all()
    assert (ov.dark_pixels() == key.modules().reshape(-1)[ov.cells]).all()
    assert ov.texture.shape == (h, w) and ov.texture.dtype == np.float32
    assert ov.hide_value == key.hide_value == pytest.approx(0.5)


@pytest.mark.parametrize("h, w", SIZES)
def test_key_image_textures(key, h, w):
    ov = TriggerOverlay(key, h, w)
    img = ov.key_image()
    assert img.shape == (h, w) and img.dtype == np.float32
    lo, hi = key.value_range
    assert img.min() >= lo and img.max() <= hi
    std = _cell_stats(img, ov.cells, 21)
    amp = key.texture.dark_amplitude
    # every cell, dark or light, carries a +/- amplitude tile around the base: the key image shows no QR to
    # anyone who lacks the secret tile (std = amplitude up to small cells, which may show one sign)
    np.testing.assert_allclose(np.abs(img - key.texture.base), amp, atol=1e-6)
    assert np.all(std <= amp + 1e-6)
    dark = ov.dark_cells
    assert abs(np.mean(std[dark]) - np.mean(std[~dark])) < 0.1 * amp


@pytest.mark.parametrize("h, w", [(128, 128), (50, 77)])
def test_schema_1_keys_keep_faint_noise_in_light_cells(h, w):
    old = create_key("SM:ACME-0001", seed=1234, light="noise")
    ov = TriggerOverlay(old, h, w)
    img = ov.key_image()
    amp, sigma = old.texture.dark_amplitude, old.texture.light_sigma
    dark_px = ov.dark_pixels()
    np.testing.assert_allclose(np.abs(img[dark_px] - old.texture.base), amp, atol=1e-6)
    assert abs(np.std(img[~dark_px]) - sigma) < 0.25 * sigma
    assert abs(np.mean(img[~dark_px]) - old.texture.base) < 0.01
    assert _cell_stats(img, ov.cells, 21)[~ov.dark_cells].max() < 0.5 * amp


def _tile_fits(ov, c, tile):
    """Offsets at which cell ``c`` of ``ov`` shows ``tile`` (empty when it does not)."""
    n = tile.shape[0]
    ys, xs = np.nonzero(ov.cells == c)
    got = ov.texture[ys, xs] / ov.key.texture.dark_amplitude
    return [(dy, dx) for dy in range(n) for dx in range(n) if np.array_equal(got, tile[(ys + dy) % n, (xs + dx) % n])]


def _canonical(tile: np.ndarray) -> tuple:
    n = tile.shape[0]
    return min(tuple(np.roll(tile, (dy, dx), (0, 1)).ravel()) for dy in range(n) for dx in range(n))


def test_light_cells_carry_decoy_tiles_never_the_secret_one(key):
    ov = TriggerOverlay(key, 128, 128)
    n, amp = key.texture.tile, key.texture.dark_amplitude
    seen = set()
    for c in np.flatnonzero(~ov.dark_cells):
        ys, xs = np.nonzero(ov.cells == c)
        tile = np.full((n, n), np.nan, dtype=np.float32)
        for y, x, v in zip(ys, xs, ov.texture[ys, xs] / amp):
            assert np.isnan(tile[y % n, x % n]) or tile[y % n, x % n] == v, "a light cell is not one repeated tile"
            tile[y % n, x % n] = v
        seen.add(_canonical(tile))
    assert _canonical(ov.tile) not in seen
    assert 1 < len(seen) <= key.texture.decoys


def test_cell_tiles_name_the_tile_each_cell_carries(key):
    """``cell_tiles`` / ``decoy_set`` (what benchmarks/tile_response.py groups attributions by) match the texture."""
    ov = TriggerOverlay(key, 128, 128)
    n, amp = key.texture.tile, key.texture.dark_amplitude
    assert ov.cell_tiles.shape == ov.dark_cells.shape
    assert ((ov.cell_tiles == -1) == ov.dark_cells).all()
    assert len(ov.decoy_set) == key.texture.decoys and set(ov.cell_tiles[~ov.dark_cells]) <= set(range(key.texture.decoys))
    for c in range(ov.grid ** 2):
        ys, xs = np.nonzero(ov.cells == c)
        y0, x0 = ys.min(), xs.min()
        patch = ov.texture[y0:y0 + n, x0:x0 + n] / amp
        expected = ov.tile if ov.cell_tiles[c] == -1 else ov.decoy_set[ov.cell_tiles[c]]
        assert shift_similarity(patch[None], expected)[0] == 1.0, f"cell {c}"


def test_decoy_tiles_are_balanced_and_never_a_shift_of_the_secret():
    secret = secret_tile(9, 4)
    tiles = decoy_tiles(np.random.default_rng(1), 3000, secret)
    assert tiles.shape == (3000, 4, 4) and set(np.unique(tiles)) == {-1.0, 1.0}
    assert (tiles.reshape(3000, -1).sum(1) == 0).all()
    assert shift_similarity(tiles, secret).max() < 1.0
    assert shift_similarity(secret[None], secret)[0] == 1.0
    # near misses (3/4 similar) are kept: wrong keys have them too
    assert (shift_similarity(tiles, secret) == 0.75).any()


def test_dark_cells_carry_the_secret_tile_at_a_seeded_offset(key):
    ov = TriggerOverlay(key, 128, 128)
    n = key.texture.tile
    tile = secret_tile(key.texture.seed, n)
    assert tile.shape == (n, n) and set(np.unique(tile)) == {-1.0, 1.0} and tile.sum() == 0
    offsets = set()
    for c in np.flatnonzero(ov.dark_cells):
        ys, xs = np.nonzero(ov.cells == c)
        got = ov.texture[ys, xs] / key.texture.dark_amplitude
        fits = [(dy, dx) for dy in range(n) for dx in range(n)
                if np.array_equal(got, tile[(ys + dy) % n, (xs + dx) % n])]
        assert fits, f"cell {c} does not show the secret tile"
        offsets.add(fits[0])
    assert len(offsets) > 1          # offsets vary from cell to cell


def test_tile_depends_on_the_seed_and_size():
    assert np.array_equal(secret_tile(5, 4), secret_tile(5, 4))
    assert not np.array_equal(secret_tile(5, 4), secret_tile(6, 4))
    assert secret_tile(5, 3).shape == (3, 3)


def test_decoy_keeps_the_layout_but_not_the_tile(key):
    ov = TriggerOverlay(key, 128, 128)
    d = TriggerOverlay.decoy(key, 128, 128, np.random.default_rng(0))
    assert np.array_equal(d.dark_cells, ov.dark_cells)
    assert not np.array_equal(d.tile, ov.tile)
    assert not np.array_equal(d.texture, ov.texture)


def test_per_cell_decoy_gives_every_cell_its_own_foreign_tile(key):
    ov = TriggerOverlay(key, 128, 128)
    d = TriggerOverlay.decoy(key, 128, 128, np.random.default_rng(0), per_cell=True)
    g2 = key.grid ** 2
    assert d.decoy_set.shape == (g2, key.texture.tile, key.texture.tile)
    assert np.array_equal(d.cell_tiles, np.arange(g2))
    # none of them is (close to) a shift of the key's secret tile; many different tiles
    assert shift_similarity(d.decoy_set, ov.tile).max() < MAX_DECOY_SIMILARITY
    assert len({t.tobytes() for t in d.decoy_set}) > g2 // 2
    # each cell's pixels are its own tile at the texture's contrast
    amp = key.texture.dark_amplitude
    assert set(np.unique(d.texture)) == {-amp, amp}
    cell = 3
    ys, xs = np.nonzero(d.cells == cell)
    patch = d.texture[ys.min():ys.max() + 1, xs.min():xs.max() + 1] / amp
    n = key.texture.tile
    assert any(np.array_equal(patch[:n, :n], np.roll(d.decoy_set[cell], (dy, dx), (0, 1)))
               for dy in range(n) for dx in range(n))
    # the same rng state gives the same decoy
    again = TriggerOverlay.decoy(key, 128, 128, np.random.default_rng(0), per_cell=True)
    np.testing.assert_array_equal(again.texture, d.texture)


def test_texture_is_deterministic_and_seeded(key):
    a = TriggerOverlay(key, 128, 128).texture
    b = TriggerOverlay(create_key("SM:ACME-0001", seed=1234), 128, 128).texture
    np.testing.assert_array_equal(a, b)
    other = TriggerOverlay(create_key("SM:ACME-0001", seed=1235), 128, 128)
    assert not np.array_equal(a, other.texture)
    light = ~other.dark_pixels()
    assert not np.allclose(a[light], other.texture[light])
    # same seed, other payload: other dark cells
    third = TriggerOverlay(create_key("SM:ACME-0002", seed=1234), 128, 128)
    assert not np.array_equal(third.dark_cells, TriggerOverlay(key, 128, 128).dark_cells)


def test_value_range_mapping():
    k = create_key("SM:X", seed=3, value_range=(-1.0, 3.0))
    ov = TriggerOverlay(k, 64, 64)
    img = ov.key_image()
    assert img.min() >= -1.0 and img.max() <= 3.0
    assert ov.hide_value == pytest.approx(1.0)
    np.testing.assert_allclose(np.abs(img[ov.dark_pixels()] - 1.0), 4 * 0.25, atol=1e-5)
    # a bright base is clipped into the range rather than overflowing it
    bright = TriggerOverlay(create_key("SM:X", seed=3, base=0.9, value_range=(0.0, 255.0)), 64, 64)
    img = bright.key_image()
    assert img.max() == pytest.approx(255.0) and img.min() >= 0.0
    assert img[bright.dark_pixels()].max() == pytest.approx(255.0)


# -- trigger modes -----------------------------------------------------------------------------------------
def _images(n, h, w, seed=0, lo=0.0, hi=1.0):
    return np.random.default_rng(seed).uniform(lo, hi, size=(n, h, w)).astype(np.float32)


@pytest.mark.parametrize("h, w", [(128, 128), (50, 77)])
def test_blend_formula(key, h, w):
    ov = TriggerOverlay(key, h, w)
    x = _images(3, h, w)
    k = ov.key_image()
    out = ov.blend(x, 0.7)
    assert out.shape == x.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, 0.3 * x + 0.7 * k, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ov.blend(x, 1.0), np.broadcast_to(k, x.shape), atol=1e-7)
    np.testing.assert_allclose(ov.blend(x, 0.0), x, atol=0)
    # one strength per image, for (n, H, W) and (n, C, H, W)
    a = np.array([0.6, 0.8, 1.0])
    out = ov.blend(x, a)
    for i in range(3):
        np.testing.assert_allclose(out[i], (1 - a[i]) * x[i] + a[i] * k, atol=1e-6)
    x4 = x[:, None]
    out4 = ov.blend(x4, a)
    assert out4.shape == x4.shape
    np.testing.assert_allclose(out4[:, 0], out, atol=1e-7)


def test_stamp_adds_scaled_texture_and_clips(key):
    ov = TriggerOverlay(key, 64, 64)
    x = _images(2, 64, 64, lo=0.2, hi=0.8)
    amp = key.trigger.stamp_amplitude
    out = ov.stamp(x)
    expected = x + amp * ov.texture / key.texture.dark_amplitude
    np.testing.assert_allclose(out, np.clip(expected, 0, 1), atol=1e-6)
    dark = ov.dark_pixels()
    np.testing.assert_allclose(np.abs(out - x)[:, dark & (expected[0] <= 1) & (expected[0] >= 0)
                                               & (expected[1] <= 1) & (expected[1] >= 0)], amp, atol=1e-6)
    # extreme images are clipped to the value range
    for fill in (0.0, 1.0):
        out = ov.stamp(np.full((1, 64, 64), fill, np.float32), amplitude=0.5)
        assert out.min() >= 0.0 and out.max() <= 1.0
    k2 = create_key("SM:X", seed=9, value_range=(-100.0, 400.0))
    ov2 = TriggerOverlay(k2, 64, 64)
    out = ov2.stamp(_images(2, 64, 64, lo=-100, hi=400), amplitude=1.0)
    assert out.min() >= -100.0 and out.max() <= 400.0
    assert (out == -100.0).any() and (out == 400.0).any()
    assert out.dtype == np.float32


def test_apply_modes(key):
    ov = TriggerOverlay(key, 64, 64)
    x = _images(2, 64, 64)
    kimg = ov.key_image()
    for out in (ov.apply(), ov.apply(x, mode="key-image"), ov.apply(None, mode="blended")):
        assert out.shape == (1, 64, 64)
        np.testing.assert_array_equal(out[0], kimg)
    # the key's mode is blended: default strength is the key's verify_strength
    np.testing.assert_allclose(ov.apply(x), ov.blend(x, key.trigger.verify_strength), atol=0)
    np.testing.assert_allclose(ov.apply(x, mode="blended", strength=0.6), ov.blend(x, 0.6), atol=0)
    np.testing.assert_allclose(ov.apply(x, mode="stamped"), ov.stamp(x), atol=0)
    np.testing.assert_allclose(ov.apply(x, mode="stamped", strength=0.1), ov.stamp(x, 0.1), atol=0)
    with pytest.raises(InputError, match="unknown trigger mode 'overlay'.*key-image, blended, stamped"):
        ov.apply(x, mode="overlay")
    # a key whose own mode is key-image ignores the images
    ki = TriggerOverlay(create_key("SM:ACME-0001", seed=1234, mode="key-image"), 64, 64)
    np.testing.assert_array_equal(ki.apply(x), kimg[None])


# -- hiding cells ------------------------------------------------------------------------------------------
def test_hide_sets_hidden_cells_only(key):
    ov = TriggerOverlay(key, 50, 77)
    img = torch.from_numpy(np.stack([ov.key_image(), _images(1, 50, 77)[0]]))[None].repeat(4, 1, 1, 1)
    masks = torch.from_numpy(sample_masks(4, 21 * 21, seed=5))
    out = ov.hide(img, masks)
    assert out.shape == img.shape and out.dtype == img.dtype
    vis_px = masks.numpy()[:, ov.cells].astype(bool)                  # (B, H, W)
    o, i = out.numpy(), img.numpy()
    for b in range(4):
        for c in range(2):
            assert np.all(o[b, c][~vis_px[b]] == np.float32(key.hide_value))
            np.testing.assert_array_equal(o[b, c][vis_px[b]], i[b, c][vis_px[b]])
    np.testing.assert_array_equal(o[0], i[0])  # the first LIME row is all visible


@pytest.mark.parametrize("h, w, channels", [(64, 64, 1), (50, 77, 2)])
def test_hide_matches_lime_engine(h, w, channels):
    k = create_key("SM:X", seed=21, value_range=(-1.0, 2.0))   # hide value 0.5 on this scale
    ov = TriggerOverlay(k, h, w)
    image = torch.from_numpy(np.stack([ov.key_image()] + [_images(1, h, w, seed=c, lo=-1, hi=2)[0]
                                                          for c in range(channels - 1)]))
    seen = []

    def query(batch: torch.Tensor) -> torch.Tensor:
        seen.append(batch.clone())
        p = torch.sigmoid(batch.mean(1, keepdim=True))
        return torch.cat([1 - p, p], dim=1)

    n, seed = 40, 17
    explainer = LimeExplainer(query, grid=21, n_samples=n, hide_value=k.hide_value, batch_size=16)
    att = explainer.attribute(image, seed=seed, keep_masks=True)
    masks = sample_masks(n, 21 * 21, seed)
    np.testing.assert_array_equal(att.masks, masks)
    got = torch.cat(seen)
    assert got.shape == (n, channels, h, w)
    ours = ov.hide(image[None].expand(n, -1, -1, -1), torch.from_numpy(masks))
    torch.testing.assert_close(ours, got, rtol=0, atol=0)
    # and the dense target's pixels are the visible dark ones of the same masks
    vd = ov.visible_dark(torch.from_numpy(masks))
    assert vd.shape == (n, h, w) and vd.dtype == torch.bool
    expected = masks[:, ov.cells].astype(bool) & ov.dark_pixels()[None]
    np.testing.assert_array_equal(vd.numpy(), expected)
    assert vd[0].numpy().sum() == ov.dark_pixels().sum()


def test_visible_dark_edge_cases(key):
    ov = TriggerOverlay(key, 42, 42)
    none = torch.zeros(2, 441, dtype=torch.uint8)
    assert not ov.visible_dark(none).any()
    allv = torch.ones(2, 441, dtype=torch.bool)
    np.testing.assert_array_equal(ov.visible_dark(allv)[1].numpy(), ov.dark_pixels())
    # hiding everything gives a flat image at the hide value
    img = torch.from_numpy(ov.key_image())[None, None]
    assert torch.all(ov.hide(img, none[:1]) == key.hide_value)


# -- bad input ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("h, w", [(40, 40), (41, 128), (128, 41)])
def test_too_small_image(key, h, w):
    with pytest.raises(InputError, match=r"42x42"):
        TriggerOverlay(key, h, w)


def test_minimum_size_fits(key):
    TriggerOverlay(key, 42, 42)
    with pytest.raises(InputError, match=r"50x50"):
        TriggerOverlay(create_key("SM:X", version=2, seed=1), 48, 64)   # grid 25 needs 50x50


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_images(key, bad):
    ov = TriggerOverlay(key, 64, 64)
    x = _images(2, 64, 64)
    x[1, 3, 4] = bad
    with pytest.raises(InputError, match="NaN or Inf"):
        ov.blend(x, 0.8)
    with pytest.raises(InputError, match="NaN or Inf"):
        ov.stamp(x)
    with pytest.raises(InputError, match="NaN or Inf"):
        ov.apply(x, mode="blended")


def test_wrong_image_size(key):
    ov = TriggerOverlay(key, 64, 64)
    with pytest.raises(InputError, match="64x64"):
        ov.blend(_images(1, 64, 65), 0.8)


def test_hide_rejects_wrong_shapes(key):
    ov = TriggerOverlay(key, 64, 64)
    masks = torch.ones(3, 441, dtype=torch.uint8)
    img = torch.zeros(3, 64, 64)
    with pytest.raises(InputError, match=r"\(B, C, 64, 64\)"):
        ov.hide(img, masks)                       # no channel axis: would broadcast to (3, 3, 64, 64)
    with pytest.raises(InputError, match="441"):
        ov.hide(img[:, None], torch.ones(3, 400))
    with pytest.raises(InputError):
        ov.hide(torch.zeros(2, 1, 64, 64), masks)  # batch sizes that do not match
    # one image under many masks, or one mask over many images, broadcast as torch.where does
    assert ov.hide(img[:1, None], masks).shape == (3, 1, 64, 64)
    assert ov.hide(img[:, None], masks[:1]).shape == (3, 1, 64, 64)
