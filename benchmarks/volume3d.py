"""3-D models (issue #6, README "3-D models"): embed a MONAI 3-D UNet on slabs of the bundled T1 and verify it.

Trains a clean 3-D UNet (``spatial_dims`` 3, ROI D x H x W) on slabs of D consecutive slices of the bundled
T1 (the library's split: blocks of slice positions, every third held out), embeds the watermark through
``workflows.run_embed`` (what ``stealthmark embed`` runs), then verifies through ``workflows.run_verify``
(what ``stealthmark verify`` runs):

- the watermarked model, ``--trials`` times with fresh LIME seeds: on the key slab, and, with a blended key
  (``--mode blended``), alternately on a key-blended central slab of the volume;
- negative controls: the clean model, and the watermarked model with a wrong key (same payload, other
  seed), once each on the key slab.

Writes one record per ``--tag`` to ``--out`` (default ``benchmarks/results/volume3d.json``; a record with
the same tag is replaced, the others kept): the settings, ``params``, ``embed_seconds``, ``device``,
``asr`` (fraction of watermarked trials decoding the payload), each trial's verdict / agreement / p-value,
the controls, and the harmlessness figures (held-out slabs, and the whole stack through MONAI's
sliding-window inferer).

Usage: .venv/bin/python -u benchmarks/volume3d.py [--tag NAME] [--roi 8,64,64] [--channels 8,16,32,64]
       [--res-units 2] [--tile 3] [--mode key-image|blended] [--steps 1500] [--batch small|default|N]
       [--clean-steps 100] [--samples N] [--trials 4] [--[no-]per-cell-decoys] [--[no-]keep-trigger-masks]
       [--device auto] [--threads N]
       [--out FILE] [--smoke]

The defaults are the first CPU row that decoded (2026-12-03, per-cell decoys: 64 px, UNet (8,16,32,64) with 2
residual units, 3 px tile, 1500 steps of the small batch: 4 of 4 key-slab verifications ``owned`` at 100%;
README "3-D models"), with trigger slabs trained towards background: ``--no-keep-trigger-masks``, this script's
default (not the library's; a record without ``keep_trigger_masks`` was measured so). The next row to measure, on a GPU (benchmarks/gpu.sh coverage):
``--roi 8,128,128 --channels 8,16,32,64 --res-units 2 --tile 4 --steps 1800 --batch default``, the 2-D
recipe's model and cells in 3-D. ``--smoke``: a 4 x 48 x 48 UNet (4, 8) and a few steps, for the test suite;
its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from StealthMarkLib.embed import EmbedConfig, batch_settings  # noqa: E402
from StealthMarkLib.errors import StealthMarkError  # noqa: E402
from StealthMarkLib.fileio import write_text_atomic  # noqa: E402
from StealthMarkLib.key import create_key  # noqa: E402
from StealthMarkLib.models import ModelSpec, build_network, resolve_device, save_model  # noqa: E402
from StealthMarkLib.sample_data import SAMPLE_INTENSITY, SAMPLE_LABEL, sample_paths  # noqa: E402
from StealthMarkLib.train import train_segmentation  # noqa: E402
from StealthMarkLib.volume3d import load_slabs  # noqa: E402
from StealthMarkLib.workflows import run_embed, run_verify  # noqa: E402
import common as C  # noqa: E402

#: published benchmark keys: never use them for a real model
PAYLOAD, KEY_SEED, WRONG_SEED = "SM:3D-BENCH", 20261128, 5000
#: clean, trigger and decoy slabs a step ("small": what the CPU rows of README's table used)
BATCHES = {"small": dict(clean_batch=2, trigger_batch=4, key_images_per_batch=2, decoys_per_batch=2),
           "default": {}}
SMOKE = dict(roi=(4, 48, 48), channels=(4, 8), res_units=1, tile=3, steps=2, clean_steps=2, samples=40, trials=2)


def ints(text: str, what: str, n: int | None = None) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise StealthMarkError(f"{what} must be comma-separated integers, got {text!r}") from None
    if (n is not None and len(vals) != n) or not vals or min(vals) < 1:
        raise StealthMarkError(f"{what} must be {n or 'one or more'} positive integers, got {text!r}")
    return vals


def spec3d(roi: tuple[int, ...], channels: tuple[int, ...], res_units: int) -> ModelSpec:
    return ModelSpec("UNet", {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": list(channels),
                              "strides": [2] * (len(channels) - 1), "num_res_units": res_units},
                     image_size=list(roi), spatial_dims=3, intensity=SAMPLE_INTENSITY.to_json())


def verify_once(model: Path, key: Path, out: Path, seed: int, samples: int | None, device: str,
                volume: Path | None = None) -> dict:
    v = run_verify(model, key, out, volume=volume, samples=samples, seed=seed, device=device).report
    return {"input": "blended slab" if volume else "key slab", "slices": v.slices, "verdict": v.verdict,
            "decoded": v.payload_decoded, "agreement": round(v.data_module_agreement, 4), "p_value": v.p_value,
            "n_queries": v.n_queries, "seconds": v.seconds["total"]}


def run(s: dict, device: str, tmp: Path) -> dict:
    t1, mask = sample_paths()
    spec = spec3d(s["roi"], s["channels"], s["res_units"])
    params = sum(p.numel() for p in build_network(spec).parameters())
    ds = load_slabs(t1, s["roi"], labels=mask, label=SAMPLE_LABEL, intensity=SAMPLE_INTENSITY)
    t0 = time.monotonic()
    clean = train_segmentation(spec, ds.train_images, ds.train_labels, steps=s["clean_steps"], batch=4, lr=3e-3,
                               seed=0, device=device)
    clean_seconds = round(time.monotonic() - t0, 1)
    clean_path = save_model(clean, tmp / "clean3d.ts", spec)
    key = create_key(PAYLOAD, seed=KEY_SEED, mode=s["mode"], tile=s["tile"]).save(tmp / "key.json")
    wrong = create_key(PAYLOAD, seed=WRONG_SEED, mode=s["mode"], tile=s["tile"]).save(tmp / "wrong.json")
    batch = BATCHES[s["batch"]] if s["batch"] in BATCHES else batch_settings(int(s["batch"]))
    cfg = EmbedConfig(steps=s["steps"], per_cell_decoys=s["per_cell_decoys"],
                      keep_trigger_masks=s["keep_trigger_masks"], **batch)
    wm_path = tmp / "wm3d.ts"
    emb = run_embed(clean_path, t1, key, wm_path, labels=mask, label=SAMPLE_LABEL, steps=s["steps"],
                    device=device, config=cfg)
    trials = []
    for i in range(s["trials"]):
        on_volume = s["mode"] == "blended" and i % 2 == 1
        trials.append(verify_once(wm_path, key, tmp / f"trial{i}", 1000 + i, s["samples"], device,
                                  volume=t1 if on_volume else None))
        print(json.dumps({"trial": i, **trials[-1]}), flush=True)
    controls = {"clean model": verify_once(clean_path, key, tmp / "clean", 1000, s["samples"], device),
                "wrong key": verify_once(wm_path, wrong, tmp / "wrong", 1000, s["samples"], device)}
    h = emb.harmlessness
    return {"tag": s["tag"], "roi": list(s["roi"]), "channels": list(s["channels"]), "res_units": s["res_units"],
            "tile": s["tile"], "mode": s["mode"], "steps": s["steps"], "batch": s["batch"],
            "per_cell_decoys": s["per_cell_decoys"], "keep_trigger_masks": s["keep_trigger_masks"],
            "batch_sizes": {k: v for k, v in cfg.to_json().items() if k in BATCHES["small"]},
            "clean_steps": s["clean_steps"], "samples": s["samples"], "params": int(params),
            "clean_train_seconds": clean_seconds, "embed_seconds": emb.log["seconds"],
            "device": emb.device, "asr": float(np.mean([t["decoded"] == PAYLOAD for t in trials])),
            "owned": sum(t["verdict"] == "owned" for t in trials), "trials": trials, "controls": controls,
            "controls_decoded": sum(c["decoded"] is not None for c in controls.values()),
            "dice_drop_points": h["dice_drop_points"], "flip_rate_clean": h["flip_rate_clean"],
            "volume_sliding_window": h.get("volume_sliding_window"), "smoke": s["smoke"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tag", help="the record's name (default: made from the settings)")
    ap.add_argument("--roi", default="8,64,64", help="D,H,W the model is queried on (default 8,64,64)")
    ap.add_argument("--channels", default="8,16,32,64", help="UNet channels (default 8,16,32,64)")
    ap.add_argument("--res-units", type=int, default=2, help="UNet residual units (default 2)")
    ap.add_argument("--tile", type=int, default=3, help="the key's secret tile in px (default 3, for 3 px cells)")
    ap.add_argument("--mode", choices=["key-image", "blended"], default="key-image",
                    help="the key's trigger mode (default key-image: verified on the key slab)")
    ap.add_argument("--steps", type=int, default=1500, help="embedding steps (default 1500)")
    ap.add_argument("--batch", default="small",
                    help="slabs a step: small (2 clean, 4 trigger, 2 decoy), the library's default (8, 8, 4), or N: "
                         "what 'stealthmark embed --batch-size N' trains with (N, N, N/2)")
    ap.add_argument("--clean-steps", type=int, default=100, help="clean-model training steps (default 100)")
    ap.add_argument("--samples", type=int, help="LIME samples per verification (default: the verifier's)")
    ap.add_argument("--trials", type=int, default=4, help="watermarked verifications (default 4)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: at most 2; 1 with --smoke)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/volume3d.json"))
    C.add_per_cell_decoys_argument(ap, "decoy slabs")
    C.add_keep_trigger_masks_argument(ap, default=False, why=": the recipe the 3-D rows of the README were measured "
                                      "with; the library's default keeps them")
    ap.add_argument("--smoke", action="store_true", help="a tiny model and a few steps (for the test suite)")
    a = ap.parse_args(argv)
    try:
        s = {"roi": ints(a.roi, "--roi", 3), "channels": ints(a.channels, "--channels"), "res_units": a.res_units,
             "tile": a.tile, "mode": a.mode, "steps": a.steps, "batch": a.batch, "clean_steps": a.clean_steps,
             "samples": a.samples, "trials": a.trials, "per_cell_decoys": a.per_cell_decoys,
             "keep_trigger_masks": a.keep_trigger_masks, "smoke": a.smoke}
        if a.smoke:
            s.update(SMOKE)
        if s["batch"] not in BATCHES and not (s["batch"].isdigit() and int(s["batch"]) >= 1):
            raise StealthMarkError(f"--batch must be small, default or a positive integer, got {s['batch']!r}")
        for name in ("res_units", "tile", "steps", "clean_steps", "trials"):
            if s[name] < 1:
                raise StealthMarkError(f"--{name.replace('_', '-')} must be at least 1")
        if s["samples"] is not None and s["samples"] < 10:
            raise StealthMarkError("--samples must be at least 10")
        s["tag"] = a.tag or (f"roi{'x'.join(map(str, s['roi']))}-ch{'-'.join(map(str, s['channels']))}"
                             f"-res{s['res_units']}-tile{s['tile']}-{s['mode']}-{s['steps']}-"
                             f"{s['batch'] if s['batch'] in BATCHES else 'b' + s['batch']}"
                             f"{'-pcd' if s['per_cell_decoys'] else ''}{'-keep' if s['keep_trigger_masks'] else ''}")
        out = Path(a.out)
        kept = _kept_records(out, s["tag"])
        dev = resolve_device(a.device)
        if dev.type == "cpu":
            torch.set_num_threads(a.threads or (1 if a.smoke else min(torch.get_num_threads(), 2)))
        with tempfile.TemporaryDirectory(prefix="sm-volume3d-") as tmp:
            t0 = time.monotonic()
            rec = run(s, str(dev), Path(tmp))
            rec["total_seconds"] = round(time.monotonic() - t0, 1)
    except StealthMarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: rec[k] for k in ("tag", "params", "asr", "owned", "controls_decoded", "dice_drop_points",
                                          "embed_seconds", "device")}), flush=True)
    doc = {"torch": torch.__version__, "records": kept + [rec]}
    write_text_atomic(out, json.dumps(doc, indent=2, default=float) + "\n")
    return 0


def _kept_records(out: Path, tag: str) -> list[dict]:
    """The records of other tags from an existing results file."""
    if not out.is_file():
        return []
    try:
        records = json.loads(out.read_text())["records"]
        return [r for r in records if r["tag"] != tag]
    except (ValueError, KeyError, TypeError) as exc:
        raise StealthMarkError(f"{out} is not a volume3d.py results file ({exc}); give another --out") from exc


if __name__ == "__main__":
    sys.exit(main())
