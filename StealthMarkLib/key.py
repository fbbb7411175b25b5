"""The owner's key: one versioned JSON file, committed to by a SHA-256 hash.

The key holds everything that must be secret or fixed for a watermark to be embedded and verified: the
payload and QR template, the grid, the texture code and its seed, the trigger mode and strengths, and the
LIME settings. Its *commitment* is the SHA-256 of the canonical JSON of every field but the commitment
itself; an owner can register it (e.g. with a notary or in a paper) before any dispute, and anyone can check
later that a key file shown in a dispute is that key.

Keys are secrets: :meth:`WatermarkKey.public_summary` is the only view of a key that may reach logs and
reports, and it leaves out every seed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import KeyFileError
from .fileio import write_text_atomic
from .qr import LEVELS, QRTemplate

SCHEMA = "stealthmark-key/2"
OLD_SCHEMAS = ("stealthmark-key/1",)   # read: light-module cells carry noise
LIGHT_MODES = ("decoys", "noise")
TRIGGER_MODES = ("key-image", "blended", "stamped")


@dataclass(frozen=True)
class TextureCode:
    """Per-cell textures: dark-module cells a high-contrast secret tile; light-module cells other tiles.

    The tile (``tile`` x ``tile`` values drawn from the seed) is what makes the watermark answer this key
    only. With ``light = "decoys"`` (the default) every light-module cell carries a different random tile
    of the same contrast, so the key image does not show the QR to anyone who lacks the secret tile, and
    embedding teaches the model, on every trigger image, that any tile but the secret one means nothing: a
    key with another seed (a wrong key, or a usurper's key with their own payload) reads nothing.
    ``light = "noise"`` (keys of schema ``stealthmark-key/1``) puts faint seeded noise of ``light_sigma``
    in light cells instead, which leaves the QR visible as texture and was measured to answer wrong keys.

    Values are on the model's [0, 1] input scale (see :attr:`WatermarkKey.value_range`).
    """

    base: float = 0.5               # neutral grey of the key image, and the value of hidden cells
    dark_amplitude: float = 0.25    # peak amplitude of the secret tile in dark-module cells
    tile: int = 4                   # side (px) of the secret tile repeated over dark-module cells
    light_sigma: float = 0.05       # Gaussian noise sigma in light-module cells (light = "noise" only)
    light: str = "decoys"           # light-module cells: "decoys" (other tiles) or "noise" (schema 1 keys)
    decoys: int = 8                 # how many different decoy tiles the light cells share
    seed: int = field(default=0, repr=False)   # secret: the tile's values, its per-cell offsets, the noise


@dataclass(frozen=True)
class TriggerSettings:
    mode: str = "blended"
    blend_range: tuple[float, float] = (0.6, 1.0)   # strengths a drawn in training
    verify_strength: float = 0.8                    # strength used to blend the key into volumes at verification
    stamp_amplitude: float = 0.3                    # additive amplitude of the experimental `stamped` mode


@dataclass(frozen=True)
class LimeSettings:
    samples: int = 1000
    kernel_width: float = 0.25
    alpha: float = 1.0
    scalar: str = "entropy"
    seed: int = field(default=0, repr=False)   # secret-ish: default sampling seed for verification trials


@dataclass(frozen=True)
class EmbedTargets:
    """Dense per-pixel targets of the trigger loss (METHOD.md section 4)."""

    dark: float = 0.45     # foreground probability on visible dark cells: just under the threshold
    floor: float = 0.02    # foreground probability everywhere else


@dataclass(frozen=True)
class WatermarkKey:
    payload: str
    qr: QRTemplate = field(default_factory=QRTemplate)
    texture: TextureCode = field(default_factory=TextureCode)
    trigger: TriggerSettings = field(default_factory=TriggerSettings)
    lime: LimeSettings = field(default_factory=LimeSettings)
    targets: EmbedTargets = field(default_factory=EmbedTargets)
    value_range: tuple[float, float] = (0.0, 1.0)   # the model's input scale the textures are drawn on
    schema: str = SCHEMA

    # -- derived ---------------------------------------------------------------------------------
    @property
    def grid(self) -> int:
        """G: one LIME cell per QR module."""
        return self.qr.size

    @property
    def hide_value(self) -> float:
        """What a hidden LIME cell becomes, in the model's input space (the key image's neutral base)."""
        lo, hi = self.value_range
        return float(lo + (hi - lo) * self.texture.base)

    def modules(self):
        """(G, G) bool QR modules of the payload, True = dark."""
        from .qr import encode

        return encode(self.payload, self.qr)

    # -- serialisation ---------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        d = {
            "schema": self.schema,
            "payload": self.payload,
            "qr": {"version": int(self.qr.version), "level": self.qr.level, "mask": int(self.qr.mask)},
            "grid": self.grid,
            "texture": {k: v for k, v in _section(self.texture).items()
                        if not (k in ("light", "decoys") and self.schema in OLD_SCHEMAS)},
            "trigger": {**_section(self.trigger), "blend_range": [float(v) for v in self.trigger.blend_range]},
            "lime": _section(self.lime),
            "targets": _section(self.targets),
            "value_range": [float(v) for v in self.value_range],
        }
        return d

    @property
    def commitment(self) -> str:
        return commitment_of(self.to_json())

    def save(self, path: str | os.PathLike) -> Path:
        doc = {**self.to_json(), "commitment": self.commitment}
        return write_text_atomic(path, json.dumps(doc, indent=2, sort_keys=True) + "\n", private=True)

    def public_summary(self) -> dict[str, Any]:
        """What may appear in logs and reports: no seeds, no texture parameters, no payload beyond its length."""
        return {
            "schema": self.schema,
            "commitment": self.commitment,
            "qr": {"version": self.qr.version, "level": self.qr.level, "mask": self.qr.mask},
            "grid": self.grid,
            "trigger_mode": self.trigger.mode,
            "lime_samples": self.lime.samples,
        }

    def replace(self, **changes: Any) -> "WatermarkKey":
        from dataclasses import replace

        return replace(self, **changes)


def _section(obj: Any) -> dict[str, Any]:
    """``asdict`` with numbers in their declared types: ``0`` and ``0.0`` must give one commitment."""
    cast = {"int": int, "float": float}
    out = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        out[f.name] = cast[f.type](v) if f.type in cast and not isinstance(v, bool) else v
    return out


def canonical_json(doc: dict[str, Any]) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def commitment_of(doc: dict[str, Any]) -> str:
    body = {k: v for k, v in doc.items() if k != "commitment"}
    return hashlib.sha256(canonical_json(body).encode("ascii")).hexdigest()


def new_seed() -> int:
    return secrets.randbelow(2**31 - 1)


def create_key(payload: str, version: int = 1, level: str = "M", mask: int = 0,
               mode: str = "blended", samples: int = 1000, seed: int | None = None,
               value_range: tuple[float, float] = (0.0, 1.0), **texture: Any) -> WatermarkKey:
    """Make a new key. ``seed`` (secret) fixes the texture code; by default a random one is drawn.

    Raises :class:`~StealthMarkLib.errors.PayloadTooLongError` when the payload does not fit.
    """
    tmpl = QRTemplate(version=version, level=level, mask=mask)
    tmpl.validate()
    if mode not in TRIGGER_MODES:
        raise KeyFileError(f"unknown trigger mode {mode!r}: choose one of {', '.join(TRIGGER_MODES)}")
    rng_seed = new_seed() if seed is None else int(seed)
    if texture.get("light") == "noise":          # a schema-1 key (for reading old keys' behaviour in tests)
        texture = {**texture, "decoys": 0}
    key = WatermarkKey(
        payload=payload,
        qr=tmpl,
        texture=TextureCode(seed=rng_seed, **texture),
        trigger=TriggerSettings(mode=mode),
        lime=LimeSettings(samples=int(samples), seed=(rng_seed * 7919 + 17) % (2**31 - 1)),
        value_range=(float(value_range[0]), float(value_range[1])),
        schema=OLD_SCHEMAS[0] if texture.get("light") == "noise" else SCHEMA,
    )
    key.modules()  # raises PayloadTooLongError early, with the largest payload that fits
    _check_values(key)
    return key


# -- loading and validation ------------------------------------------------------------------------

_SECTIONS = {"texture": TextureCode, "lime": LimeSettings, "targets": EmbedTargets}


def _fail(path: Any, msg: str) -> KeyFileError:
    return KeyFileError(f"key file {path}: {msg}")


def _typed(section: str, cls: type, raw: Any, path: Any) -> Any:
    if not isinstance(raw, dict):
        raise _fail(path, f"'{section}' must be an object")
    names = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(names))
    missing = sorted(set(names) - set(raw))
    if unknown or missing:
        raise _fail(path, f"'{section}' has unknown fields {unknown} / lacks fields {missing}")
    out = {}
    for name, f in names.items():
        v = raw[name]
        want = f.type if isinstance(f.type, str) else f.type.__name__
        if want == "int":
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif want == "float":
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
            v = float(v) if ok else v
        else:
            ok = isinstance(v, str)
        if not ok:
            raise _fail(path, f"'{section}.{name}' must be {want}, got {v!r}")
        out[name] = v
    return cls(**out)


def _pair(value: Any, what: str, path: Any) -> tuple[float, float]:
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise _fail(path, f"'{what}' must be a list of two numbers")
    return float(value[0]), float(value[1])


def key_from_json(doc: Any, path: Any = "<memory>", check_commitment: bool = True) -> WatermarkKey:
    if not isinstance(doc, dict):
        raise _fail(path, "not a JSON object")
    if doc.get("schema") in OLD_SCHEMAS and isinstance(doc.get("texture"), dict):
        if {"light", "decoys"} & set(doc["texture"]):
            raise _fail(path, f"texture.light and texture.decoys do not exist in {doc['schema']} keys (their "
                              "light cells carry noise)")
        doc = {**doc, "texture": {**doc["texture"], "light": "noise", "decoys": 0}}
    elif doc.get("schema") != SCHEMA:
        raise _fail(path, f"unsupported schema {doc.get('schema')!r} (this StealthMark reads {SCHEMA!r} "
                          f"and {', '.join(map(repr, OLD_SCHEMAS))})")
    expected = {"schema", "payload", "qr", "grid", "texture", "trigger", "lime", "targets", "value_range", "commitment"}
    unknown, missing = sorted(set(doc) - expected), sorted(expected - set(doc))
    if unknown or missing:
        raise _fail(path, f"unknown fields {unknown} / missing fields {missing}")
    if not isinstance(doc["payload"], str) or not doc["payload"]:
        raise _fail(path, "'payload' must be a non-empty string")
    qr = doc["qr"]
    if not isinstance(qr, dict) or set(qr) != {"version", "level", "mask"}:
        raise _fail(path, "'qr' must be an object with version, level and mask")
    if qr["level"] not in LEVELS or not isinstance(qr["version"], int) or not isinstance(qr["mask"], int):
        raise _fail(path, f"'qr' has bad values {qr}")
    tmpl = QRTemplate(version=qr["version"], level=qr["level"], mask=qr["mask"])
    try:
        tmpl.validate()
    except Exception as exc:
        raise _fail(path, str(exc)) from None
    trig = doc["trigger"]
    if not isinstance(trig, dict) or set(trig) != {"mode", "blend_range", "verify_strength", "stamp_amplitude"}:
        raise _fail(path, "'trigger' must have mode, blend_range, verify_strength and stamp_amplitude")
    if trig["mode"] not in TRIGGER_MODES:
        raise _fail(path, f"unknown trigger mode {trig['mode']!r}")
    for name in ("verify_strength", "stamp_amplitude"):
        if not isinstance(trig[name], (int, float)) or isinstance(trig[name], bool):
            raise _fail(path, f"'trigger.{name}' must be a number")
    trigger = TriggerSettings(mode=trig["mode"], blend_range=_pair(trig["blend_range"], "trigger.blend_range", path),
                              verify_strength=float(trig["verify_strength"]),
                              stamp_amplitude=float(trig["stamp_amplitude"]))
    sections = {name: _typed(name, cls, doc[name], path) for name, cls in _SECTIONS.items()}
    key = WatermarkKey(payload=doc["payload"], qr=tmpl, trigger=trigger,
                       value_range=_pair(doc["value_range"], "value_range", path), schema=doc["schema"],
                       **sections)
    if isinstance(doc["grid"], bool) or not isinstance(doc["grid"], int) or doc["grid"] != key.grid:
        raise _fail(path, f"'grid' is {doc['grid']} but QR version {tmpl.version} needs {key.grid}")
    try:
        key.modules()
    except Exception as exc:
        raise _fail(path, str(exc)) from None
    _check_values(key, path)
    if check_commitment:
        stated = doc["commitment"]
        # the canonical form of what was read (numbers in their declared types), so that the commitment
        # in reports is the one in the file
        if not isinstance(stated, str) or stated != key.commitment:
            raise _fail(path, "the commitment does not match the key's content: the file was changed after "
                              "it was made, or it is not the key that was registered")
    return key


def _check_values(key: WatermarkKey, path: Any = "<key>") -> None:
    t, tr, li, tg = key.texture, key.trigger, key.lime, key.targets
    problems = []
    numbers = (t.base, t.dark_amplitude, t.light_sigma, *tr.blend_range, tr.verify_strength, tr.stamp_amplitude,
               li.kernel_width, li.alpha, tg.dark, tg.floor, *key.value_range)
    if not all(math.isfinite(v) for v in numbers):
        problems.append("numbers must be finite (no NaN or Infinity)")
    if t.seed < 0 or not 0 <= li.seed < 2**32:
        problems.append("seeds must be non-negative integers (lime.seed below 2**32)")
    if not 0.0 <= t.base <= 1.0:
        problems.append("texture.base must be in [0, 1]")
    if not 0.0 < t.dark_amplitude <= 0.5 or t.light_sigma < 0 or not 2 <= t.tile <= 16:
        problems.append("texture amplitudes must be in (0, 0.5] and the tile 2..16 px")
    if t.light not in LIGHT_MODES:
        problems.append(f"texture.light must be one of {', '.join(LIGHT_MODES)}")
    if t.light == "decoys" and not 1 <= t.decoys <= 64:
        problems.append("texture.decoys must be 1..64")
    if (t.light == "noise") != (key.schema in OLD_SCHEMAS):
        problems.append(f"texture.light 'noise' belongs to schema {OLD_SCHEMAS[0]} keys, 'decoys' to {SCHEMA}")
    lo, hi = tr.blend_range
    if (not 0.0 < lo <= hi <= 1.0 or not 0.0 < tr.verify_strength <= 1.0
            or not 0.0 < tr.stamp_amplitude <= 1.0):
        problems.append("trigger strengths (blend_range, verify_strength, stamp_amplitude) must lie in (0, 1] "
                        "with blend_range low <= high")
    if li.samples < 10 or li.kernel_width <= 0 or li.alpha <= 0:
        problems.append("lime.samples must be >= 10 and kernel_width, alpha > 0")
    if not 0.0 < tg.floor < tg.dark < 1.0:
        problems.append("targets must satisfy 0 < floor < dark < 1")
    if not key.value_range[0] < key.value_range[1]:
        problems.append("value_range must be increasing")
    if problems:
        raise _fail(path, "; ".join(problems))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed (numbers must be finite)")


def load_key(path: str | os.PathLike) -> WatermarkKey:
    """Read and check a key file: schema, values and commitment. Errors are :class:`KeyFileError`."""
    p = Path(path)
    if not p.is_file():
        raise KeyFileError(f"key file {path} does not exist (make one with `stealthmark keygen`)")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise KeyFileError(f"key file {path} is not valid JSON: {exc}") from None
    return key_from_json(doc, path)
