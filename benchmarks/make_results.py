"""Collect the studies' JSON results into ``RESULTS.md`` (tables) and ``summary.json`` (issue 5's fields).

Reads ``null_calibration.json``, ``harmlessness.json``, ``robustness.json``, ``baselines.json`` and
``speed.json`` from --results-dir, plus the same files under ``gpu/`` for the GPU section.
A study whose JSON is missing gives null fields, listed as missing; nothing is invented.

    python benchmarks/make_results.py [--results-dir benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from StealthMarkLib.fileio import write_text_atomic  # noqa: E402

SUMMARY_FIELDS = ("null_models", "null_decodes", "null_max_agreement", "wrong_keys", "wrong_key_decodes", "asr",
                  "dice_drop_points", "flip_rate_clean", "robustness", "baselines",
                  "lime_speedup_vs_lime_package", "lime_overhead_fraction", "min_samples_for_95pct", "device")
STUDIES = {"null_calibration": "1. null calibration", "harmlessness": "2. harmlessness",
           "robustness": "3. robustness", "baselines": "4. baselines", "speed": "5. speed"}
COMMANDS = {"null_calibration": "python benchmarks/null_calibration.py",
            "harmlessness": "python benchmarks/harmlessness.py",
            "robustness": "python benchmarks/robustness.py", "speed": "python benchmarks/speed.py",
            "baselines": "python benchmarks/baselines_study.py"}


DEFAULT_SAMPLES = "the verifier's default"   # settings.samples None


def read(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"error: cannot read {path}: {exc}") from None


def load_all(d: Path) -> dict[str, dict | None]:
    return {name: read(d / f"{name}.json") for name in STUDIES}


def num(v: Any, fmt: str = ".3f") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (int, float)):
        return format(v, fmt)
    return str(v)


def pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def robustness_rows(rob: dict | None) -> list[dict] | None:
    if rob is None:
        return None
    return [{"attack": r["attack"], "setting": r["setting"], "asr": r.get("asr"), "dice": r.get("dice")}
            for r in rob["records"]]


def baseline_rows(base: dict | None) -> list[dict] | None:
    """Study 4 (baselines_study.py): one row per method; null when baselines.json is missing."""
    if base is None:
        return None
    return [{"method": m["method"], "asr": m.get("asr"), "dice_drop_points": m.get("dice_drop_points"),
             "null_false_positives": m.get("null_false_positives"), "auc_drop_points": m.get("auc_drop_points"),
             "null_verifications": m.get("null_verifications")} for m in base.get("methods", [])]


def summarise(r: dict[str, dict | None]) -> dict[str, Any]:
    null, harm, rob, speed = r["null_calibration"], r["harmlessness"], r["robustness"], r["speed"]
    s: dict[str, Any] = dict.fromkeys(SUMMARY_FIELDS)
    if null is not None:
        ns, wk = null["null_summary"], null["wrong_keys_summary"]
        s.update(null_models=ns["models"], null_decodes=ns["decodes"], null_max_agreement=ns["max_agreement"],
                 wrong_keys=wk["keys"], wrong_key_decodes=wk["decodes"], asr=null["watermarked_summary"]["asr"])
    if s["asr"] is None and rob is not None:
        base = next((x for x in rob["records"] if x["attack"] == "none" and "no attack" in x["setting"]), None)
        s["asr"] = base["asr"] if base else None
    if harm is not None:
        s.update(dice_drop_points=harm["summary"]["dice_drop_points"], flip_rate_clean=harm["summary"]["flip_rate_clean"])
    s["robustness"] = robustness_rows(rob)
    s["baselines"] = baseline_rows(r["baselines"])
    if speed is not None:
        lime = speed.get("lime")
        if lime:
            s.update(lime_speedup_vs_lime_package=lime["speedup_lime_over_ours"],
                     lime_overhead_fraction=lime["overhead_fraction"])
        qe = speed.get("query_efficiency")
        if qe:
            s["min_samples_for_95pct"] = qe["min_samples_for_95pct"]
    devices = sorted({doc["environment"]["device"] for doc in r.values() if doc and "environment" in doc})
    s["device"] = "; ".join(devices) if devices else None
    assert tuple(s) == SUMMARY_FIELDS
    return s


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out + [""]


def provenance(doc: dict) -> str:
    st, env = doc.get("settings", {}), doc.get("environment", {})
    smoke = " **SMOKE RUN (tiny sizes): not real figures**" if st.get("smoke") else ""
    if doc.get("complete") is False:
        smoke += " **INCOMPLETE: the run stopped early; only the parts shown were measured**"
    return (f"_{env.get('device', '?')}, {env.get('cpu', '?')}, torch {env.get('torch', '?')}; "
            f"{st.get('size', '?')}x{st.get('size', '?')} px, UNet {st.get('channels', '?')}, "
            f"{st.get('samples') or DEFAULT_SAMPLES} LIME samples, {st.get('trials', '?')} trials._{smoke}")


def robustness_md(rob: dict) -> list[str]:
    rows = [[x["attack"], x["setting"], num(x.get("asr"), ".2f"), num(x.get("dice"), ".4f"),
             num(x.get("mean_agreement"), ".3f"), x.get("error") or x.get("note") or ""] for x in rob["records"]]
    resumed = rob.get("resumed")
    kept = ([f"- resumed (`--resume`): {resumed['kept_records']} records kept from a stopped run "
             f"({resumed['check']}); the others measured in this run"] if resumed else [])
    return table(["attack", "setting", "ASR", "Dice", "mean agreement", "note"], rows) + \
        [f"- {n}" for n in rob.get("notes", [])] + kept + [""]


def speed_md(speed: dict) -> list[str]:
    carried = [name for name in ("lime", "embedding", "query_efficiency") if "carried_over" in speed.get(name, {})]
    out = [f"_Carried over (`--merge`) from an earlier run: {', '.join(carried)}; measured in this run: the rest._",
           ""] if carried else []
    if "lime" in speed:
        out += table(["size", "N", "ours s", "ours forward s", "ours overhead", "lime s", "lime / ours"],
                     [[x["size"], x["samples"], num(x["ours"]["seconds_total"], ".2f"),
                       num(x["ours"]["seconds_forward"], ".2f"), pct(x["ours"]["overhead_fraction"]),
                       num(x["lime"]["seconds_total"], ".2f"), num(x["speedup_lime_over_ours"], ".2f") + "x"]
                      for x in speed["lime"]["runs"]])
    if "embedding" in speed:
        e = speed["embedding"]
        out += [f"Embedding vs plain fine-tuning, {e['steps']} steps ({e['model']}): {num(e['embed_seconds'], '.2f')} s "
                f"vs {num(e['finetune_seconds'], '.2f')} s, ratio {num(e['ratio_embed_over_finetune'], '.2f')}x.", ""]
    if "query_efficiency" in speed:
        q = speed["query_efficiency"]
        out += table(["LIME samples N", "decode rate", "owned rate", "mean agreement", "s / trial"],
                     [[x["samples"], num(x["asr"], ".2f"), num(x["owned_rate"], ".2f"),
                       num(x["mean_agreement"], ".3f"), num(x["seconds_per_trial"], ".2f")] for x in q["rows"]])
        out += [f"Smallest N decoding in >= 95% of {q['trials_per_n']} trials: {num(q['min_samples_for_95pct'], 'd')}"
                + (f" ({q['note']})" if q.get("note") else ""), ""]
    return out


def baselines_md(base: dict) -> list[str]:
    ms = base["methods"]
    out = [provenance(base), "",
           f"The same clean owner model ({base['owner_model']}) watermarked by each method; Dice and pixel-AUC "
           f"drops on {base['held_out_slices']} held-out slices; null models: the {len(base['null_models'])} "
           "clean models of study 1.", ""]
    out += table(["method", "ASR", "trials", "Dice drop (points)", "AUC drop (points)", "null false positives",
                  "ASR means"],
                 [[m["method"], num(m["asr"], ".2f"), len(m["trials"]), num(m["dice_drop_points"]),
                   num(m["auc_drop_points"]), f"{m['null_false_positives']} / {m['null_verifications']}",
                   m.get("asr_definition", "")] for m in ms])
    ref = next((m for m in ms if m["method"] == "reference"), None)
    if ref is not None:
        out += [f"Reference design on the null models: its QR picture decodes the key's payload in "
                f"{ref['null_qr_payload_decodes']} of {ref['null_verifications']} verifications; its detector flags "
                f"{pct(ref['null_detector_flag_rate'])} of their triggered slices.", ""]
    q = base.get("clean_model_qr")
    if q:
        out += [f"On the owner's clean model ({q['model']}): the reference design's QR picture decodes "
                f"{q['reference_qr_decodes']!r} (equal to the occlusion pattern: "
                f"{q['reference_qr_equals_occlusion_pattern']}; verdict {q['reference_verdict_on_clean']}); "
                f"StealthMark's attribution decodes {q['stealthmark_clean_decodes']!r} (agreement "
                f"{num(q['stealthmark_clean_agreement'])}, verdict {q['stealthmark_clean_verdict']}).", ""]
    if base.get("figure"):
        out += [f"![QR pictures on a clean model]({base['figure']})", ""]
    return out


def markdown(r: dict[str, dict | None], s: dict, gpu: dict[str, dict | None], missing: list[str]) -> str:
    L = ["# StealthMark benchmark results", "",
         "Generated by `python benchmarks/make_results.py` from the JSON files in this folder; do not edit by "
         "hand. Each section names the command that produced it (benchmarks/README.md gives the run times).", ""]
    if missing:
        L += ["**Missing studies** (their summary fields are null): " + ", ".join(missing), ""]
    L += ["## Summary (summary.json)", ""]
    L += table(["field", "value"], [[k, num(v, ".4g") if not isinstance(v, list) else f"{len(v)} rows"]
                                    for k, v in s.items()])
    null = r["null_calibration"]
    L += ["## 1. Null calibration", "", f"`{COMMANDS['null_calibration']}`", ""]
    if null:
        ns, w, wk, rule = null["null_summary"], null["watermarked_summary"], null["wrong_keys_summary"], null["decision_rule"]
        L += [provenance(null), "",
              f"Decision rule: {rule['rule']}; alpha = {rule['alpha_owned']:g}, i.e. agreement >= "
              f"{num(rule['agreement_threshold'])} of {rule['n_data_modules']} data modules.", ""]
        L += table(["population", "models / keys", "verifications", "decodes", "owned verdicts", "rate",
                    "agreement mean (max)"],
                   [["clean models (" + ", ".join(ns["architectures"]) + ")", ns["models"], ns["verifications"],
                     ns["decodes"], ns["false_positives"], "FPR " + num(ns["false_positive_rate"]),
                     f"{num(ns['agreement'].get('mean'))} ({num(ns['max_agreement'])})"],
                    ["watermarked models", w["models"], w["verifications"], "-", "-",
                     "TPR " + num(w["true_positive_rate"]) + ", ASR " + num(w["asr"]),
                     f"{num(w['agreement'].get('mean'))} ({num(w['agreement'].get('max'))})"],
                    ["wrong keys on a watermarked model", wk["keys"], wk["keys"], wk["decodes"], wk["false_claims"],
                     f"owner payload decoded {wk['owner_payload_decodes']}x",
                     f"{num(wk['agreement_same_payload'].get('mean'))} / {num(wk['agreement_other_payload'].get('mean'))} "
                     f"(same / other payload) ({num(wk['max_agreement'])})"]])
        if null.get("figure"):
            L += [f"![agreement histogram]({null['figure']})", ""]
    else:
        L += ["Missing.", ""]
    harm = r["harmlessness"]
    L += ["## 2. Harmlessness", "", f"`{COMMANDS['harmlessness']}`", ""]
    if harm:
        h = harm["summary"]
        L += [provenance(harm), "", f"Mean over {h['models']} owner models, {h['n_images']} held-out slices.", ""]
        L += table(["metric", "original", "watermarked", "difference"],
                   [[k, num(h["original"][k], ".4f"), num(h["watermarked"][k], ".4f"), num(h["differences"][k], "+.4f")]
                    for k in h["original"]])
        L += [f"Dice drop {num(h['dice_drop_points'])} points (worst model {num(h['dice_drop_points_max'])}); "
              f"argmax flip rate {pct(h['flip_rate_clean'])} on clean, {pct(h['flip_rate_triggered'])} on "
              "key-blended slices.", ""]
        L += table(["threshold"] + list(h["dice_over_thresholds"]["original"]),
                   [[w] + [num(v, ".4f") for v in h["dice_over_thresholds"][w].values()]
                    for w in ("original", "watermarked")])
        if harm.get("figure"):
            L += [f"![Dice over thresholds]({harm['figure']})", ""]
    else:
        L += ["Missing.", ""]
    rob = r["robustness"]
    L += ["## 3. Robustness", "", f"`{COMMANDS['robustness']}`", ""]
    L += ([provenance(rob), ""] + robustness_md(rob) + ([f"![robustness]({rob['figure']})", ""] if rob.get("figure") else [])
          if rob else ["Missing.", ""])
    base = r["baselines"]
    L += ["## 4. Baselines", "", f"`{COMMANDS['baselines']}`", ""]
    L += baselines_md(base) if base else ["Missing.", ""]
    speed = r["speed"]
    L += ["## 5. Speed", "", f"`{COMMANDS['speed']}`", ""]
    L += ([provenance(speed), ""] + speed_md(speed) + ([f"![speed]({speed['figure']})", ""] if speed.get("figure") else [])
          if speed else ["Missing.", ""])
    L += ["## GPU (benchmarks/gpu.sh)", ""]
    if gpu.get("robustness") or gpu.get("speed"):
        if gpu.get("robustness"):
            L += ["### Robustness", "", provenance(gpu["robustness"]), ""] + robustness_md(gpu["robustness"])
        if gpu.get("speed"):
            L += ["### Speed", "", provenance(gpu["speed"]), ""] + speed_md(gpu["speed"])
    else:
        L += ["Not run yet: the GPU figures are missing.", ""]
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args(argv)
    d = Path(a.results_dir)
    if not d.is_dir():
        print(f"error: results folder {d} does not exist: run the studies first (benchmarks/run_all.sh)",
              file=sys.stderr)
        return 2
    r = load_all(d)
    gpu = {name: read(d / "gpu" / f"{name}.json") for name in ("robustness", "speed")}
    s = summarise(r)
    missing = [f"{STUDIES[k]} ({k}.json)" for k, v in r.items() if v is None]
    write_text_atomic(d / "summary.json", json.dumps(s, indent=2) + "\n")
    write_text_atomic(d / "RESULTS.md", markdown(r, s, gpu, missing))
    print(f"wrote {d / 'summary.json'} and {d / 'RESULTS.md'}")
    if missing:
        print("missing: " + ", ".join(missing))
    return 0


if __name__ == "__main__":
    sys.exit(main())
