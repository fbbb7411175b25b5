"""Study 2, harmlessness: the original model against its watermarked copy on the held-out slices.

For each owner model (default 3: clean seeds 0-2, embed seeds 0-2, the models of study 1) on the 16
held-out slices of the bundled T1 MRI: Dice, IoU, HD95, surface Dice, pixel ROC-AUC, ECE, Brier score,
the argmax flip rate on clean (and on key-blended) images, and Dice at thresholds 0.1..0.9
(``StealthMarkLib.workflows.harmlessness``, METHOD.md section 8). Per image, then averaged.

Writes ``harmlessness.json`` and ``harmlessness_thresholds.png`` into --out-dir.

    python benchmarks/harmlessness.py            # full
    python benchmarks/harmlessness.py --smoke    # tiny sizes, < 30 s
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import common as C  # noqa: E402
from StealthMarkLib.workflows import harmlessness  # noqa: E402

METRICS = ("dice", "iou", "hd95", "surface_dice", "auc", "ece", "brier")


def main(argv=None) -> int:
    p = C.base_parser(__doc__)
    p.add_argument("--models", type=int, default=None, help="owner models (default 3; 1 with --smoke)")
    a = p.parse_args(argv)
    st = C.settings(a)
    n = a.models or (1 if st.smoke else 3)
    dev = C.resolve_device(st.device)
    key, _ = C.benchmark_key(st.cache)
    x, y = C.dataset(st.size).test
    per_model = []
    for m in C.owner_models(st, n):
        orig, wm = C.load(m["clean"], st.device), C.load(m["watermarked"], st.device)
        h = harmlessness(orig, wm, x, y, key)
        per_model.append({"model": m["clean_spec"].label + f", embed seed {m['index']}",
                          "embed_seconds": m["embed"].get("embed_seconds"), **h})
        print(f"{per_model[-1]['model']}: Dice {h['original']['dice']:.4f} -> {h['watermarked']['dice']:.4f} "
              f"(drop {h['dice_drop_points']:.2f} points), flip rate {h['flip_rate_clean']:.4%}")

    def mean(get) -> float:
        vals = [float(get(r)) for r in per_model]
        return float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")

    thresholds = list(per_model[0]["dice_over_thresholds"]["original"])
    summary = {
        "models": len(per_model), "n_images": int(len(x)),
        "original": {k: mean(lambda r, k=k: r["original"][k]) for k in METRICS},
        "watermarked": {k: mean(lambda r, k=k: r["watermarked"][k]) for k in METRICS},
        "dice_drop_points": mean(lambda r: r["dice_drop_points"]),
        "dice_drop_points_max": max(r["dice_drop_points"] for r in per_model),
        "flip_rate_clean": mean(lambda r: r["flip_rate_clean"]),
        "flip_rate_triggered": mean(lambda r: r.get("flip_rate_triggered", float("nan"))),
        "dice_over_thresholds": {w: {t: mean(lambda r, w=w, t=t: r["dice_over_thresholds"][w][t])
                                     for t in thresholds} for w in ("original", "watermarked")},
    }
    summary["differences"] = {k: summary["watermarked"][k] - summary["original"][k] for k in METRICS}
    res = {"study": "harmlessness", "settings": st.to_json(), "environment": C.environment(dev),
           "key": key.public_summary(), "summary": summary, "models": per_model,
           "notes": "HD95 in pixels; AUC, ECE and Brier over pooled pixels of the held-out slices; flip rate = "
                    "fraction of pixels whose argmax differs between original and watermarked model"}

    plt = C.pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(6, 4))
        ts = [float(t) for t in thresholds]
        for r in per_model:
            ax.plot(ts, list(r["dice_over_thresholds"]["original"].values()), color="tab:blue", alpha=0.3)
            ax.plot(ts, list(r["dice_over_thresholds"]["watermarked"].values()), color="tab:red", alpha=0.3)
        for w, c in (("original", "tab:blue"), ("watermarked", "tab:red")):
            ax.plot(ts, list(summary["dice_over_thresholds"][w].values()), color=c, lw=2, marker="o",
                    label=f"{w} (mean of {len(per_model)})")
        ax.set_xlabel("foreground probability threshold")
        ax.set_ylabel("mean per-image Dice, held-out slices")
        ax.set_title(f"Dice over thresholds ({st.size}x{st.size})")
        ax.legend()
        res["figure"] = C.save_figure(fig, st.out_dir / "harmlessness_thresholds.png")
    C.write_json(st.out_dir / "harmlessness.json", res)
    print(f"mean Dice drop {summary['dice_drop_points']:.3f} points, flip rate {summary['flip_rate_clean']:.4%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
