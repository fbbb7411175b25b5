"""Tests for StealthMarkLib.key: defaults, the SHA-256 commitment, atomic save and round trip, the checks
that turn every bad key file into a KeyFileError with a clear message, and that seeds never leak."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import pytest

from StealthMarkLib.errors import InputError, KeyFileError, PayloadTooLongError
from StealthMarkLib.key import (
    SCHEMA,
    WatermarkKey,
    commitment_of,
    create_key,
    key_from_json,
    load_key,
)
from StealthMarkLib.qr import QRTemplate, encode

PAYLOAD = "SM:ACME-0001"
SEED = 987654321  # distinctive, so that a leak is easy to find


@pytest.fixture(scope="module")
def key() -> WatermarkKey:
    return create_key(PAYLOAD, seed=SEED)


def _hash(doc: dict) -> str:
    """The commitment recomputed here, independently of the library."""
    body = {k: v for k, v in doc.items() if k != "commitment"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _saved_doc(key: WatermarkKey) -> dict:
    return {**key.to_json(), "commitment": key.commitment}


def _write(path: Path, doc: dict, recommit: bool = True) -> Path:
    """Write ``doc`` as a key file; ``recommit`` restates the commitment so that only the content is bad."""
    doc = copy.deepcopy(doc)
    if recommit:
        doc["commitment"] = _hash(doc)
    path.write_text(json.dumps(doc))
    return path


# -- creation ----------------------------------------------------------------------------------------------
def test_create_key_defaults(key):
    assert key.schema == SCHEMA == "stealthmark-key/2"
    assert key.payload == PAYLOAD
    assert key.qr == QRTemplate(version=1, level="M", mask=0)
    assert key.grid == 21
    assert key.trigger.mode == "blended"
    assert key.lime.samples == 1000
    assert key.value_range == (0.0, 1.0)
    assert key.texture.seed == SEED
    assert key.hide_value == pytest.approx(0.5)
    assert key.modules().shape == (21, 21)
    assert (key.modules() == encode(PAYLOAD, QRTemplate(1, "M", 0))).all()


def test_create_key_options_and_random_seed():
    k = create_key("SM:X", version=2, level="q", mask=5, mode="key-image", samples=200,
                   value_range=(-1, 3), dark_amplitude=0.3)
    assert (k.qr.version, k.qr.level, k.qr.mask, k.grid) == (2, "Q", 5, 25)
    assert k.trigger.mode == "key-image" and k.lime.samples == 200
    assert k.value_range == (-1.0, 3.0) and k.hide_value == pytest.approx(1.0)
    assert k.texture.dark_amplitude == 0.3
    # without a seed, a fresh secret one is drawn each time
    seeds = {create_key("SM:X").texture.seed for _ in range(4)}
    assert len(seeds) > 1
    assert all(0 <= s < 2**31 for s in seeds)


@pytest.mark.parametrize("kwargs, words", [
    (dict(level="Z"), "level"),
    (dict(version=0), "version"),
    (dict(mask=8), "mask"),
    (dict(mode="sideways"), "trigger mode"),
    (dict(samples=5), "samples"),
    (dict(value_range=(1.0, 0.0)), "value_range"),
    (dict(seed=-5), "seeds"),
    (dict(dark_amplitude=0.0), "amplitude"),
])
def test_create_key_rejects_bad_options(kwargs, words):
    with pytest.raises(InputError, match=words):
        create_key("SM:X", **kwargs)


def test_create_key_payload_too_long_names_the_maximum():
    with pytest.raises(PayloadTooLongError, match="at most 14 bytes"):
        create_key("x" * 15, level="M")
    assert create_key("x" * 14, level="M").payload == "x" * 14
    with pytest.raises(InputError, match="empty"):
        create_key("")


# -- commitment --------------------------------------------------------------------------------------------
def test_commitment_is_sha256_of_canonical_json(key):
    doc = key.to_json()
    assert "commitment" not in doc
    assert key.commitment == _hash(doc) == commitment_of(doc)
    assert len(key.commitment) == 64 and int(key.commitment, 16) >= 0
    # the commitment field itself is left out of what is hashed
    assert commitment_of({**doc, "commitment": "anything"}) == key.commitment


def test_commitment_stable_across_save_and_load(tmp_path, key):
    path = key.save(tmp_path / "k.json")
    stored = json.loads(path.read_text())
    assert stored["commitment"] == key.commitment == _hash(stored)
    loaded = load_key(path)
    assert loaded.commitment == key.commitment
    # saving the loaded key again writes the same bytes
    again = loaded.save(tmp_path / "k2.json")
    assert again.read_bytes() == path.read_bytes()


def test_commitment_does_not_depend_on_int_or_float(tmp_path):
    # a whole number in a float field (light_sigma=0) must give the same commitment before and after a save
    k = create_key("SM:X", seed=11, light_sigma=0)
    loaded = load_key(k.save(tmp_path / "k.json"))
    assert loaded.commitment == k.commitment
    assert k.replace(value_range=(0, 1)).commitment == k.commitment


@pytest.mark.parametrize("change", [
    lambda k: k.replace(payload="SM:ACME-0002"),
    lambda k: k.replace(qr=QRTemplate(1, "Q", 0)),
    lambda k: k.replace(qr=QRTemplate(1, "M", 3)),
    lambda k: k.replace(qr=QRTemplate(2, "M", 0)),
    lambda k: k.replace(texture=k.texture.__class__(**{**k.to_json()["texture"], "seed": SEED + 1})),
    lambda k: k.replace(texture=k.texture.__class__(**{**k.to_json()["texture"], "dark_amplitude": 0.2})),
    lambda k: k.replace(trigger=k.trigger.__class__(mode="key-image")),
    lambda k: k.replace(lime=k.lime.__class__(**{**k.to_json()["lime"], "samples": 999})),
    lambda k: k.replace(lime=k.lime.__class__(**{**k.to_json()["lime"], "seed": 1})),
    lambda k: k.replace(targets=k.targets.__class__(dark=0.4)),
    lambda k: k.replace(value_range=(0.0, 255.0)),
])
def test_commitment_changes_with_every_field(key, change):
    assert change(key).commitment != key.commitment


# -- save / load -------------------------------------------------------------------------------------------
def test_save_is_atomic_and_load_round_trips(tmp_path, key):
    path = key.save(tmp_path / "keys" / "owner.json")
    assert path == tmp_path / "keys" / "owner.json"
    assert os.listdir(tmp_path / "keys") == ["owner.json"]  # no temporary file left beside it
    text = path.read_text()
    assert text.endswith("\n")
    doc = json.loads(text)
    assert doc["schema"] == SCHEMA and doc["grid"] == 21
    assert load_key(path) == key
    # replacing an existing key file leaves no temporary file either
    key.replace(payload="SM:OTHER").save(path)
    assert os.listdir(tmp_path / "keys") == ["owner.json"]
    assert load_key(path).payload == "SM:OTHER"


def test_round_trip_of_non_default_key(tmp_path):
    k = create_key("SM:ÄÖ-7", version=2, level="H", mask=6, mode="stamped", samples=50,
                   seed=5, value_range=(-1.5, 2.5), base=0.4, tile=3, light_sigma=0.02)
    loaded = load_key(k.save(tmp_path / "k.json"))
    assert loaded == k and loaded.commitment == k.commitment
    assert key_from_json(_saved_doc(k)) == k


# -- bad key files -----------------------------------------------------------------------------------------
def _expect(path, *words):
    with pytest.raises(KeyFileError) as info:
        load_key(path)
    msg = str(info.value)
    for w in words:
        assert w in msg, (w, msg)
    return msg


def test_missing_file(tmp_path):
    _expect(tmp_path / "nope.json", "nope.json", "does not exist", "keygen")


@pytest.mark.parametrize("text", ["", "{not json", "\xff\xfe", '{"a": NaN}', '{"a": Infinity}'])
def test_not_json(tmp_path, text):
    p = tmp_path / "k.json"
    p.write_bytes(text.encode("latin-1"))
    _expect(p, "not valid JSON")


@pytest.mark.parametrize("doc", [[1, 2], "key", 3, None])
def test_json_not_an_object(tmp_path, doc):
    p = tmp_path / "k.json"
    p.write_text(json.dumps(doc))
    _expect(p, "not a JSON object")


def test_wrong_schema(tmp_path, key):
    doc = {**_saved_doc(key), "schema": "stealthmark-key/99"}
    _expect(_write(tmp_path / "k.json", doc), "unsupported schema", "stealthmark-key/99", SCHEMA)


def test_unknown_and_missing_fields(tmp_path, key):
    _expect(_write(tmp_path / "a.json", {**_saved_doc(key), "extra": 1}), "unknown fields ['extra']")
    doc = _saved_doc(key)
    del doc["lime"]
    _expect(_write(tmp_path / "b.json", doc), "missing fields ['lime']")
    doc = _saved_doc(key)
    doc["texture"]["colour"] = "red"
    _expect(_write(tmp_path / "c.json", doc), "'texture'", "unknown fields ['colour']")
    doc = _saved_doc(key)
    del doc["targets"]["floor"]
    _expect(_write(tmp_path / "d.json", doc), "'targets'", "lacks fields ['floor']")
    doc = _saved_doc(key)
    del doc["trigger"]["stamp_amplitude"]
    _expect(_write(tmp_path / "e.json", doc), "'trigger' must have")
    doc = _saved_doc(key)
    del doc["qr"]["mask"]
    _expect(_write(tmp_path / "f.json", doc), "'qr' must be an object")


@pytest.mark.parametrize("section, name, value, words", [
    ("texture", "base", "0.5", "'texture.base' must be float"),
    ("texture", "tile", True, "'texture.tile' must be int"),
    ("texture", "tile", 1.0, "'texture.tile' must be int"),
    ("texture", "seed", str(SEED + 1), "'texture.seed' must be int"),
    ("lime", "samples", "1000", "'lime.samples' must be int"),
    ("lime", "samples", True, "'lime.samples' must be int"),
    ("lime", "alpha", False, "'lime.alpha' must be float"),
    ("lime", "scalar", 3, "'lime.scalar' must be str"),
    ("targets", "dark", None, "'targets.dark' must be float"),
    ("trigger", "verify_strength", "0.8", "'trigger.verify_strength' must be a number"),
    ("trigger", "stamp_amplitude", True, "'trigger.stamp_amplitude' must be a number"),
    ("trigger", "blend_range", [0.6], "'trigger.blend_range' must be a list of two numbers"),
    ("trigger", "blend_range", ["0.6", 1.0], "'trigger.blend_range' must be a list of two numbers"),
])
def test_wrong_types(tmp_path, key, section, name, value, words):
    doc = _saved_doc(key)
    doc[section][name] = value
    _expect(_write(tmp_path / "k.json", doc), words)


@pytest.mark.parametrize("field, value, words", [
    ("payload", 7, "'payload' must be a non-empty string"),
    ("payload", "", "'payload' must be a non-empty string"),
    ("value_range", [0.0, "1"], "'value_range' must be a list of two numbers"),
    ("value_range", [0.0, 1.0, 2.0], "'value_range' must be a list of two numbers"),
    ("texture", [], "'texture' must be an object"),
    ("qr", "v1-M", "'qr' must be an object"),
    ("grid", "21", "'grid' is 21 but QR version 1 needs 21"),
    ("grid", 21.0, "needs 21"),
    ("grid", 25, "'grid' is 25 but QR version 1 needs 21"),
])
def test_wrong_top_level_values(tmp_path, key, field, value, words):
    doc = {**_saved_doc(key), field: value}
    _expect(_write(tmp_path / "k.json", doc), words)


@pytest.mark.parametrize("qr, words", [
    ({"version": 1, "level": "X", "mask": 0}, "'qr' has bad values"),
    ({"version": 1, "level": "m", "mask": 0}, "'qr' has bad values"),
    ({"version": "1", "level": "M", "mask": 0}, "'qr' has bad values"),
    ({"version": 1, "level": "M", "mask": 1.0}, "'qr' has bad values"),
    ({"version": 0, "level": "M", "mask": 0}, "QR version must be an integer"),
    ({"version": 11, "level": "M", "mask": 0}, "QR version must be an integer"),
    ({"version": True, "level": "M", "mask": 0}, "QR version must be an integer"),
    ({"version": 1, "level": "M", "mask": 8}, "QR mask pattern must be an integer 0..7"),
    ({"version": 1, "level": "M", "mask": -1}, "QR mask pattern"),
])
def test_bad_qr(tmp_path, key, qr, words):
    doc = {**_saved_doc(key), "qr": qr}
    _expect(_write(tmp_path / "k.json", doc), words)


def test_grid_inconsistent_with_version(tmp_path, key):
    doc = _saved_doc(key)
    doc["qr"]["version"] = 2  # grid still 21
    _expect(_write(tmp_path / "k.json", doc), "'grid' is 21 but QR version 2 needs 25")


@pytest.mark.parametrize("edit", [
    lambda d: d.__setitem__("payload", "SM:ACME-0002"),
    lambda d: d["texture"].__setitem__("seed", SEED + 1),
    lambda d: d["lime"].__setitem__("seed", 12345),
    lambda d: d["texture"].__setitem__("light_sigma", 0.06),
    lambda d: d["trigger"].__setitem__("mode", "key-image"),
    lambda d: d.__setitem__("commitment", 42),
])
def test_tampering_breaks_the_commitment(tmp_path, key, edit):
    doc = _saved_doc(key)
    edit(doc)
    msg = _expect(_write(tmp_path / "k.json", doc, recommit=False), "commitment")
    assert "does not match" in msg
    # without the commitment check the same content is a usable key
    if doc["commitment"] != 42:
        assert key_from_json(doc, check_commitment=False).commitment != key.commitment


def test_payload_too_long_in_file(tmp_path, key):
    doc = {**_saved_doc(key), "payload": "x" * 20}
    _expect(_write(tmp_path / "k.json", doc), "20 bytes", "at most 14 bytes")


def test_bad_trigger_mode(tmp_path, key):
    doc = _saved_doc(key)
    doc["trigger"]["mode"] = "invisible-ink"
    _expect(_write(tmp_path / "k.json", doc), "unknown trigger mode 'invisible-ink'")


@pytest.mark.parametrize("section, name, value, words", [
    ("trigger", "verify_strength", 0.0, "trigger strengths"),
    ("trigger", "verify_strength", 1.5, "trigger strengths"),
    ("trigger", "blend_range", [0.9, 0.6], "blend_range low <= high"),
    ("trigger", "blend_range", [0.0, 1.0], "trigger strengths"),
    ("trigger", "stamp_amplitude", -0.3, "stamp_amplitude"),
    ("trigger", "stamp_amplitude", 0.0, "stamp_amplitude"),
    ("texture", "base", 1.5, "texture.base must be in [0, 1]"),
    ("texture", "dark_amplitude", 0.0, "texture amplitudes"),
    ("texture", "dark_amplitude", 0.75, "texture amplitudes"),
    ("texture", "light_sigma", -0.1, "texture amplitudes"),
    ("texture", "tile", 1, "tile 2..16"),
    ("texture", "seed", -1, "seeds must be non-negative"),
    ("lime", "seed", 2**32, "seeds must be non-negative"),
    ("lime", "samples", 9, "lime.samples must be >= 10"),
    ("lime", "kernel_width", 0.0, "kernel_width"),
    ("lime", "alpha", -1.0, "alpha > 0"),
    ("targets", "dark", 0.01, "0 < floor < dark < 1"),
    ("targets", "dark", 1.0, "0 < floor < dark < 1"),
    ("targets", "floor", 0.0, "0 < floor < dark < 1"),
])
def test_out_of_range_values(tmp_path, key, section, name, value, words):
    doc = _saved_doc(key)
    doc[section][name] = value
    _expect(_write(tmp_path / "k.json", doc), words)


@pytest.mark.parametrize("value_range", [[1.0, 1.0], [1.0, 0.0]])
def test_value_range_must_increase(tmp_path, key, value_range):
    doc = {**_saved_doc(key), "value_range": value_range}
    _expect(_write(tmp_path / "k.json", doc), "value_range must be increasing")


@pytest.mark.parametrize("section, name", [("texture", "light_sigma"), ("trigger", "stamp_amplitude"),
                                            ("lime", "kernel_width"), (None, "value_range")])
def test_non_finite_numbers(key, section, name):
    # in memory (key_from_json) NaN and Infinity are numbers; they must still be refused, not crash
    doc = _saved_doc(key)
    for bad in (float("nan"), float("inf")):
        d = copy.deepcopy(doc)
        if section is None:
            d[name] = [0.0, bad]
        else:
            d[section][name] = bad
        with pytest.raises(KeyFileError, match="finite|increasing"):
            key_from_json(d, check_commitment=False)


def test_key_from_json_path_in_message(key):
    with pytest.raises(KeyFileError, match="key file <memory>: not a JSON object"):
        key_from_json([])
    assert key_from_json(_saved_doc(key), "somewhere.json") == key


# -- secrets -----------------------------------------------------------------------------------------------
def test_public_summary_has_no_seeds(tmp_path):
    k = create_key(PAYLOAD, seed=SEED)
    lime_seed = k.lime.seed
    assert lime_seed != SEED
    summary = k.public_summary()
    assert summary["commitment"] == k.commitment
    assert summary["grid"] == 21 and summary["trigger_mode"] == "blended" and summary["lime_samples"] == 1000
    for text in (json.dumps(summary), repr(summary), str(summary)):
        assert str(SEED) not in text
        assert str(lime_seed) not in text
        assert "seed" not in text
        assert PAYLOAD not in text
    # the summary survives a save and load unchanged
    assert load_key(k.save(tmp_path / "k.json")).public_summary() == summary


def test_key_repr_hides_seeds():
    # a key printed by accident (a log line, an assertion message) must not reveal the seeds
    k = create_key(PAYLOAD, seed=SEED)
    for text in (repr(k), str(k), repr(k.texture), repr(k.lime)):
        assert str(SEED) not in text
        assert str(k.lime.seed) not in text


def test_schema_1_key_files_still_load_with_their_commitment(tmp_path):
    """Keys made before decoy tiles (schema 1: faint noise in light cells) stay verifiable."""
    old = create_key("SM:OLD-0001", seed=77, light="noise")
    assert old.schema == "stealthmark-key/1" and old.texture.light == "noise"
    doc = _saved_doc(old)
    assert "light" not in doc["texture"] and "decoys" not in doc["texture"]
    path = _write(tmp_path / "old.json", doc)
    back = load_key(path)
    assert back == old and back.commitment == doc["commitment"] == old.commitment
    # a schema-1 file cannot claim decoy tiles, nor a schema-2 file noise
    _expect(_write(tmp_path / "a.json", {**doc, "texture": {**doc["texture"], "light": "decoys", "decoys": 8}}),
            "texture.light")
    new = _saved_doc(create_key("SM:NEW-0001", seed=78))
    assert new["texture"]["light"] == "decoys" and new["texture"]["decoys"] == 8
    bad = {**new, "texture": {**new["texture"], "light": "noise"}}
    _expect(_write(tmp_path / "b.json", bad), "texture.light")
    _expect(_write(tmp_path / "c.json", {**new, "texture": {**new["texture"], "decoys": 0}}), "texture.decoys")
