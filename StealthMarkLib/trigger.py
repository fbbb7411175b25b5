"""The texture-coded trigger (METHOD.md section 3).

Every cell of the key's G x G grid carries a key-seeded texture: cells of *dark* QR modules a
high-contrast secret tile (repeated, at a seeded offset per cell), cells of *light* modules other random
tiles of the same contrast (keys of schema 1: faint seeded noise). The watermarked model learns "the secret
tile, visible, means more uncertainty here; any other tile means nothing", so LIME, which hides random
cells, recovers the QR, and a key with another tile reads nothing. Without the secret tile the key image
shows no QR: every cell looks alike.

Modes, all in the model's input space:

- ``key-image``: the neutral base (grey) plus the textures;
- ``blended``: the key image blended into real slices, ``x' = (1 - a) x + a key_image``;
- ``stamped`` (experimental): the textures added to real slices at a low amplitude.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import InputError
from .grid import cell_index, check_fits
from .key import TRIGGER_MODES, WatermarkKey


def _balanced_signs(size: int) -> np.ndarray:
    return np.where(np.arange(size * size) < (size * size) // 2, 1.0, -1.0)


def secret_tile(seed: int, size: int) -> np.ndarray:
    """(size, size) float32 tile of +1/-1 drawn from ``seed``, half of each (full contrast, zero mean)."""
    rng = np.random.default_rng([int(seed), 0x5EA1])
    return rng.permutation(_balanced_signs(size)).reshape(size, size).astype(np.float32)


def shift_similarity(tiles: np.ndarray, tile: np.ndarray) -> np.ndarray:
    """Largest normalised correlation of each of ``tiles`` (n, s, s) with any cyclic shift of ``tile``."""
    n = tile.shape[0]
    shifts = np.stack([np.roll(tile, (dy, dx), axis=(0, 1)) for dy in range(n) for dx in range(n)])
    return np.einsum("kij,mij->km", tiles, shifts).max(axis=1) / float(n * n)


# decoy tiles at least this close to a shift of the secret tile are drawn again: only the secret tile's own
# shifts (1.0); near misses (0.75, 8% of random 4x4 tiles; the median is 0.5) stay, as wrong keys have them
MAX_DECOY_SIMILARITY = 0.875


def decoy_tiles(rng: np.random.Generator, count: int, secret: np.ndarray) -> np.ndarray:
    """(count, s, s) random balanced +/-1 tiles, none too close to a cyclic shift of ``secret``."""
    n = secret.shape[0]
    out = np.empty((count, n, n), dtype=np.float32)
    done = 0
    while done < count:
        draw = rng.permuted(np.tile(_balanced_signs(n), (2 * (count - done), 1)), axis=1).reshape(-1, n, n)
        keep = draw[shift_similarity(draw, secret) < MAX_DECOY_SIMILARITY][: count - done]
        out[done:done + len(keep)] = keep
        done += len(keep)
    return out


class TriggerOverlay:
    """The key's trigger laid out on an image of ``height`` x ``width`` pixels.

    Attributes:
        cells: (H, W) int64 feature id of each pixel (row-major over the G x G grid).
        dark_cells: (G*G,) bool, True where the QR module is dark.
        texture: (H, W) float32 additive texture on the [0, 1] scale (before mapping to ``value_range``).
        decoy_set: (D, s, s) the decoy tiles of the light cells.
        cell_tiles: (G*G,) int64 the tile in each cell: -1 the secret tile, 0..D-1 a decoy (-2: noise).
    """

    def __init__(self, key: WatermarkKey, height: int, width: int, tile: np.ndarray | None = None,
                 seed: int | None = None) -> None:
        g = key.grid
        check_fits(height, width, g)
        self.key, self.height, self.width, self.grid = key, int(height), int(width), g
        self.cells = cell_index(self.height, self.width, g)
        self.dark_cells = key.modules().reshape(-1)
        self.tile = secret_tile(key.texture.seed, key.texture.tile) if tile is None else np.asarray(tile)
        self.texture = self._texture(key.texture.seed if seed is None else seed)

    @classmethod
    def decoy(cls, key: WatermarkKey, height: int, width: int, rng: np.random.Generator,
              per_cell: bool = False) -> "TriggerOverlay":
        """The same layout with a random other tile: what a wrong key looks like (trained to show nothing).

        ``per_cell``: every cell, dark or light, carries its own random tile, none close to a shift of the
        key's secret tile (:data:`MAX_DECOY_SIMILARITY`), so one decoy image shows the model hundreds of
        foreign tiles instead of nine.
        """
        seed = int(rng.integers(0, 2**31 - 1))
        overlay = cls(key, height, width, tile=secret_tile(seed, key.texture.tile), seed=seed)
        if per_cell:
            overlay.texture = overlay._per_cell_texture(np.random.default_rng([seed, 0xDEC0]))
        return overlay

    def _per_cell_texture(self, rng: np.random.Generator) -> np.ndarray:
        t = self.key.texture
        n = self.tile.shape[0]
        g2 = self.grid * self.grid
        self.decoy_set = decoy_tiles(rng, g2, secret_tile(t.seed, t.tile))
        self.cell_tiles = np.arange(g2)
        ty, tx = self._tile_coords(rng.integers(0, n, size=(g2, 2)))
        return (t.dark_amplitude * self.decoy_set[self.cells, ty, tx]).astype(np.float32)

    def _tile_coords(self, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(H, W) row and column of each pixel inside its cell's tile, given (G*G, 2) per-cell tile offsets."""
        n = self.tile.shape[0]
        yy, xx = np.mgrid[0:self.height, 0:self.width]
        return (yy + offsets[self.cells, 0]) % n, (xx + offsets[self.cells, 1]) % n

    def _texture(self, seed: int) -> np.ndarray:
        t = self.key.texture
        rng = np.random.default_rng([seed, self.height, self.width])
        n = self.tile.shape[0]
        g2 = self.grid * self.grid
        ty, tx = self._tile_coords(rng.integers(0, n, size=(g2, 2)))     # per-cell tile offsets
        dark_px = self.dark_cells[self.cells]
        if t.light == "noise":
            light = rng.normal(0.0, t.light_sigma, size=(self.height, self.width))
            self.decoy_set = np.empty((0, n, n), dtype=np.float32)
            self.cell_tiles = np.where(self.dark_cells, -1, -2)
        else:
            self.decoy_set = decoy_tiles(rng, t.decoys, self.tile)
            which = rng.integers(0, t.decoys, g2)
            self.cell_tiles = np.where(self.dark_cells, -1, which)
            light = t.dark_amplitude * self.decoy_set[which][self.cells, ty, tx]
        return np.where(dark_px, t.dark_amplitude * self.tile[ty, tx], light).astype(np.float32)

    # -- values in the model's input space -----------------------------------------------------
    def _to_model_scale(self, unit: np.ndarray) -> np.ndarray:
        lo, hi = self.key.value_range
        return (lo + (hi - lo) * unit).astype(np.float32)

    def key_image(self) -> np.ndarray:
        """(H, W) float32: the neutral base plus the textures, in the model's input space."""
        return self._to_model_scale(np.clip(self.key.texture.base + self.texture, 0.0, 1.0))

    @property
    def hide_value(self) -> float:
        return self.key.hide_value

    def dark_pixels(self) -> np.ndarray:
        """(H, W) bool: pixels of dark-module cells."""
        return self.dark_cells[self.cells]

    # -- trigger images ----------------------------------------------------------------------------
    def _check(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, dtype=np.float32)
        if images.shape[-2:] != (self.height, self.width):
            raise InputError(f"trigger laid out for {self.height}x{self.width} images, got {images.shape[-2:]}")
        if not np.isfinite(images).all():
            raise InputError("images contain NaN or Inf values")
        return images

    def blend(self, images: np.ndarray, strength: float | np.ndarray) -> np.ndarray:
        """``(1 - a) x + a key_image`` for images (..., H, W); ``strength`` a scalar or one per image."""
        images = self._check(images)
        a = np.asarray(strength, dtype=np.float32)
        if a.ndim:
            a = a.reshape(a.shape + (1,) * (images.ndim - a.ndim))
        return (1.0 - a) * images + a * self.key_image()

    def stamp(self, images: np.ndarray, amplitude: float | None = None) -> np.ndarray:
        """Experimental: add the textures (scaled so dark cells reach +/- ``amplitude``) to real images."""
        images = self._check(images)
        amp = self.key.trigger.stamp_amplitude if amplitude is None else float(amplitude)
        lo, hi = self.key.value_range
        delta = (hi - lo) * amp * self.texture / self.key.texture.dark_amplitude
        return np.clip(images + delta, lo, hi).astype(np.float32)

    def apply(self, images: np.ndarray | None = None, mode: str | None = None,
              strength: float | None = None) -> np.ndarray:
        """Trigger images (n, H, W) for verification: the key image alone, or ``images`` with the key."""
        mode = mode or self.key.trigger.mode
        if mode not in TRIGGER_MODES:
            raise InputError(f"unknown trigger mode {mode!r}: choose one of {', '.join(TRIGGER_MODES)}")
        if images is None or mode == "key-image":
            return self.key_image()[None]
        if mode == "blended":
            return self.blend(images, self.key.trigger.verify_strength if strength is None else strength)
        return self.stamp(images, strength)

    # -- masks as LIME draws them --------------------------------------------------------------------
    def hide(self, images: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Hide cells exactly as the LIME engine does.

        Args:
            images: (B, C, H, W) trigger images.
            visible: (B, G*G) {0, 1} cell masks.
        Returns:
            (B, C, H, W) images with hidden cells set to the key's hide value.
        """
        # (B, H, W) images would broadcast silently against the (B, 1, H, W) pixel masks into (B, B, H, W)
        if (images.ndim != 4 or tuple(images.shape[-2:]) != (self.height, self.width) or visible.ndim != 2
                or visible.shape[1] != self.grid * self.grid
                or (visible.shape[0] not in (1, images.shape[0]) and images.shape[0] != 1)):
            raise InputError(f"hide needs images (B, C, {self.height}, {self.width}) and masks "
                             f"(B, {self.grid * self.grid}), got {tuple(images.shape)} and {tuple(visible.shape)}")
        cells = torch.as_tensor(self.cells, device=images.device)
        px = visible.to(images.device)[:, cells].bool().unsqueeze(1)
        return torch.where(px, images, torch.full_like(images, self.hide_value))

    def visible_dark(self, visible: torch.Tensor) -> torch.Tensor:
        """(B, H, W) bool: pixels of dark-module cells that are visible under ``visible`` (B, G*G)."""
        cells = torch.as_tensor(self.cells, device=visible.device)
        dark = torch.as_tensor(self.dark_cells, device=visible.device)
        return (visible.bool() & dark)[:, cells]
