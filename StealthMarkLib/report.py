"""Verification reports: report.json, report.html (human-readable), qr.png, and for volumes lime_map.nii.gz."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np

from .fileio import write_bytes_atomic, write_text_atomic
from .qr import render
from .verify import ALPHA_NULL, ALPHA_OWNED, Verification


def heat_rgb(grid: np.ndarray, px: int = 12) -> np.ndarray:
    """(G, G) values -> (G*px, G*px, 3) uint8 blue-white-red picture, symmetric around zero."""
    g = np.asarray(grid, dtype=np.float64)
    m = np.abs(g).max() or 1.0
    t = np.clip(g / m, -1, 1)
    r = np.where(t > 0, 1.0, 1.0 + t)
    b = np.where(t < 0, 1.0, 1.0 - t)
    gch = 1.0 - np.abs(t)
    rgb = (np.stack([r, gch, b], -1) * 255).astype(np.uint8)
    return np.kron(rgb, np.ones((px, px, 1), dtype=np.uint8))


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _img_tag(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


_VERDICT_TEXT = {
    "owned": "The model carries this key's watermark: its LIME attributions decode to the key's payload, "
             "and agreement this high is practically impossible for a model that was never watermarked. "
             "Caveat of this version: a watermark can also answer keys with other secret tiles, so compare "
             "the key commitment and the date it was registered before attributing the model to one owner.",
    "not-owned": "No trace of this key's watermark: nothing decoded, and the module agreement is what a "
                 "model that knows nothing of the key gives by chance.",
    "inconclusive": "The evidence is mixed (a decode without strong agreement, or strong agreement without a "
                    "decode). Verify again with more samples or more slices before drawing a conclusion.",
}


def render_html(v: Verification) -> str:
    r = v.report
    qr_png = png_bytes(render(v.observed, px_per_module=8, quiet_zone=4))
    heat_png = png_bytes(heat_rgb(v.aggregated))
    lo, hi = r.null_band_999
    rows = [
        ("Verdict", r.verdict),
        ("Decoded payload", r.payload_decoded if r.payload_decoded is not None else "(none)"),
        ("Payload matches the key", "yes" if r.payload_match else "no"),
        ("Data-module agreement", f"{r.data_module_agreement:.1%} ({r.n_data_modules - r.bit_errors} of {r.n_data_modules}; "
                                  f"99.9% band for an unrelated model: {lo:.1%} to {hi:.1%})"),
        ("Bit errors", str(r.bit_errors)),
        ("p-value (one-sided binomial vs 0.5)", f"{r.p_value:.3g}"),
        *([("Against random keys", null_keys_summary(r.null_keys))] if r.null_keys else []),
        ("Trigger images", f"{r.n_trigger_images} ({r.trigger_mode})" + (f", slices {r.slices}" if r.slices else "")),
        ("LIME samples per image / queries", f"{r.lime_samples} / {r.n_queries}"),
        ("Time (total / queries / regression / decode)",
         " / ".join(f"{r.seconds[k]:.1f} s" for k in ("total", "queries", "regression", "decode"))),
        ("Device", r.device),
        ("Decoder", (r.decoder or "(none succeeded)") + (
            f" after flipping the {r.decode_flips} least certain data module(s) (soft-decision decoding; the "
            "agreement and p-value above count them as observed)" if r.decode_flips else "")),
        ("Model", f"{r.model or ''} sha256 {r.model_sha256 or 'n/a'}"),
        ("Key commitment", r.key_commitment),
        ("Input", r.source or "key image"),
        ("Software", ", ".join(f"{k} {v}" for k, v in r.software.items())),
    ]
    table = "\n".join(f"<tr><th>{html.escape(a)}</th><td>{html.escape(str(b))}</td></tr>" for a, b in rows)
    colour = {"owned": "#1b7f3b", "not-owned": "#555", "inconclusive": "#b26b00"}[r.verdict]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>StealthMark verification: {html.escape(r.verdict)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}}
th{{text-align:left;padding-right:1em;vertical-align:top}}td{{font-family:monospace}}
.verdict{{font-size:1.6em;color:{colour}}} figure{{display:inline-block;margin:1em}}</style></head>
<body><h1>StealthMark ownership verification</h1>
<p class="verdict">Verdict: <b>{html.escape(r.verdict)}</b></p>
<p>{html.escape(_VERDICT_TEXT[r.verdict])}</p>
<figure>{_img_tag(qr_png, "QR code read from the attributions")}<figcaption>QR read from the LIME attributions
(function modules repaired from the key's template)</figcaption></figure>
<figure>{_img_tag(heat_png, "attribution heat map")}<figcaption>Mean standardised LIME attribution per cell
(red: the cell raises the model's uncertainty)</figcaption></figure>
<h2>Evidence</h2><table>{table}</table>
<h2>How to read this</h2>
<ul>
<li>LIME hid random grid cells of each trigger image {r.lime_samples} times and fitted how the model's mean
uncertainty depends on which cells were visible. Cells that raise uncertainty are read as dark QR modules.</li>
<li><b>Agreement</b> counts only the {r.n_data_modules} data and error-correction modules; the function modules
(finder, timing, format) are predictable and are repaired from the template, so they are not counted.</li>
<li>The <b>p-value</b> is the chance that a model which never saw the key agrees on at least this many
modules if each agreed with probability 0.5. The verdict is <i>owned</i> only when the QR decodes to the key's
payload and p &le; {ALPHA_OWNED:g}; <i>not-owned</i> when it does not decode and p &gt; {ALPHA_NULL:g}.</li>
{_NULL_KEYS_HELP if r.null_keys else ""}<li>The key commitment identifies the key without revealing it: compare it with the one the owner registered.</li>
</ul></body></html>
"""


_NULL_KEYS_HELP = """<li><b>Against random keys</b>: the same model was verified the same way with random keys (this
key's payload and settings, other textures). The binomial p-value treats the modules as independent; on a
watermarked model they are not for a foreign key (all its dark cells carry one tile, and the model answers
each foreign tile in its own way), so a key the model never saw should agree about as well as these random keys.
The z score sets this key's agreement against theirs (with at least the binomial spread); the rank p-value,
(1 + random keys at or above it) / (random keys + 1), holds whatever their distribution, for a key fixed
(and its commitment registered) before the model was made.</li>
"""


def null_keys_summary(nk: dict) -> str:
    """report.json's ``null_keys`` in one line (the HTML report and the command's summary)."""
    return (f"{nk['n_keys']} random keys: agreement {nk['mean']:.1%} +/- {nk['sd']:.1%} "
            f"(highest {max(nk['agreements']):.1%}); this key z = {nk['z']:.1f}, p (normal) "
            f"{nk['p_value_normal']:.3g}, rank p-value {nk['p_value_rank']:.3g}")


def write_reports(v: Verification, out_dir: str | Path) -> dict[str, Path]:
    """Write report.json, report.html and qr.png into ``out_dir`` (each atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": write_text_atomic(out / "report.json", json.dumps(v.report.to_json(), indent=2) + "\n"),
        "html": write_text_atomic(out / "report.html", render_html(v)),
        "qr": write_bytes_atomic(out / "qr.png", png_bytes(render(v.observed, px_per_module=8, quiet_zone=4))),
    }
    return paths
