"""Tests for StealthMarkLib.qr: encoding, function modules, repair, rendering and decoding."""

from __future__ import annotations

import importlib
import warnings

import numpy as np
import pytest
import qrcode

from StealthMarkLib import qr
from StealthMarkLib.errors import InputError, PayloadTooLongError
from StealthMarkLib.qr import QRTemplate

PAYLOAD = "SM:ACME-0001"
DECODERS = qr.available_decoders()

# Total codewords per version 1..10 and remainder bits (ISO/IEC 18004 tables 1 and 9).
TOTAL_CODEWORDS = (26, 44, 70, 100, 134, 172, 196, 242, 292, 346)
REMAINDER_BITS = (0, 7, 7, 7, 7, 7, 0, 0, 0, 0)


@pytest.fixture(autouse=True)
def _fresh_decoder_state(monkeypatch):
    # Each test sees the module's real import state and an unspent "warn once".
    monkeypatch.setattr(qr, "_UNUSABLE", set())
    monkeypatch.setattr(qr, "_PYZBAR_WARNED", False)


def _flip_data_modules(grid, template, n, rng):
    data_idx = np.flatnonzero(~qr.function_mask(template))
    out = grid.copy().ravel()
    out[rng.choice(data_idx, size=n, replace=False)] ^= True
    return out.reshape(grid.shape)


# ------------------------------------------------------------------------------------------ template


def test_template_size_and_defaults():
    t = QRTemplate()
    assert (t.version, t.level, t.mask) == (1, "M", 0)
    assert t.size == 21 and QRTemplate(version=2).size == 25 and QRTemplate(version=10).size == 57
    assert QRTemplate(level="q").level == "Q"


@pytest.mark.parametrize(
    "version,caps", [(1, {"L": 17, "M": 14, "Q": 11, "H": 7}), (2, {"L": 32, "M": 26, "Q": 20, "H": 14})]
)
def test_max_payload(version, caps):
    for level, cap in caps.items():
        assert QRTemplate(version, level).max_payload() == cap


@pytest.mark.parametrize("version", range(1, 11))
@pytest.mark.parametrize("level", qr.LEVELS)
def test_max_payload_fits_exactly(version, level):
    t = QRTemplate(version, level, mask=3)
    cap = t.max_payload()
    assert qr.encode("x" * cap, t).shape == (t.size, t.size)
    with pytest.raises(PayloadTooLongError):
        qr.encode("x" * (cap + 1), t)


def test_payload_too_long_message_names_max():
    t = QRTemplate(1, "Q")
    with pytest.raises(PayloadTooLongError) as err:
        qr.encode("x" * 12, t)
    msg = str(err.value)
    assert "11" in msg and "higher version" in msg and "lower" in msg
    assert isinstance(err.value, InputError)


def test_payload_length_counts_utf8_bytes():
    t = QRTemplate(1, "H")  # 7 bytes
    qr.encode("é" * 3, t)  # 6 bytes
    with pytest.raises(PayloadTooLongError):
        qr.encode("é" * 4, t)  # 8 bytes


def test_empty_payload():
    with pytest.raises(InputError, match="empty"):
        qr.encode("", QRTemplate())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"version": 0},
        {"version": 11},
        {"version": 1.5},
        {"version": True},
        {"level": "X"},
        {"level": 1},
        {"mask": -1},
        {"mask": 8},
        {"mask": "0"},
    ],
)
def test_bad_template(kwargs):
    t = QRTemplate(**kwargs)
    with pytest.raises(InputError):
        t.validate()
    with pytest.raises(InputError):
        qr.encode(PAYLOAD[:5], t)
    with pytest.raises(InputError):
        qr.function_mask(t)


# ---------------------------------------------------------------------------------- function modules


@pytest.mark.parametrize("version", range(1, 11))
def test_data_module_count(version):
    n_data = int((~qr.function_mask(QRTemplate(version))).sum())
    assert n_data == 8 * TOTAL_CODEWORDS[version - 1] + REMAINDER_BITS[version - 1]


def test_data_module_count_v1_v2():
    assert int((~qr.function_mask(QRTemplate(1))).sum()) == 208  # 26 codewords * 8
    assert int((~qr.function_mask(QRTemplate(2))).sum()) == 359  # 44 * 8 + 7 remainder bits


class _NoDataQRCode(qrcode.QRCode):
    """qrcode without the data placement: the modules left None are exactly the data modules."""

    def map_data(self, data, mask_pattern):
        pass


