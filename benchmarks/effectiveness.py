"""Embedding and verification on the bundled real MRI: effectiveness, negative controls, harmlessness, speed.

Measures what the embedding/verification issue asks for, on a 2-core CPU by default:

- the demo end to end (``stealthmark demo``, wall time);
- 20 verification trials of the watermarked demo-size model (10 on the key image, 10 on key-blended
  held-out slices, 4 slices each; different LIME seeds and slices; the verifier's default sample counts):
  decode rate (ASR) and worst p-value;
- negative controls: >= 5 independently trained clean models (seeds, widths), the watermarked model with
  wrong keys, and the watermarked model on real slices without the key: decodes and agreement band;
- harmlessness on the held-out slices (Dice drop, flip rate, key image mask);
- verification of the whole 62-slice sample volume (default slice choice) and its time.

Usage: .venv/bin/python benchmarks/effectiveness.py [--out benchmarks/results/effectiveness.json] [--quick]
       [--skip-demo] [--embed-steps N] [--[no-]keep-trigger-masks [--masks-from key-image|each-image]]
       [--[no-]per-cell-decoys] [--lr X]
(the last four: another embedding recipe, e.g. the one that keeps the key image's mask; all are recorded)
"""

from __future__ import annotations

import argparse
import json
import subprocess
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

from StealthMarkLib.data import DEFAULT_INTENSITY, load_dataset  # noqa: E402
from StealthMarkLib.embed import TRIGGER_MASK_SOURCES, EmbedConfig, recipe_steps  # noqa: E402
from StealthMarkLib.fileio import write_text_atomic  # noqa: E402
from StealthMarkLib.key import create_key  # noqa: E402
from StealthMarkLib.models import describe_device, load_model, resolve_device, save_model  # noqa: E402
from StealthMarkLib.sample_data import SAMPLE_LABEL, sample_paths, sample_split  # noqa: E402
from StealthMarkLib.train import demo_spec, train_segmentation  # noqa: E402
from StealthMarkLib.verify import null_band, verify_query  # noqa: E402
from StealthMarkLib.workflows import run_embed, run_verify, volume_trigger_input  # noqa: E402
import common as C  # noqa: E402


