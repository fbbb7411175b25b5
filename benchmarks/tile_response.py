"""How a watermarked model answers the tiles of keys that are not its own (a follow-up to the negative controls).

A wrong key's trigger puts ONE tile (its secret tile) in all of its dark cells and its decoy tiles in the
light cells. If the watermarked model answers each unfamiliar tile with its own small, systematic change of
uncertainty, every dark data module of that key moves together: the wrong key's agreement is then decided by
where a few tiles fall against the threshold, not by 208 independent coin flips, and it can land outside the
binomial band around 0.5 (above or below) without anything decoding.

For each key this script verifies the model on that key's key image (4000 LIME samples, LIME seed
4000 + j as ``effectiveness.py`` does for its wrong keys) and prints the agreement and, per tile, the number of
data cells carrying it and their mean standardised attribution (``Verification.aggregated``), with the
tile's largest shift-similarity to the owner's secret tile and decoys.

    .venv/bin/python benchmarks/tile_response.py --model WM.ts [--threads 2]

Keys: the benchmark owner's (``SM:BENCH-0001``, seed 20261127) and effectiveness.py's five negative-control
keys (3 wrong keys with the owner's payload, seeds 5000-5002; 2 usurpers' keys, seeds 5003-5004). The run
behind README's note: ``results/tile_response.log``, on the model of ``results/effectiveness.json`` (2-core
CPU, two threads, alone).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from StealthMarkLib.key import create_key  # noqa: E402
from StealthMarkLib.models import load_model  # noqa: E402
from StealthMarkLib.qr import function_mask  # noqa: E402
from StealthMarkLib.trigger import TriggerOverlay, shift_similarity  # noqa: E402
from StealthMarkLib.verify import null_band, verify_query  # noqa: E402

OWNER = ("SM:BENCH-0001", 20261127)


def negative_keys() -> list[tuple[str, str, int]]:
    """effectiveness.py's wrong and usurpers' keys: (label, payload, seed)."""
    return [(f"{'wrong' if j < 3 else 'usurper'} key {j}", OWNER[0] if j < 3 else f"SM:USURP-{j}", 5000 + j)
            for j in range(5)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="the watermarked model (made with the benchmark key)")
    ap.add_argument("--samples", type=int, default=4000, help="LIME samples on each key image (default 4000)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = load_model(a.model)
    size = model.spec.image_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    owner = TriggerOverlay(create_key(*OWNER[:1], seed=OWNER[1]), h, w)
    rows = [("owner", OWNER[0], OWNER[1], 0)] + [(lab, p, s, 4000 + j) for j, (lab, p, s) in enumerate(negative_keys())]
    for label, payload, seed, lime_seed in rows:
        key = create_key(payload, seed=seed)
        ov = TriggerOverlay(key, h, w)
        v = verify_query(model, key, ov.key_image()[None], samples=a.samples, seed=lime_seed)
        agg = np.asarray(v.aggregated).reshape(-1)
        data = ~function_mask(key.qr).reshape(-1)
        lo, hi = null_band(v.report.n_data_modules)
        where = "inside" if lo <= v.report.data_module_agreement <= hi else "OUTSIDE"
        print(f"{label} ({payload}): agreement {v.report.data_module_agreement:.3f} ({where} the 99.9% band "
              f"{lo:.3f}-{hi:.3f}), decoded {v.report.payload_decoded!r}")
        tiles = [("secret", -1, ov.tile)] + [(f"decoy {i}", i, t) for i, t in enumerate(ov.decoy_set)]
        for name, idx, tile in tiles:
            sel = data & (ov.cell_tiles == idx)
            if not sel.any():
                continue
            s_secret = float(shift_similarity(tile[None], owner.tile)[0])
            s_decoy = float(shift_similarity(owner.decoy_set, tile).max()) if len(owner.decoy_set) else float("nan")
            print(f"  {name:8s} {int(sel.sum()):3d} data cells, mean attribution {agg[sel].mean():+.3f}; "
                  f"similarity to the owner's secret {s_secret:.2f}, to the owner's decoys {s_decoy:.2f}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
