"""Which explained scalar survives output temperature scaling? (a follow-up to study 3's temperature rows)

Study 3 found that temperature scaling of the watermarked model's output (softmax(log p / T)) defeats the
decode at T = 2 (agreement 86.8%) and weakens it at T = 0.5 (ASR 0.7). This script verifies the owner's
watermarked model (study 1's, from the benchmark cache) once on the key image (4000 LIME samples) and once
on 4 key-blended held-out slices (18, 22, 42, 46; 1000 samples each), LIME seed 7, with two explained scalars:

- ``entropy``: the library's (mean normalised entropy), what the model was embedded for;
- ``margin``: minus the mean log-probability margin between the two most likely classes (probabilities
  clamped at 1e-6). Temperature divides every margin by T, LIME's ridge coefficients are linear in the
  explained scalar, and the QR threshold does not depend on their scale, so this scalar reads the same
  grid at every T.

through the model at T = 1, 2, 0.5 and with probabilities rounded to 2 decimals (study 3's transforms), and
through the clean original.
Prints one line per (scalar, query): agreement per input, ``*`` where the payload decoded.

    .venv/bin/python benchmarks/temperature_scalars.py [--threads 1]

The run behind README's robustness note: ``results/temperature_scalars.log`` (2-core CPU, one thread, beside
other jobs).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common as C  # noqa: E402
from robustness import Query, round_probs, temperature  # noqa: E402
from StealthMarkLib import lime_engine  # noqa: E402
from StealthMarkLib.sample_data import sample_paths  # noqa: E402
from StealthMarkLib.trigger import TriggerOverlay  # noqa: E402
from StealthMarkLib.verify import verify_query  # noqa: E402
from StealthMarkLib.workflows import volume_trigger_input  # noqa: E402


def margin(probs: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) probabilities -> (B,) minus the mean log-margin of the top two classes."""
    top2 = lime_engine._as_float64(probs).clamp_min(1e-6).topk(2, dim=1).values.log()
    return -(top2[:, 0] - top2[:, 1]).reshape(len(probs), -1).mean(dim=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    st = C.settings(C.base_parser("").parse_args(["--threads", str(a.threads)]))
    owner = C.owner_models(st, 1)[0]
    key, _ = C.benchmark_key(st.cache)
    wm, clean = C.load(owner["watermarked"], "cpu"), C.load(owner["clean"], "cpu")
    lime_engine.SCALARS.setdefault("margin", margin)
    t1, _ = sample_paths()
    inputs = [("key", TriggerOverlay(key, st.size, st.size).key_image()[None]),
              ("blend", volume_trigger_input(t1, key, (st.size, st.size), "18,22,42,46", 4, None).images)]
    queries = [("T=1", wm), ("T=2", Query(wm, post=temperature(2.0))), ("T=0.5", Query(wm, post=temperature(0.5))),
               ("round2", Query(wm, post=round_probs(2))), ("clean", clean)]
    for scalar in ("margin", "entropy"):
        k = dataclasses.replace(key, lime=dataclasses.replace(key.lime, scalar=scalar))
        for name, query in queries:
            out = []
            for where, imgs in inputs:
                r = verify_query(query, k, imgs, seed=7, device=wm.device).report
                out.append(f"{where}:{r.data_module_agreement:.3f}{'*' if r.payload_decoded else ''}")
            print(scalar, name, " ".join(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
