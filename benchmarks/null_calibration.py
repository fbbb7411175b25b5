"""Study 1, null calibration: how often does verification claim a model that was never watermarked?

- >= 20 independently trained clean models (seeds, widths; MONAI ``UNet`` and ``SegResNet``) verified with
  the owner's (published benchmark) key, once on the key image and once on 4 key-blended held-out slices:
  the data-module agreement distribution, decodes (must be 0) and the empirical false-positive rate at the
  decision rule of ``StealthMarkLib/verify.py`` (owned iff the decoded payload is the key's and p <= 1e-9);
- the true-positive rate of watermarked models at that rule (3 owner models: clean seeds 0-2, embed seeds 0-2);
- 100 random wrong keys on the first watermarked model (half with the owner's payload and another seed,
  half with other payloads; alternately on the wrong key's key image and on 4 blended slices).

Writes ``null_calibration.json`` and ``null_calibration.png`` (agreement histogram) into --out-dir.

    python benchmarks/null_calibration.py            # full (see benchmarks/README.md)
    python benchmarks/null_calibration.py --smoke    # tiny sizes, < 30 s
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import common as C  # noqa: E402
from StealthMarkLib.key import create_key  # noqa: E402
from StealthMarkLib.verify import ALPHA_NULL, ALPHA_OWNED  # noqa: E402

UNET_WIDTHS = [(8, 16, 32, 64), (16, 32, 64, 128), (8, 16, 32), (12, 24, 48, 96)]
SEGRESNET_FILTERS = [8, 16, 24]     # SegResNet's GroupNorm has 8 groups: multiples of 8 only


def null_specs(n: int, size: int, steps: int, smoke: bool) -> list[C.CleanSpec]:
    """Model j: SegResNet when j % 3 == 2, else UNet; widths cycle; seed 100 + j."""
    out = []
    for j in range(n):
        if (j % 3 == 2) or (smoke and j % 2 == 1):
            out.append(C.CleanSpec("SegResNet", (SEGRESNET_FILTERS[(j // 3) % 3],), size, steps, 100 + j))
        else:
            width = (8, 16, 32) if smoke else UNET_WIDTHS[j % len(UNET_WIDTHS)]
            out.append(C.CleanSpec("UNet", width, size, steps, 100 + j))
    return out


def stats(values: list[float]) -> dict:
    v = np.asarray(values, dtype=float)
    if not len(v):
        return {"n": 0}
    return {"n": int(len(v)), "mean": float(v.mean()), "sd": float(v.std()), "min": float(v.min()),
            "max": float(v.max())}


def main(argv=None) -> int:
    p = C.base_parser(__doc__)
    p.add_argument("--null-models", type=int, default=None, help="clean models (default 20; 2 with --smoke)")
    p.add_argument("--watermarked-models", type=int, default=None, help="owner models (default 3; 1 smoke)")
    p.add_argument("--wrong-keys", type=int, default=None, help="random wrong keys (default 100; 4 smoke)")
    a = p.parse_args(argv)
    st = C.settings(a)
    n_null = a.null_models or (2 if st.smoke else 20)
    n_wm = a.watermarked_models or (1 if st.smoke else 3)
    n_wrong = a.wrong_keys or (4 if st.smoke else 100)
    dev = C.resolve_device(st.device)
    key, _ = C.benchmark_key(st.cache)
    timer = C.Timer()
    res: dict = {"study": "null_calibration", "settings": st.to_json(), "environment": C.environment(dev),
                 "key": key.public_summary()}

    # 1. clean models, the owner's key
    null = []
    with timer("null_models"):
        for j, cs in enumerate(null_specs(n_null, st.size, st.clean_steps, st.smoke)):
            model = C.load(C.clean_model_path(cs, st.cache, st.device), st.device)
            inputs = C.trigger_inputs(key, st.size, 2, seed=500 + j)   # key image, then 4 blended slices
            trials = C.run_trials(model, key, inputs, st.samples, seed=3000 + 10 * j, device=model.device)
            null.append({"model": cs.label, "arch": cs.arch, "width": list(cs.width), "seed": cs.seed,
                         "trials": trials})
            print(f"null {cs.label}: " + ", ".join(f"{t['input'][:8]} {t['agreement']:.3f} {t['verdict']}"
                                                   for t in trials))
    n_data = null[0]["trials"][0]["n_data_modules"]
    threshold = C.agreement_threshold(n_data)
    null_trials = [t for m in null for t in m["trials"]]
    res["decision_rule"] = {
        "rule": "owned iff the decoded payload equals the key's and the binomial p-value <= alpha_owned "
                "(StealthMarkLib.verify.decide)",
        "alpha_owned": ALPHA_OWNED, "alpha_null": ALPHA_NULL, "n_data_modules": n_data,
        "agreement_threshold": threshold}
    res["null"] = null
    res["null_summary"] = {
        "models": len(null), "architectures": sorted({m["arch"] for m in null}),
        "verifications": len(null_trials),
        "decodes": sum(t["decoded"] is not None for t in null_trials),
        "owner_payload_decodes": sum(t["match"] for t in null_trials),
        "false_positives": sum(t["verdict"] == "owned" for t in null_trials),
        "false_positive_rate": float(np.mean([t["verdict"] == "owned" for t in null_trials])),
        "above_agreement_threshold": sum(t["agreement"] >= threshold for t in null_trials),
        "verdicts": {v: sum(t["verdict"] == v for t in null_trials) for v in ("owned", "not-owned", "inconclusive")},
        "agreement": stats([t["agreement"] for t in null_trials]),
        "max_agreement": max(t["agreement"] for t in null_trials),
    }

    # 2. watermarked models: true-positive rate at the same rule
    wm = []
    with timer("watermarked_models"):
        for m in C.owner_models(st, n_wm):
            model = C.load(m["watermarked"], st.device)
            inputs = C.trigger_inputs(key, st.size, st.trials, seed=600 + m["index"])
            trials = C.run_trials(model, key, inputs, st.samples, seed=1000 + 100 * m["index"],
                                  device=model.device)
            wm.append({"model": m["clean_spec"].label + f", embed seed {m['index']}", "trials": trials,
                       "asr": C.asr(trials), "owned_rate": C.owned_rate(trials)})
            print(f"watermarked {wm[-1]['model']}: ASR {wm[-1]['asr']:.2f}")
    wm_trials = [t for m in wm for t in m["trials"]]
    res["watermarked"] = wm
    res["watermarked_summary"] = {"models": len(wm), "verifications": len(wm_trials), "asr": C.asr(wm_trials),
                                  "true_positive_rate": C.owned_rate(wm_trials),
                                  "agreement": stats([t["agreement"] for t in wm_trials])}

    # 3. wrong keys on the first watermarked model
    wrong = []
    first = C.load(C.owner_models(st, 1)[0]["watermarked"], st.device)
    with timer("wrong_keys"):
        for j in range(n_wrong):
            same = j % 2 == 0
            payload = key.payload if same else f"SM:WRONG-{j:04d}"
            wk = create_key(payload, seed=70000 + j)
            kind = "key-image" if (j // 2) % 2 == 0 else "blended"
            inputs = C.trigger_inputs(wk, st.size, 1, seed=800 + j, only=kind)
            t = C.run_trials(first, wk, inputs, st.samples, seed=5000 + 10 * j, device=first.device)[0]
            t.update({"wrong_key": j, "same_payload": same, "owner_payload_decoded": t["decoded"] == key.payload})
            wrong.append(t)
    res["wrong_keys"] = wrong
    res["wrong_keys_summary"] = {
        "keys": len(wrong), "decodes": sum(t["decoded"] is not None for t in wrong),
        "owner_payload_decodes": sum(t["owner_payload_decoded"] for t in wrong),
        "false_claims": sum(t["verdict"] == "owned" for t in wrong),
        "agreement_same_payload": stats([t["agreement"] for t in wrong if t["same_payload"]]),
        "agreement_other_payload": stats([t["agreement"] for t in wrong if not t["same_payload"]]),
        "max_agreement": max(t["agreement"] for t in wrong) if wrong else None,
    }
    res["seconds"] = timer.seconds

    plt = C.pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(7, 4))
        bins = np.linspace(0, 1, 51)
        ax.hist([t["agreement"] for t in null_trials], bins=bins, alpha=0.7, label=f"clean models (n={len(null_trials)})")
        ax.hist([t["agreement"] for t in wrong], bins=bins, alpha=0.6, label=f"wrong keys (n={len(wrong)})")
        ax.hist([t["agreement"] for t in wm_trials], bins=bins, alpha=0.7, label=f"watermarked (n={len(wm_trials)})")
        ax.axvline(threshold, color="k", ls="--", label=f"p <= {ALPHA_OWNED:g} threshold ({threshold:.3f})")
        ax.set_xlabel("data-module agreement with the key's QR")
        ax.set_ylabel("verifications")
        ax.set_title(f"Null calibration ({st.size}x{st.size}, {C.samples_text(st.samples)})")
        ax.legend(fontsize=8)
        res["figure"] = C.save_figure(fig, st.out_dir / "null_calibration.png")
    C.write_json(st.out_dir / "null_calibration.json", res)
    s, w, k = res["null_summary"], res["watermarked_summary"], res["wrong_keys_summary"]
    print(f"null: {s['models']} models, {s['decodes']} decodes, FPR {s['false_positive_rate']:.3f}, max agreement "
          f"{s['max_agreement']:.3f}; watermarked TPR {w['true_positive_rate']:.2f}; wrong keys: {k['decodes']} "
          f"decodes, {k['false_claims']} false claims")
    return 0


if __name__ == "__main__":
    sys.exit(main())