def brief(r) -> dict:
    return {"verdict": r.verdict, "decoded": r.payload_decoded, "agreement": round(r.data_module_agreement, 4),
            "bit_errors": r.bit_errors, "n_data_modules": r.n_data_modules, "p_value": r.p_value, "seconds": r.seconds["total"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/effectiveness.json"))
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny sizes (for the test suite)")
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--embed-steps", type=int, help="embedding steps (default the recipe's: 3600, 1800 with "
                    "--no-keep-trigger-masks; 300 with --quick)")
    C.add_keep_trigger_masks_argument(ap)
    ap.add_argument("--masks-from", choices=TRIGGER_MASK_SOURCES, default=EmbedConfig.trigger_masks_from,
                    help="with --keep-trigger-masks, EmbedConfig.trigger_masks_from (default %(default)s; "
                         "each-image: the recipe of effectiveness-keep-masks.json and -pcd.json)")
    C.add_per_cell_decoys_argument(ap, "decoy images")
    ap.add_argument("--lr", type=float, help="embedding learning rate (default EmbedConfig's)")
    a = ap.parse_args()
    if a.embed_steps is not None and a.embed_steps < 1:
        ap.error("--embed-steps must be at least 1")
    if a.lr is not None and not a.lr > 0:
        ap.error("--lr must be positive")
    q = a.quick
    size = 64 if q else 128
    channels = (16, 32, 64) if q else (8, 16, 32, 64)
    samples = 300 if q else None      # None: the verifier's default (4000 on the key image alone, 1000 per slice)
    n_trials = 2 if q else 10
    n_null = 2 if q else 5
    dev = resolve_device("auto")
    res: dict = {"device": describe_device(dev), "torch": torch.__version__, "quick": q,
                 "image_size": size, "channels": list(channels),
                 "lime_samples": samples or "default: 4000 on the key image alone, 1000 per blended slice"}
    tmp = Path(tempfile.mkdtemp(prefix="sm-bench-"))
    t1, mask = sample_paths()

    if not a.skip_demo and not q:
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "StealthMarkLib.cli", "demo", "--out", str(tmp / "demo"),
                               "--progress", "none"], capture_output=True, text=True)
        res["demo"] = {"exit_code": proc.returncode, "wall_seconds": round(time.monotonic() - t0, 1),
                       "summary": json.loads((tmp / "demo" / "demo_summary.json").read_text())}
        print(proc.stdout)

    spec = demo_spec(channels, size, intensity=DEFAULT_INTENSITY.to_json())
    ds = load_dataset(t1, (size, size), labels=mask, label=SAMPLE_LABEL)
    t0 = time.monotonic()
    clean = train_segmentation(spec, *ds.train, steps=300 if not q else 150, seed=0, device="auto")
    res["clean_train_seconds"] = round(time.monotonic() - t0, 1)
    clean_path = save_model(clean, tmp / "clean.ts", spec)
    key = create_key("SM:BENCH-0001", seed=20261127)   # a published benchmark key: never use it for real
    key_path = key.save(tmp / "key.json")
    steps = a.embed_steps or (recipe_steps(a.keep_trigger_masks) if not q else 300)
    cfg = EmbedConfig(keep_trigger_masks=a.keep_trigger_masks, trigger_masks_from=a.masks_from,
                      per_cell_decoys=a.per_cell_decoys,
                      **({"lr": a.lr} if a.lr is not None else {}))
    emb = run_embed(clean_path, t1, key_path, tmp / "wm.ts", labels=mask, label=SAMPLE_LABEL, steps=steps,
                    config=cfg)
    res["embed_steps"], res["keep_trigger_masks"] = steps, cfg.keep_trigger_masks
    if cfg.keep_trigger_masks:
        res["trigger_masks_from"] = cfg.trigger_masks_from
    res["per_cell_decoys"], res["lr"] = cfg.per_cell_decoys, cfg.lr
    res["embed_seconds"] = emb.log["seconds"]
    res["harmlessness"] = emb.harmlessness
    wm = load_model(tmp / "wm.ts")

    held = sample_split().held_out
    rng = np.random.default_rng(0)
    trials = []
    for i in range(n_trials):
        r = verify_query(wm, key, _key_image(key, size), samples=samples, seed=1000 + i).report
        trials.append({"input": "key-image", **brief(r)})
    for i in range(n_trials):
        sl = ",".join(str(k) for k in sorted(rng.choice(held, 4, replace=False)))
        imgs = volume_trigger_input(t1, key, (size, size), sl, 4, None).images
        r = verify_query(wm, key, imgs, samples=samples, seed=2000 + i).report
        trials.append({"input": f"blended slices {sl}", **brief(r)})
    decoded = [t["decoded"] == key.payload for t in trials]
    res["trials"] = trials
    res["asr"] = float(np.mean(decoded))
    res["max_p_value_owned"] = max(t["p_value"] for t in trials if t["decoded"] == key.payload) if any(decoded) else None

    lo, hi = null_band(trials[0]["n_data_modules"])
    controls = []
    widths = [(8, 16, 32, 64), (16, 32, 64, 128), (8, 16, 32), (12, 24, 48, 96), (8, 16, 32, 64, 128)]
    for j in range(n_null):
        ch = widths[j % len(widths)] if not q else (8, 16, 32)
        m = train_segmentation(demo_spec(ch, size), *ds.train, steps=300 if not q else 100, seed=100 + j,
                               device="auto")
        for name, imgs in (("key-image", _key_image(key, size)),
                           ("blended", volume_trigger_input(t1, key, (size, size), "18,22,42,46", 4, None).images)):
            r = verify_query(m, key, imgs, samples=samples, seed=3000 + j).report
            controls.append({"control": f"clean model seed {100 + j} channels {list(ch)}", "input": name, **brief(r)})
    for j in range(5 if not q else 1):      # 3 wrong keys with the owner's payload, 2 usurpers' own keys
        wrong = create_key(key.payload if j < 3 else f"SM:USURP-{j}", seed=5000 + j)
        for name, imgs in (("key-image", _key_image(wrong, size)),
                           ("blended", volume_trigger_input(t1, wrong, (size, size), "18,22,42,46", 4, None).images)):
            r = verify_query(wm, wrong, imgs, samples=samples, seed=4000 + j).report
            controls.append({"control": f"watermarked model, {'wrong key' if j < 3 else 'usurper key'} {j}", "input": name, **brief(r)})
    real = ds.test[0][[1, 5, 9, 13]]
    r = verify_query(wm, key, real, samples=samples, seed=6000).report
    controls.append({"control": "watermarked model, real slices without the key", "input": "4 slices", **brief(r)})
    res["negative_controls"] = controls
    res["null_band_999"] = [lo, hi]
    res["negative_decodes"] = sum(c["decoded"] is not None for c in controls)
    res["negative_inside_band"] = all(lo <= c["agreement"] <= hi for c in controls)

    t0 = time.monotonic()
    v = run_verify(tmp / "wm.ts", key_path, tmp / "vol", volume=t1, samples=samples)
    res["volume_verification"] = {"volume": "bundled T1, 62 slices", "slices": v.report.slices,
                                  "samples_per_slice": v.report.lime_samples, "wall_seconds": round(time.monotonic() - t0, 1),
                                  **brief(v.report)}
    write_text_atomic(a.out, json.dumps(res, indent=2, default=float) + "\n")
    print(json.dumps({k: res[k] for k in ("device", "asr", "max_p_value_owned", "negative_decodes",
                                          "negative_inside_band")}, indent=2, default=float))
    print("harmlessness: drop %.3f points, flip %.4f%%" % (emb.harmlessness["dice_drop_points"],
                                                         100 * emb.harmlessness["flip_rate_clean"]))
    print("volume verification:", res["volume_verification"])


def _key_image(key, size):
    from StealthMarkLib.trigger import TriggerOverlay

    return TriggerOverlay(key, size, size).key_image()[None]


if __name__ == "__main__":
    main()
