"""Embedding and verification per architecture: UNet, BasicUNet, SegResNet, SwinUNETR, UNETR, SAM ViT-B.

For each architecture (its ``standard`` configuration in StealthMarkLib/architectures.py, or its ``small``
one with ``--size small``; 128 x 128, one input channel, softmax over background/foreground): train a clean
model on the bundled real MRI, embed the watermark with a published benchmark key, verify N times (half on
the key image, half on 4 key-blended held-out slices, fresh LIME seeds each), and measure the Dice drop on
the held-out slices. Writes one record per architecture and size: ``arch``, ``size``, ``params``,
``image_size``, ``asr`` (fraction of trials decoding the payload), ``dice_drop_points``, ``embed_seconds``,
``device``, plus the settings and per-trial verdicts.

The SAM ViT-B model (StealthMarkLib/samvit.py) starts from random initialisation: no pretrained weights can
be downloaded here.

Embedding uses the library's default recipe (``EmbedConfig()``, its steps unless ``--embed-steps`` says otherwise;
each record's ``settings`` name the steps it was measured with) and the key's
default tile (4 px at 128 px); clean models train 300 steps with batch 8; verification uses the
verifier's default sample counts.

Usage: .venv/bin/python benchmarks/models.py [--archs UNet,SamViT] [--size standard|small] [--trials 10]
       [--embed-steps N] [--[no-]per-cell-decoys] [--[no-]keep-trigger-masks] [--network-args JSON] [--out FILE] [--merge] [--threads N]
       [--smoke]
(``--size small``: the transformers' CPU-sized configurations of architectures.py; each record names its
``size`` and ``network_args``. ``--[no-]per-cell-decoys``: EmbedConfig.per_cell_decoys, the library's
default unless given, named in the record's ``settings``; a record without it was measured with the option
off, before it became the default. ``--[no-]keep-trigger-masks`` likewise: every record measured before
2026-12-07 has no ``keep_trigger_masks`` in its settings and was measured without it.)
(``--smoke``: tiny networks at 64 px and a few steps, for the test suite; its figures mean nothing.)
``--merge`` keeps the records of the architectures not run now from an existing ``--out`` file (each record
names its own device), so that CPU and GPU runs can fill one file. The file is rewritten (atomically) after
every architecture, so that an interrupted run keeps what it measured.
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

from StealthMarkLib import KEEP_MASKS_EMBED_STEPS  # noqa: E402
from StealthMarkLib.architectures import ARCHITECTURES, SIZES, architecture_spec  # noqa: E402
from StealthMarkLib.data import DEFAULT_INTENSITY, load_dataset  # noqa: E402
from StealthMarkLib.embed import EmbedConfig, recipe_steps  # noqa: E402
from StealthMarkLib.errors import StealthMarkError  # noqa: E402
from StealthMarkLib.fileio import write_text_atomic  # noqa: E402
from StealthMarkLib.key import create_key  # noqa: E402
from StealthMarkLib.models import build_network, describe_device, load_model, resolve_device, save_model  # noqa: E402
from StealthMarkLib.sample_data import SAMPLE_LABEL, sample_paths, sample_split  # noqa: E402
from StealthMarkLib.train import train_segmentation  # noqa: E402
from StealthMarkLib.trigger import TriggerOverlay  # noqa: E402
from StealthMarkLib.verify import verify_query  # noqa: E402
from StealthMarkLib.workflows import run_embed, volume_trigger_input  # noqa: E402
import common as C  # noqa: E402

FULL = {"size": "standard", "image_size": 128, "clean_steps": 300, "embed_steps": None, "samples": None,
        "trials": 10}
SMOKE = {"size": "tiny", "image_size": 64, "clean_steps": 3, "embed_steps": 3, "samples": 20, "trials": 1,
         "batch": 2}


def parse_archs(text: str | None) -> list[str]:
    if not text:
        return list(ARCHITECTURES)
    names = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in names if a not in ARCHITECTURES]
    if unknown or not names:
        raise StealthMarkError(f"unknown architecture(s) {', '.join(unknown) or '(none given)'}; "
                               f"choose from {', '.join(ARCHITECTURES)}")
    return names


def bench_arch(arch: str, s: dict, ds, key, key_path: Path, tmp: Path, device: str) -> dict:
    t1, mask = sample_paths()
    size = s["image_size"]
    spec = architecture_spec(arch, s["size"], size, intensity=DEFAULT_INTENSITY.to_json())
    spec.args.update(s.get("network_args") or {})          # --network-args: a variant of the size's network
    params = sum(p.numel() for p in build_network(spec).parameters())
    t0 = time.monotonic()
    batch = s.get("batch", 8)
    clean = train_segmentation(spec, *ds.train, steps=s["clean_steps"], batch=batch, seed=0, device=device)
    train_seconds = round(time.monotonic() - t0, 1)
    clean_path = save_model(clean, tmp / f"{arch}-clean.ts", spec)
    emb = run_embed(clean_path, t1, key_path, tmp / f"{arch}-wm.ts", labels=mask, label=SAMPLE_LABEL,
                    steps=s["embed_steps"], device=device, config=EmbedConfig(steps=s["embed_steps"], clean_batch=batch, trigger_batch=batch,
                                       key_images_per_batch=min(2, batch), decoys_per_batch=min(4, batch),
                                       per_cell_decoys=s["per_cell_decoys"],
                                       keep_trigger_masks=s["keep_trigger_masks"]))
    wm = load_model(tmp / f"{arch}-wm.ts", device=device)
    held = sample_split().held_out
    rng = np.random.default_rng(0)
    trials = []
    for i in range(s["trials"]):
        if i % 2 == 0:
            imgs, where = TriggerOverlay(key, size, size).key_image()[None], "key-image"
        else:
            sl = ",".join(str(k) for k in sorted(rng.choice(held, 4, replace=False)))
            imgs, where = volume_trigger_input(t1, key, (size, size), sl, 4, None).images, f"slices {sl}"
        r = verify_query(wm, key, imgs, samples=s["samples"], seed=1000 + i, in_channels=wm.in_channels,
                         device=wm.device).report
        trials.append({"input": where, "verdict": r.verdict, "decoded": r.payload_decoded,
                       "agreement": round(r.data_module_agreement, 4), "p_value": r.p_value,
                       "seconds": r.seconds["total"]})
    h = emb.harmlessness
    return {"arch": arch, "size": s["size"], "params": int(params), "image_size": [size, size],
            "asr": float(np.mean([t["decoded"] == key.payload for t in trials])),
            "dice_drop_points": h["dice_drop_points"], "dice_original": h["original"]["dice"],
            "flip_rate_clean": h["flip_rate_clean"], "embed_seconds": emb.log["seconds"],
            "clean_train_seconds": train_seconds, "device": describe_device(wm.device),
            "network_args": spec.args, "trials": trials}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", help=f"comma-separated subset of {','.join(ARCHITECTURES)} (default all)")
    ap.add_argument("--size", choices=[z for z in SIZES if z != "tiny"],
                    help="architecture size (default standard; small: the transformers cut down for a CPU)")
    ap.add_argument("--trials", type=int, help="verification trials per architecture (default 10)")
    ap.add_argument("--embed-steps", type=int,
                    help=f"embedding steps (default the recipe's: {KEEP_MASKS_EMBED_STEPS}, 1800 with "
                         "--no-keep-trigger-masks); each record keeps its settings")
    C.add_per_cell_decoys_argument(ap, "decoy images")
    C.add_keep_trigger_masks_argument(ap)
    ap.add_argument("--network-args", metavar="JSON",
                    help='arguments to change in the network of each architecture, e.g. \'{"image_skip": 32}\' '
                         "(recorded in settings and network_args; give another --out for such variants)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/models.json"))
    ap.add_argument("--merge", action="store_true",
                    help="keep the records of other architectures from an existing --out file (read again before "
                         "each write, so runs of different architectures can share one --out)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: at most 2; 1 with --smoke)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes and a few steps (for the test suite)")
    a = ap.parse_args(argv)
    try:
        archs = parse_archs(a.archs)
        s = dict(SMOKE if a.smoke else FULL)
        if a.size and not a.smoke:
            s["size"] = a.size
        if a.trials is not None:
            if a.trials < 1:
                raise StealthMarkError("--trials must be at least 1")
            s["trials"] = a.trials
        if a.embed_steps is not None:
            if a.embed_steps < 1:
                raise StealthMarkError("--embed-steps must be at least 1")
            s["embed_steps"] = a.embed_steps
        s["per_cell_decoys"] = a.per_cell_decoys
        s["keep_trigger_masks"] = a.keep_trigger_masks
        if s["embed_steps"] is None:
            s["embed_steps"] = recipe_steps(a.keep_trigger_masks)
        if a.network_args:
            s["network_args"] = C.json_object(a.network_args, "--network-args", '{"image_skip": 32}')
        dev = resolve_device(a.device)
        if a.merge:   # a file that is not a results file is refused before anything runs
            _kept_records(Path(a.out), [(x, s["size"]) for x in archs])
    except StealthMarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if dev.type == "cpu":
        torch.set_num_threads(a.threads or (1 if a.smoke else min(torch.get_num_threads(), 2)))
    t1, mask = sample_paths()
    size = s["image_size"]
    ds = load_dataset(t1, (size, size), labels=mask, label=SAMPLE_LABEL)
    with tempfile.TemporaryDirectory(prefix="sm-models-") as tmp:   # the models and the key: removed at the end
        return _run(a, s, archs, ds, Path(tmp), str(dev))


def _run(a: argparse.Namespace, s: dict, archs: list[str], ds, tmp: Path, dev: str) -> int:
    # published: never use it for real. samples None: the verifier's defaults (4000 on the key image alone,
    # 1000 per blended slice), as `stealthmark verify` uses them
    key = create_key("SM:BENCH-0001", seed=20261127, **({"samples": s["samples"]} if s["samples"] else {}))
    key_path = key.save(tmp / "key.json")
    records = []
    for arch in archs:
        t0 = time.monotonic()
        rec = bench_arch(arch, s, ds, key, key_path, tmp, dev)
        rec["total_seconds"] = round(time.monotonic() - t0, 1)
        rec["settings"] = s
        records.append(rec)
        print(json.dumps({k: rec[k] for k in ("arch", "params", "asr", "dice_drop_points", "embed_seconds",
                                              "device")}), flush=True)
        # read at each write: a run of other architectures beside this one may have written since
        kept = _kept_records(Path(a.out), [(x, s["size"]) for x in archs]) if a.merge else []
        order = {name: i for i, name in enumerate(ARCHITECTURES)}
        merged = sorted(kept + records, key=lambda r: (order.get(r["arch"], len(order)), SIZES.index(_size(r))))
        # settings every record shares (a merged file may hold records made with other --embed-steps or --trials)
        common = {k: v for k, v in s.items() if all(r.get("settings", {}).get(k) == v for r in merged)}
        named = set(s).union(*(r.get("settings", {}) for r in merged))
        common["per_record"] = sorted(named - set(common))
        res = {"smoke": a.smoke, "settings": common, "torch": torch.__version__, "data": ds.describe(),
               "devices": sorted({r["device"] for r in merged}), "records": merged}
        write_text_atomic(a.out, json.dumps(res, indent=2, default=float) + "\n")
    return 0


def _kept_records(out: Path, running: list[tuple[str, str]]) -> list[dict]:
    """The records whose (architecture, size) is not in ``running``, from an existing results file (--merge)."""
    if not out.is_file():
        return []
    try:
        records = json.loads(out.read_text())["records"]
    except (ValueError, KeyError, TypeError) as exc:
        raise StealthMarkError(f"--merge: {out} is not a models.py results file ({exc})") from exc
    return [r for r in records if (r.get("arch"), _size(r)) not in running]


def _size(record: dict) -> str:
    """A record's architecture size (records written before sizes were recorded are ``standard``)."""
    return record.get("size", "standard")


if __name__ == "__main__":
    sys.exit(main())