@pytest.mark.parametrize("version", [1, 2, 3, 7, 10])
def test_function_mask_matches_qrcode(version):
    q = _NoDataQRCode(version=version, border=0, mask_pattern=0)
    q.add_data(qrcode.util.QRData(b"x", mode=qrcode.util.MODE_8BIT_BYTE), optimize=0)
    q.make(fit=False)
    placed = np.array([[m is not None for m in row] for row in q.modules])
    np.testing.assert_array_equal(qr.function_mask(QRTemplate(version)), placed)


@pytest.mark.parametrize("version", [1, 2, 3, 7])
@pytest.mark.parametrize("level", qr.LEVELS)
def test_function_modules_match_qrcode(version, level):
    for mask in range(8):
        t = QRTemplate(version, level, mask)
        fm = qr.function_mask(t)
        fv = qr.function_modules(t)
        assert not fv[~fm].any()
        for payload in ("A", PAYLOAD[: t.max_payload()]):
            grid = qr.encode(payload, t)
            assert grid.dtype == bool and grid.shape == (t.size, t.size)
            np.testing.assert_array_equal(grid[fm], fv[fm], err_msg=f"v{version} {level} mask {mask}")


def test_format_bits_differ_between_masks_and_levels():
    seen = {qr.function_modules(QRTemplate(1, lv, m)).tobytes() for lv in qr.LEVELS for m in range(8)}
    assert len(seen) == 32


def test_dark_module():
    for v in (1, 2, 5):
        t = QRTemplate(v)
        assert qr.function_mask(t)[t.size - 8, 8] and qr.function_modules(t)[t.size - 8, 8]


# ------------------------------------------------------------------------------------ render / save


def test_render_size_and_quiet_zone():
    t = QRTemplate(1)
    grid = qr.encode(PAYLOAD, t)
    img = qr.render(grid, px_per_module=3, quiet_zone=2)
    assert img.dtype == np.uint8 and img.shape == ((21 + 4) * 3, (21 + 4) * 3)
    q = 2 * 3
    assert (img[:q] == 255).all() and (img[-q:] == 255).all()
    assert (img[:, :q] == 255).all() and (img[:, -q:] == 255).all()
    inner = img[q:-q, q:-q]
    np.testing.assert_array_equal(inner[::3, ::3] == 0, grid)
    assert set(np.unique(img)) == {0, 255}
    assert qr.render(grid).shape == (29 * 8, 29 * 8)
    assert qr.render(grid, px_per_module=1, quiet_zone=0).shape == (21, 21)


@pytest.mark.parametrize("kwargs", [{"px_per_module": 0}, {"quiet_zone": -1}, {"px_per_module": 2.5}])
def test_render_bad_options(kwargs):
    with pytest.raises(InputError):
        qr.render(np.zeros((21, 21), bool), **kwargs)


def test_render_rejects_scores():
    with pytest.raises(InputError, match="threshold"):
        qr.render(np.full((21, 21), 0.3))


def test_save_png(tmp_path):
    from PIL import Image

    grid = qr.encode(PAYLOAD, QRTemplate(1))
    out = tmp_path / "sub" / "qr.png"
    qr.save_png(grid, out, px_per_module=4, quiet_zone=4)
    img = np.asarray(Image.open(out))
    np.testing.assert_array_equal(img, qr.render(grid, 4, 4))
    assert [p.name for p in out.parent.iterdir()] == ["qr.png"]  # no temporary left behind


# ------------------------------------------------------------------------------------------ decoding


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("version,level", [(1, "M"), (1, "Q"), (2, "Q")])
def test_round_trip_each_decoder(decoder, version, level):
    t = QRTemplate(version, level, mask=5)
    payload = PAYLOAD[: t.max_payload()]
    grid = qr.encode(payload, t)
    res = qr.decode(qr.render(grid), decoders=[decoder])
    assert res.ok and res.text == payload and res.decoder == decoder and res.tried == (decoder,)
    res = qr.decode(grid, t, decoders=[decoder])
    assert res.text == payload and res.decoder == decoder


def test_decode_default_order_and_grid_forms():
    t = QRTemplate(1, "M")
    grid = qr.encode(PAYLOAD, t)
    res = qr.decode(grid)
    assert res.ok and res.decoder == DECODERS[0] and res.tried == (DECODERS[0],)
    assert qr.decode(grid.astype(np.uint8), t).text == PAYLOAD
    assert qr.decode(grid.astype(np.float32), t, px_per_module=2).text == PAYLOAD
    rgb = np.repeat(qr.render(grid)[:, :, None], 3, axis=2)
    assert qr.decode(rgb).text == PAYLOAD


def test_decode_utf8_payload():
    t = QRTemplate(1, "L")
    payload = "SM:Müller"
    assert qr.decode(qr.encode(payload, t), t).text == payload


