"""Study 5, speed and query efficiency.

1. StealthMark's LIME engine against the ``lime`` package on the same model and the same samples, timed in
   one run per configuration (``lime_speed.py``): N = 500, 1000, 2000 at 128 and 256 px, 25 x 25 grid,
   a seeded MONAI UNet (16, 32, 64, 128, 256); the ratio lime / ours and the engine's overhead beyond its
   forward passes.
2. Embedding time against plain fine-tuning of the same clean model for the same number of steps
   (``--steps``, batch 8 clean images; embedding adds trigger and decoy images and the frozen teacher).
3. Query efficiency: for N in 100, 200, 300, 500, 750, 1000, 2000, 4000 LIME samples per image, the decode
   rate over --qe-trials verifications of the owner's watermarked model (key image and 4 blended slices
   alternately), and the smallest N that still decodes in >= 95% of trials.

Writes ``speed.json`` and ``speed_query_efficiency.png`` into --out-dir.

    python benchmarks/speed.py            # full
    python benchmarks/speed.py --smoke    # tiny sizes, < 30 s
    python benchmarks/speed.py --skip lime,embed --merge   # rerun one part, keep the others' figures

``--merge`` carries each skipped part over from the existing ``speed.json`` in --out-dir (marked
``carried_over`` with the run it came from), so that one part can be rerun without losing the others.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import common as C  # noqa: E402
import lime_speed  # noqa: E402


PARTS = {"lime": "lime", "embed": "embedding", "queries": "query_efficiency"}   # --skip name: result key


def previous_parts(path: Path, skip: set[str]) -> dict:
    """The skipped parts of an earlier run's ``speed.json`` (for --merge), each marked with where it came from."""
    if not path.is_file():
        raise ValueError(f"{path} does not exist: there is nothing to carry over")
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not readable JSON ({exc})") from None
    if not isinstance(old, dict) or old.get("study") != "speed":
        raise ValueError(f"{path} is not a speed.py results file")
    out = {}
    for name in sorted(skip):
        part = old.get(PARTS[name])
        if isinstance(part, dict):
            out[PARTS[name]] = {**part, "carried_over": {"from": str(path), "environment": old.get("environment")}}
    return out


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv=None) -> int:
    p = C.base_parser(__doc__)
    p.add_argument("--lime-sizes", default=None, help="image sizes for the LIME comparison (default 128,256)")
    p.add_argument("--lime-samples", default=None, help="N for the LIME comparison (default 500,1000,2000)")
    p.add_argument("--lime-channels", default=None, help="UNet channels for the LIME comparison "
                                                         "(default 16,32,64,128,256)")
    p.add_argument("--steps", type=int, default=None, help="steps for embedding vs fine-tuning (default 100)")
    p.add_argument("--qe-samples", default=None, help="N values for query efficiency "
                                                      "(default 100,200,300,500,750,1000,2000,4000)")
    p.add_argument("--qe-trials", type=int, default=None, help="trials per N (default 20; 2 with --smoke)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: lime, embed, queries")
    p.add_argument("--merge", action="store_true",
                   help="carry the skipped parts over from the existing speed.json in --out-dir")
    a = p.parse_args(argv)
    st = C.settings(a)
    dev = C.resolve_device(st.device)
    skip = set(a.skip.split(",")) - {""}
    unknown = skip - set(PARTS)
    if unknown:
        print(f"error: --skip: unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}",
              file=sys.stderr)
        return 2
    try:
        carried = previous_parts(st.out_dir / "speed.json", skip) if a.merge else {}
    except ValueError as exc:
        print(f"error: --merge: {exc}", file=sys.stderr)
        return 2
    sizes = ints(a.lime_sizes) if a.lime_sizes else ([64] if st.smoke else [128, 256])
    lime_ns = ints(a.lime_samples) if a.lime_samples else ([50, 100] if st.smoke else [500, 1000, 2000])
    lime_ch = a.lime_channels or ("8,16,32" if st.smoke else "16,32,64,128,256")
    steps = a.steps or (5 if st.smoke else 100)
    qe_ns = ints(a.qe_samples) if a.qe_samples else ([20, 40] if st.smoke else [100, 200, 300, 500, 750, 1000, 2000,
                                                                                4000])
    qe_trials = a.qe_trials or (2 if st.smoke else 20)
    res: dict = {"study": "speed", "complete": False, "settings": st.to_json(), "environment": C.environment(dev),
                 **carried}
    tmp = Path(tempfile.mkdtemp(prefix="sm-speed-"))

    # 1. LIME engine vs the lime package
    if "lime" not in skip:
        runs = []
        for size in sizes:
            for n in lime_ns:
                out = tmp / f"lime-{size}-{n}.json"
                lime_speed.main(["--size", str(size), "--grid", "25", "--samples", str(n), "--batch", "64",
                                 "--channels", lime_ch, "--device", str(dev), "--out", str(out)])
                r = json.loads(out.read_text())
                runs.append({"size": size, "samples": n, "ours": r["ours"], "lime": r["lime"],
                             "speedup_lime_over_ours": r["comparison"]["speedup_lime_over_ours"],
                             "max_relative_coefficient_difference":
                                 r["comparison"]["max_relative_coefficient_difference"],
                             "model": r["model"]})
        head = next((r for r in runs if r["size"] == 128 and r["samples"] == 1000), runs[0])
        res["lime"] = {"runs": runs, "headline": {"size": head["size"], "samples": head["samples"]},
                       "speedup_lime_over_ours": head["speedup_lime_over_ours"],
                       "overhead_fraction": head["ours"]["overhead_fraction"],
                       "speedup_range": [min(r["speedup_lime_over_ours"] for r in runs),
                                         max(r["speedup_lime_over_ours"] for r in runs)],
                       "overhead_fraction_range": [min(r["ours"]["overhead_fraction"] for r in runs),
                                                   max(r["ours"]["overhead_fraction"] for r in runs)]}

    C.write_json(st.out_dir / "speed.json", res, quiet=True)   # a stopped run keeps the parts done

    # 2. embedding vs plain fine-tuning, same clean model and steps
    if "embed" not in skip:
        from StealthMarkLib.embed import EmbedConfig
        from StealthMarkLib.sample_data import SAMPLE_LABEL, sample_paths
        from StealthMarkLib.workflows import run_embed

        owner = C.owner_models(st, 1)[0]
        _, key_path = C.benchmark_key(st.cache)
        t1, mask = sample_paths()
        emb = run_embed(owner["clean"], t1, key_path, tmp / "timed-wm.pt", labels=mask, label=SAMPLE_LABEL,
                        steps=steps, device=st.device, config=EmbedConfig(steps=steps, seed=0))
        model = C.load(owner["clean"], st.device)
        ft = C.finetune(model, *C.dataset(st.size).train, steps=steps, lr=1e-3, batch=8, seed=0)
        cfg = emb.log.get("config", {})
        res["embedding"] = {"steps": steps, "embed_seconds": emb.log["seconds"], "finetune_seconds": round(ft, 3),
                            "ratio_embed_over_finetune": emb.log["seconds"] / ft,
                            "images_per_step": {"finetune": 8, "embed_config": {
                                k: cfg.get(k) for k in ("clean_batch", "trigger_batch", "decoys_per_batch")}},
                            "model": owner["clean_spec"].label}

    C.write_json(st.out_dir / "speed.json", res, quiet=True)   # a stopped run keeps the parts done

    # 3. query efficiency
    if "queries" not in skip:
        key, _ = C.benchmark_key(st.cache)
        model = C.load(C.owner_models(st, 1)[0]["watermarked"], st.device)
        inputs = C.trigger_inputs(key, st.size, qe_trials, seed=950)
        rows = []
        for n in qe_ns:
            trials = C.run_trials(model, key, inputs, n, seed=9000, device=model.device)
            rows.append({"samples": n, "asr": C.asr(trials), "owned_rate": C.owned_rate(trials),
                         "mean_agreement": float(np.mean([t["agreement"] for t in trials])),
                         "seconds_per_trial": float(np.mean([t["seconds"] for t in trials])),
                         "trials": len(trials)})
            print(f"N={n}: ASR {rows[-1]['asr']:.2f}, agreement {rows[-1]['mean_agreement']:.3f}")
        ok = [r["samples"] for r in rows if r["asr"] >= 0.95]
        res["query_efficiency"] = {"rows": rows, "trials_per_n": qe_trials,
                                   "min_samples_for_95pct": min(ok) if ok else None,
                                   "note": None if ok else f"no N in {qe_ns} decoded in >= 95% of trials"}

    C.write_json(st.out_dir / "speed.json", res, quiet=True)   # a stopped run keeps the parts done

    plt = C.pyplot()
    if plt is not None and ("lime" in res or "query_efficiency" in res):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        if "lime" in res:
            for size in sorted({r["size"] for r in res["lime"]["runs"]}):
                rr = [r for r in res["lime"]["runs"] if r["size"] == size]
                axes[0].plot([r["samples"] for r in rr], [r["ours"]["seconds_total"] for r in rr], "o-",
                             label=f"ours {size}px")
                axes[0].plot([r["samples"] for r in rr], [r["lime"]["seconds_total"] for r in rr], "s--",
                             label=f"lime {size}px")
            axes[0].set_xlabel("LIME samples N")
            axes[0].set_ylabel("seconds")
            axes[0].set_title("LIME engine vs lime package", fontsize=9)
            axes[0].legend(fontsize=7)
        if "query_efficiency" in res:
            rows = res["query_efficiency"]["rows"]
            axes[1].plot([r["samples"] for r in rows], [r["asr"] for r in rows], "o-")
            axes[1].axhline(0.95, color="k", ls="--", lw=1)
            axes[1].set_ylim(-0.02, 1.02)
            axes[1].set_xlabel("LIME samples N per trigger image")
            axes[1].set_ylabel(f"decode rate ({res['query_efficiency']['trials_per_n']} trials)")
            axes[1].set_xscale("log")
            axes[1].set_title("Query efficiency", fontsize=9)
        fig.suptitle(C.describe_device(dev), fontsize=9)
        res["figure"] = C.save_figure(fig, st.out_dir / "speed_query_efficiency.png")
    res["complete"] = True
    C.write_json(st.out_dir / "speed.json", res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
