"""How fast one architecture learns the watermark: a short probe to compare network variants before a full
``benchmarks/models.py`` run.

Trains a clean model of ``ARCH`` at ``--size`` (with ``--network-args`` on top; 300 steps, seed 0, cached in
benchmarks/.cache by its arguments), embeds the published benchmark key with the library's recipe for
``--steps`` steps, printing the mean trigger and clean losses of every ``--every`` steps, then verifies once on
the key image and once on 4 key-blended held-out slices (18, 22, 42, 46) at the verifier's default sample counts
and prints each agreement ('*' when the QR decoded), the Dice drop and the seconds.

    .venv/bin/python -u benchmarks/trigger_probe.py --arch SamViT --size small \\
        [--network-args '{"image_skip": 32}'] [--steps 600] [--every 100] [--no-per-cell-decoys] [--threads 2]
        [--[no-]keep-trigger-masks [--masks-from key-image|each-image]]
(``--smoke``: the architecture's tiny size at 64 px, 2 clean steps, 20 LIME samples, nothing cached: for the
test suite; its figures mean nothing.)

Logs of the runs behind README's SamViT notes: benchmarks/results/models_small/probe_*.log.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from StealthMarkLib.architectures import ARCHITECTURES, SIZES, architecture_spec  # noqa: E402
from StealthMarkLib.data import DEFAULT_INTENSITY, load_dataset  # noqa: E402
from StealthMarkLib.embed import TRIGGER_MASK_SOURCES, EmbedConfig, batch_settings, embed_watermark  # noqa: E402
from StealthMarkLib.errors import InputError  # noqa: E402
from StealthMarkLib.key import create_key  # noqa: E402
from StealthMarkLib.models import SegmentationModel, load_model, save_model  # noqa: E402
from StealthMarkLib.progress import Progress  # noqa: E402
from StealthMarkLib.sample_data import SAMPLE_LABEL, sample_paths  # noqa: E402
from StealthMarkLib.train import train_segmentation  # noqa: E402
from StealthMarkLib.trigger import TriggerOverlay  # noqa: E402
from StealthMarkLib.verify import verify_query  # noqa: E402
from StealthMarkLib.workflows import harmlessness, volume_trigger_input  # noqa: E402
import common as C  # noqa: E402


class LossTrace(Progress):
    """Prints the mean of the losses the embedding loop reports, every ``every`` steps."""

    def __init__(self, every: int) -> None:
        super().__init__()
        self.every, self.sums, self.t0 = every, np.zeros(2), time.monotonic()

    def _emit_advance(self, n: int, message: str) -> None:
        parts = message.split()              # "clean C trigger T"
        self.sums += [float(parts[1]), float(parts[3])]
        if self.done % self.every == 0:
            c, t = self.sums / self.every
            print(f"step {self.done}: clean {c:.4f} trigger {t:.4f} ({time.monotonic() - self.t0:.0f} s)", flush=True)
            self.sums[:] = 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", choices=ARCHITECTURES, required=True)
    ap.add_argument("--size", choices=[z for z in SIZES if z != "tiny"], default="small")
    ap.add_argument("--network-args", metavar="JSON", default="{}")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--lr", type=float, help="EmbedConfig.lr (default: the library's)")
    ap.add_argument("--lr-scales", metavar="JSON", default="{}",
                    help='EmbedConfig.lr_scales, e.g. \'{"blocks.": 0.1}\' (name prefix -> multiplier of --lr)')
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny size, 64 px, a few steps (for the test suite)")
    C.add_per_cell_decoys_argument(ap)
    C.add_keep_trigger_masks_argument(ap)
    ap.add_argument("--masks-from", choices=TRIGGER_MASK_SOURCES, default=EmbedConfig.trigger_masks_from,
                    help="EmbedConfig.trigger_masks_from (with --keep-trigger-masks)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    try:
        extra = C.json_object(a.network_args, "--network-args", '{"image_skip": 32}')
        lr_scales = C.json_object(a.lr_scales, "--lr-scales", '{"blocks.": 0.1}')
    except InputError as exc:
        ap.error(str(exc))
    if a.steps < a.every or a.every < 1:
        ap.error("--every must be at least 1 and at most --steps")
    size = 64 if a.smoke else 128
    spec = architecture_spec(a.arch, "tiny" if a.smoke else a.size, size, intensity=DEFAULT_INTENSITY.to_json())
    spec.args.update(extra)
    t1, mask = sample_paths()
    ds = load_dataset(t1, (size, size), labels=mask, label=SAMPLE_LABEL)
    if a.smoke:
        clean = train_segmentation(spec, *ds.train, steps=2, batch=2, seed=0, device="cpu")
    else:
        tag = hashlib.sha256(json.dumps(spec.args, sort_keys=True).encode()).hexdigest()[:12]
        cache = ROOT / "benchmarks/.cache" / f"probe_{a.arch}_{tag}.ts"
        cache.parent.mkdir(parents=True, exist_ok=True)
        if not cache.exists():
            save_model(train_segmentation(spec, *ds.train, steps=300, seed=0, device="cpu"), cache, spec)
        clean = load_model(cache)
    print("network", json.dumps(spec.args), "params", sum(p.numel() for p in clean.module.parameters()), flush=True)
    key = create_key("SM:BENCH-0001", seed=20261127, **({"tile": 3} if a.smoke else {}))  # published: never use it for real
    batch = batch_settings(2) if a.smoke else {}
    cfg = EmbedConfig(steps=a.steps, per_cell_decoys=a.per_cell_decoys, keep_trigger_masks=a.keep_trigger_masks,
                      trigger_masks_from=a.masks_from, lr_scales=lr_scales, **batch, **({"lr": a.lr} if a.lr else {}))
    print("embed config", json.dumps({k: v for k, v in cfg.to_json().items()
                                      if k in ("steps", "lr", "lr_scales", "per_cell_decoys", "keep_trigger_masks")}),
          flush=True)
    t0 = time.monotonic()
    module, _ = embed_watermark(clean, key, *ds.train, cfg, progress=LossTrace(a.every))
    print(f"embed {time.monotonic() - t0:.0f} s", flush=True)
    wm = SegmentationModel(module, clean.spec)
    h = harmlessness(clean, wm, *ds.test, key)
    k = h["key_image"]
    print(f"dice drop {h['dice_drop_points']:.3f} flips {h['flip_rate_clean']:.4%}; key image foreground "
          f"{k['original_foreground_fraction']:.1%} -> {k['watermarked_foreground_fraction']:.1%}", flush=True)
    for where in ("key image", "blended"):
        imgs = TriggerOverlay(key, size, size).key_image()[None] if where == "key image" else \
            volume_trigger_input(t1, key, (size, size), "18,22,42,46", 4, None).images
        r = verify_query(wm, key, imgs, seed=7, samples=20 if a.smoke else None).report
        print(f"{where}: {r.data_module_agreement:.3f}{'*' if r.payload_match else ''}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
