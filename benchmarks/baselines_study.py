"""Study 4, baselines: StealthMark against the paper's ``reference`` design and a ``badnets`` watermark.

On the same data and owner model as the other studies (the bundled T1 MRI; the owner's clean UNet, clean
seed 0, trained as in study 1), each method watermarks a copy of the same clean model with the published
benchmark key (StealthMark: study 1's cached watermarked model; ``reference`` and ``badnets``:
``StealthMarkLib.baselines.embed_baseline`` for the same number of steps, embed seed 0). Per method:

- Dice drop and pixel-AUC drop (percentage points) on the 16 held-out slices, original against watermarked
  (``StealthMarkLib.workflows.harmlessness`` / ``baselines.baseline_harmlessness``, as study 2);
- ASR over --trials verification trials of the watermarked model: StealthMark as in studies 1 and 3 (even
  trials the key image, odd trials 4 random key-blended held-out slices; ASR = the key's payload decoded);
  the baselines through ``baselines.verify_baseline`` on 4 random held-out slices per trial (their own
  trigger is put on them; ASR = the ``owned`` verdict; ``reference`` needs its detector, fitted on the
  watermarked model at embedding);
- false positives on the null models of study 1 (the same clean models from the shared cache: same seeds,
  widths and architectures as ``null_calibration.py``), 2 verifications each with the owner's key: the
  number of ``owned`` verdicts. For ``reference`` also how often its QR picture decodes to the key's
  payload on a clean model (always: the picture is the verifier's own occlusion pattern, METHOD.md
  section 2) and how often its detector flags triggered clean-model slices.

Figure ``baselines_qr.png``: the payload's QR, the reference design's QR picture on the owner's clean
(never watermarked) model, and StealthMark's attribution on the same clean model (key image), with what
each decodes to. Writes ``baselines.json`` into --out-dir.

    python benchmarks/baselines_study.py            # full
    python benchmarks/baselines_study.py --smoke    # tiny sizes, < 40 s (models from study 1's cache)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import common as C  # noqa: E402
from null_calibration import null_specs  # noqa: E402
from StealthMarkLib import baselines as B  # noqa: E402
from StealthMarkLib.errors import InputError  # noqa: E402
from StealthMarkLib.models import SegmentationModel, save_model  # noqa: E402
from StealthMarkLib.qr import decode  # noqa: E402
from StealthMarkLib.verify import verify_query  # noqa: E402
from StealthMarkLib.workflows import harmlessness  # noqa: E402

_BASELINE_SOURCES = C._CLEAN_SOURCES + ("baselines.py", "embed.py", "key.py", "qr.py", "grid.py")
SLICES_PER_TRIAL = 4
NULL_VERIFICATIONS = 2      # per null model, as in study 1


def baseline_model_path(method: str, clean_path: Path, key, steps: int, seed: int, st: C.Settings
                        ) -> tuple[Path, dict]:
    """Embed ``method`` into the cached clean model (or reuse); returns the path and the embedding record.
    ``reference`` also writes its detector beside the model (``<name>.detector.json``)."""
    tag = C._hash({"method": method, "clean": clean_path.name, "key": key.commitment, "steps": steps,
                   "seed": seed, "code": C._fingerprint(_BASELINE_SOURCES)})
    path = Path(st.cache) / f"{method}-{tag}.pt"
    meta = path.with_suffix(".embed.json")
    det = path.with_suffix(".detector.json")
    if path.is_file() and meta.is_file() and (method != "reference" or det.is_file()):
        return path, json.loads(meta.read_text())
    clean = C.load(clean_path, st.device)
    module, log, detector = B.embed_baseline(method, clean, key, *C.dataset(st.size).train,
                                             B.BaselineConfig(steps=steps, seed=seed))
    wm = SegmentationModel(module, clean.spec, device=clean.device, logits=clean.logits)
    save_model(wm, path, clean.spec, fmt="state_dict")
    doc = {"method": method, "clean": clean_path.name, "steps": steps, "seed": seed, "log": log.to_json()}
    if detector is not None:
        detector.save(det)
        doc["detector"] = detector.to_json()
    C.write_json(meta, doc)
    return path, doc


def slice_sets(n: int, n_images: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    k = min(SLICES_PER_TRIAL, n_images)
    return [sorted(int(i) for i in rng.choice(n_images, k, replace=False)) for _ in range(n)]


def baseline_trials(method: str, model, key, images: np.ndarray, sets: list[list[int]], detector) -> list[dict]:
    """One ``verify_baseline`` per slice set; the fields kept are public (no key material)."""
    out = []
    for sl in sets:
        r = B.verify_baseline(method, model, key, images[sl], detector=detector).report
        s = r.statistics
        t = {"slices": sl, "verdict": r.verdict, "owned": r.verdict == "owned", "n_queries": r.n_queries}
        if method == "reference":
            t.update(detection_rate_triggered=s["detection_rate_triggered"],
                     detection_rate_clean=s["detection_rate_clean"], qr_decodes=bool(s["qr_decodes"]),
                     qr_matches_key=bool(s["qr_matches_key"]),
                     qr_equals_occlusion_pattern=bool(s["qr_equals_occlusion_pattern"]))
        else:
            t.update(mean_iou_triggered=s["mean_iou_triggered"], mean_iou_clean=s["mean_iou_clean"])
        out.append(t)
    return out


def rate(trials: list[dict], field: str) -> float | None:
    return float(np.mean([bool(t[field]) for t in trials])) if trials else None


def drops(h: dict) -> dict:
    o, w = h["original"], h["watermarked"]
    return {"dice_original": o["dice"], "dice_watermarked": w["dice"], "dice_drop_points": h["dice_drop_points"],
            "auc_original": o["auc"], "auc_watermarked": w["auc"],
            "auc_drop_points": round(100.0 * (o["auc"] - w["auc"]), 4), "flip_rate_clean": h["flip_rate_clean"]}


def qr_figure(st: C.Settings, key, payload_qr: np.ndarray, ref_expl, ref_decoded: str | None, sm_clean,
              sm_wm) -> str | None:
    """Payload QR | reference picture on the clean model | StealthMark on the clean / watermarked model."""
    plt = C.pyplot()
    if plt is None:
        return None
    panels = [(payload_qr, "the key's payload QR\n(what an owner claims)", "gray_r"),
              (ref_expl.picture, f"reference design on a CLEAN model:\noccluded-cell picture decodes "
                                 f"{ref_decoded or 'nothing'}", "gray_r"),
              (sm_clean.aggregated, f"StealthMark on the same CLEAN model:\nattribution decodes "
                                    f"{sm_clean.report.payload_decoded or 'nothing'} (agreement "
                                    f"{sm_clean.report.data_module_agreement:.2f})", "gray"),
              (sm_wm.aggregated, f"StealthMark on its WATERMARKED model:\ndecodes "
                                 f"{sm_wm.report.payload_decoded or 'nothing'} (agreement "
                                 f"{sm_wm.report.data_module_agreement:.2f})", "gray")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.4))
    for ax, (img, title, cmap) in zip(axes, panels):
        ax.imshow(np.asarray(img, dtype=float), cmap=cmap, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"Does the QR appear on a model that was never watermarked? ({st.size}x{st.size}, "
                 f"{key.grid}x{key.grid} grid, {C.samples_text(st.samples)})", fontsize=10)
    return C.save_figure(fig, st.out_dir / "baselines_qr.png")


def main(argv=None) -> int:
    p = C.base_parser(__doc__)
    p.add_argument("--null-models", type=int, default=None,
                   help="clean models of study 1 to test for false positives (default 20; 2 with --smoke)")
    a = p.parse_args(argv)
    st = C.settings(a)
    n_null = a.null_models or (2 if st.smoke else 20)
    if n_null < 1:
        raise InputError("--null-models must be at least 1")
    dev = C.resolve_device(st.device)
    key, _ = C.benchmark_key(st.cache)
    timer = C.Timer()
    x, y = C.dataset(st.size).test
    owner = C.owner_models(st, 1)[0]
    clean = C.load(owner["clean"], st.device)
    sets = slice_sets(st.trials, len(x), seed=900)
    null = null_specs(n_null, st.size, st.clean_steps, st.smoke)
    null_models = [(cs, C.load(C.clean_model_path(cs, st.cache, st.device), st.device)) for cs in null]
    methods: list[dict] = []

    # StealthMark: study 1's watermarked model, verified as in studies 1 and 3
    with timer("stealthmark"):
        wm = C.load(owner["watermarked"], st.device)
        h = harmlessness(clean, wm, x, y, key)
        trials = C.run_trials(wm, key, C.trigger_inputs(key, st.size, st.trials, seed=600), st.samples, seed=1000,
                              device=wm.device)
        null_trials = []
        for j, (cs, m) in enumerate(null_models):   # study 1's inputs and LIME seeds for these models
            for t in C.run_trials(m, key, C.trigger_inputs(key, st.size, NULL_VERIFICATIONS, seed=500 + j),
                                  st.samples, seed=3000 + 10 * j, device=m.device):
                null_trials.append({"model": cs.label, **t})
    methods.append({"method": "stealthmark", "asr": C.asr(trials), "owned_rate": C.owned_rate(trials),
                    **drops(h), "trials": trials, "null_verifications": len(null_trials),
                    "null_false_positives": sum(t["verdict"] == "owned" for t in null_trials),
                    "null_payload_decodes": sum(bool(t["match"]) for t in null_trials), "null": null_trials,
                    "asr_definition": "fraction of trials whose LIME picture decodes the key's payload",
                    "embed_steps": st.embed_steps})

    # the baselines: the same clean model, the same key, the same number of steps
    ref_detector = None
    for method in B.BASELINES:
        with timer(method):
            path, meta = baseline_model_path(method, owner["clean"], key, st.embed_steps, 0, st)
            bm = C.load(path, st.device)
            detector = None
            if method == "reference":
                detector = ref_detector = B.ReferenceDetector.load(path.with_suffix(".detector.json"))
            h = B.baseline_harmlessness(method, clean, bm, key, x, y)
            trials = baseline_trials(method, bm, key, x, sets, detector)
            null_trials = []
            for j, (cs, m) in enumerate(null_models):
                for t in baseline_trials(method, m, key, x, slice_sets(NULL_VERIFICATIONS, len(x), 500 + j),
                                         detector):
                    null_trials.append({"model": cs.label, **t})
        rec = {"method": method, "asr": rate(trials, "owned"), "owned_rate": rate(trials, "owned"), **drops(h),
               "trials": trials, "null_verifications": len(null_trials),
               "null_false_positives": sum(t["owned"] for t in null_trials), "null": null_trials,
               "embed_seconds": meta["log"]["seconds"], "embed_steps": st.embed_steps}
        if method == "reference":
            rec.update(asr_definition="fraction of trials with verdict owned (detector flags >= half of the "
                                      "triggered slices and the occlusion QR decodes the key's payload)",
                       null_qr_payload_decodes=sum(t["qr_matches_key"] for t in null_trials),
                       null_detector_flag_rate=float(np.mean([t["detection_rate_triggered"] for t in null_trials])),
                       detector_train_accuracy=meta["detector"]["train_accuracy"],
                       flip_rate_triggered=h["flip_rate_triggered"])
        else:
            rec.update(asr_definition=f"fraction of trials with verdict owned (mean IoU of the triggered "
                                      f"predictions with the key's target mask >= {B.BADNETS_IOU})",
                       triggered=h["triggered"])
        methods.append(rec)

    # figure: is the QR there on a model that was never watermarked?
    with timer("figure"):
        ref_v = B.verify_baseline("reference", clean, key, x[sets[0]], detector=ref_detector)
        ref_expl = ref_v.explanation
        ref_dec = decode(ref_expl.picture)
        kimg = C.key_image(key, st.size)
        sm_clean = verify_query(clean, key, kimg, samples=st.samples, seed=7000, device=clean.device)
        sm_wm = verify_query(wm, key, kimg, samples=st.samples, seed=7000, device=wm.device)
        figure = {"model": owner["clean_spec"].label + " (clean, never watermarked)",
                  "reference_qr_decodes": ref_dec.text, "reference_qr_matches_key": ref_dec.text == key.payload,
                  "reference_qr_equals_occlusion_pattern": ref_expl.equals_occlusion_pattern,
                  "reference_verdict_on_clean": ref_v.report.verdict,
                  "stealthmark_clean_decodes": sm_clean.report.payload_decoded,
                  "stealthmark_clean_agreement": float(sm_clean.report.data_module_agreement),
                  "stealthmark_clean_verdict": sm_clean.report.verdict,
                  "stealthmark_watermarked_decodes": sm_wm.report.payload_decoded,
                  "stealthmark_watermarked_agreement": float(sm_wm.report.data_module_agreement)}
        png = qr_figure(st, key, key.modules(), ref_expl, ref_dec.text, sm_clean, sm_wm)

    res = {"study": "baselines", "settings": st.to_json(), "environment": C.environment(dev),
           "key": key.public_summary(), "owner_model": owner["clean_spec"].label,
           "null_models": [cs.label for cs, _ in null_models], "held_out_slices": int(len(x)),
           "methods": methods, "clean_model_qr": figure, "seconds": timer.seconds,
           "notes": ["Dice and AUC drops in percentage points on the clean held-out slices (AUC over pooled "
                     "pixels, as study 2).",
                     "The reference detector was fitted on the owner's reference-watermarked model and is applied "
                     "unchanged to the null models, as a verifier would.", B.REFERENCE_NOTE, B.BADNETS_NOTE]}
    if png:
        res["figure"] = png
    C.write_json(st.out_dir / "baselines.json", res)
    for m in methods:
        print(f"{m['method']:>11}: ASR {m['asr']:.2f}, Dice drop {m['dice_drop_points']:.2f} points, AUC drop "
              f"{m['auc_drop_points']:.2f} points, null false positives {m['null_false_positives']}/"
              f"{m['null_verifications']}")
    print(f"clean model: reference QR decodes {figure['reference_qr_decodes']!r}; StealthMark decodes "
          f"{figure['stealthmark_clean_decodes']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