def test_decode_rejects_bad_input():
    with pytest.raises(InputError):
        qr.decode(np.full((21, 21), 0.5))
    with pytest.raises(InputError):
        qr.decode(np.zeros((25, 25), bool), QRTemplate(1))
    with pytest.raises(InputError, match="unknown"):
        qr.decode(np.zeros((21, 21), bool), decoders=["opencv"])


def test_decode_random_bits_fails():
    rng = np.random.default_rng(0)
    res = qr.decode(rng.random((21, 21)) < 0.5)
    assert not res.ok and res.text is None and res.decoder is None
    assert res.tried == DECODERS


def test_repair_restores_function_modules():
    t = QRTemplate(1, "M", mask=2)
    grid = qr.encode(PAYLOAD, t)
    fm = qr.function_mask(t)
    damaged = grid.copy()
    damaged[fm] = ~damaged[fm]  # every function module wrong
    repaired = qr.repair(damaged, t)
    np.testing.assert_array_equal(repaired, grid)
    assert not np.array_equal(damaged, grid)  # repair returned a copy
    for d in DECODERS:
        assert qr.decode(damaged, t, decoders=[d]).text == PAYLOAD
        # Without the template the finders are inverted: nothing to find.
        assert not qr.decode(damaged, decoders=[d]).ok


def test_repair_checks_shape():
    with pytest.raises(InputError, match="version 1"):
        qr.repair(np.zeros((25, 25), bool), QRTemplate(1))


def test_one_percent_data_errors_decode_at_m_after_repair():
    t = QRTemplate(1, "M", mask=0)
    grid = qr.encode(PAYLOAD, t)
    fm = qr.function_mask(t)
    rng = np.random.default_rng(1234)
    n_err = int(np.ceil(0.01 * (~fm).sum()))  # 3 of 208
    ok = 0
    for _ in range(20):
        noisy = _flip_data_modules(grid, t, n_err, rng)
        noisy[fm] = rng.random(int(fm.sum())) < 0.5  # function modules garbage as well
        ok += qr.decode(noisy, t).text == PAYLOAD
    assert ok == 20


def test_module_agreement():
    t = QRTemplate(2, "Q")
    grid = qr.encode(PAYLOAD, t)
    assert qr.module_agreement(grid, grid, t) == (359, 359)
    fm = qr.function_mask(t)
    other = grid.copy()
    other[fm] = ~other[fm]  # function modules are not counted
    assert qr.module_agreement(other, grid, t) == (359, 359)
    other = _flip_data_modules(grid, t, 17, np.random.default_rng(3))
    agree, n = qr.module_agreement(other.astype(np.uint8), grid, t)
    assert (agree, n) == (342, 359) and isinstance(agree, int)


# ------------------------------------------------------------------------------- decoder availability


def _without_pyzbar(monkeypatch):
    real = importlib.import_module

    def fake_import(name, *args, **kwargs):
        if name.startswith("pyzbar"):
            raise ImportError("Unable to find zbar shared library")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(qr, "_import_module", fake_import)


def test_available_decoders_real():
    assert "zxing-cpp" in DECODERS
    assert DECODERS == tuple(d for d in ("zxing-cpp", "pyzbar") if d in DECODERS)


def test_pyzbar_missing_falls_back_and_warns_once(monkeypatch):
    _without_pyzbar(monkeypatch)
    with pytest.warns(RuntimeWarning, match="libzbar0") as rec:
        assert qr.available_decoders() == ("zxing-cpp",)
    assert len([w for w in rec if "libzbar0" in str(w.message)]) == 1
    assert "zxing-cpp is used alone" in str(rec[0].message) or "zxing-cpp alone" in str(rec[0].message)

    t = QRTemplate(1, "M")
    grid = qr.encode(PAYLOAD, t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise
        assert qr.available_decoders() == ("zxing-cpp",)
        res = qr.decode(grid, t)
        assert res.text == PAYLOAD and res.tried == ("zxing-cpp",)
        res = qr.decode(np.random.default_rng(0).random((21, 21)) < 0.5, decoders=["zxing-cpp", "pyzbar"])
        assert not res.ok and res.tried == ("zxing-cpp",)
        with pytest.raises(InputError, match="libzbar0"):
            qr.decode(grid, t, decoders=["pyzbar"])


def test_pyzbar_missing_warns_once_even_when_retried(monkeypatch):
    _without_pyzbar(monkeypatch)
    with pytest.warns(RuntimeWarning) as rec:
        for _ in range(3):
            monkeypatch.setattr(qr, "_UNUSABLE", set())  # force the import to be attempted again
            assert qr.available_decoders() == ("zxing-cpp",)
    assert len(rec) == 1
