"""Smoke runs of the benchmark suite (issue 5), so that the studies cannot rot.

Studies 1, 2 and 4 run in this process (their ``main`` with ``--smoke``); studies 3 and 5 run through
``benchmarks/gpu.sh --smoke`` (its CPU dry run), all sharing one model cache in a temporary folder; then
``make_results.py`` collects them. Real MONAI models, real LIME and real QR decoding at tiny sizes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import make_results  # noqa: E402

ATTACKS = {"none", "finetune", "prune", "fp16", "int8", "torchscript", "onnx", "input-noise", "input-blur",
           "temperature", "round", "label-only"}


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@pytest.fixture(scope="module")
def results(tmp_path_factory, one_torch_thread):
    import baselines_study
    import harmlessness
    import null_calibration

    tmp = tmp_path_factory.mktemp("bench")
    out, cache = tmp / "results", tmp / "cache"
    common = ["--smoke", "--out-dir", str(out), "--cache", str(cache)]
    assert null_calibration.main(common) == 0
    assert harmlessness.main(common) == 0
    assert baselines_study.main(common) == 0
    env = {**os.environ, "PYTHON": sys.executable, "OUT_DIR": str(out), "CACHE_DIR": str(cache)}
    proc = subprocess.run(["bash", str(BENCH / "gpu.sh"), "--smoke"], env=env, capture_output=True, text=True,
                          timeout=2000)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert make_results.main(["--results-dir", str(out)]) == 0
    return out


def test_every_study_writes_its_json_and_plot(results):
    for name in ("null_calibration", "harmlessness", "robustness", "baselines", "speed"):
        doc = json.loads((results / f"{name}.json").read_text())
        assert doc["settings"]["smoke"] is True and doc["environment"]["device"].startswith("cpu")
        png = results / doc["figure"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_null_calibration_figures(results):
    doc = json.loads((results / "null_calibration.json").read_text())
    assert {m["arch"] for m in doc["null"]} == {"UNet", "SegResNet"}
    rule = doc["decision_rule"]
    assert rule["alpha_owned"] == 1e-9 and 0.5 < rule["agreement_threshold"] < 1
    ns = doc["null_summary"]
    assert ns["verifications"] == 4 and ns["false_positives"] == 0 and 0 <= ns["false_positive_rate"] <= 1
    assert len(doc["wrong_keys"]) == 4
    assert [t["same_payload"] for t in doc["wrong_keys"]] == [True, False, True, False]
    # no secret key material in the results
    assert "seed" not in json.dumps(doc["key"])


def test_robustness_records_every_attack(results):
    doc = json.loads((results / "robustness.json").read_text())
    recs = doc["records"]
    assert {r["attack"] for r in recs} == ATTACKS
    for r in recs:
        assert "error" not in r, r
        assert 0 <= r["asr"] <= 1 and 0 <= r["dice"] <= 1 and 0 <= r["mean_agreement"] <= 1
        assert len(r["trials"]) == 2
    prune = next(r for r in recs if r["attack"] == "prune")
    assert abs(prune["conv_weight_sparsity"] - 0.5) < 0.01
    label = next(r for r in recs if r["attack"] == "label-only")
    assert label["asr"] == 0.0 and all(t["decoded"] is None for t in label["trials"])
    onnx = next(r for r in recs if r["attack"] == "onnx")
    wm = next(r for r in recs if r["setting"] == "watermarked model, no attack")
    assert abs(onnx["dice"] - wm["dice"]) < 1e-3       # the export round trip keeps the model


def test_speed_figures(results):
    doc = json.loads((results / "speed.json").read_text())
    for run in doc["lime"]["runs"]:
        assert run["max_relative_coefficient_difference"] < 1e-6     # the same LIME as the package
        assert run["ours"]["seconds_total"] > 0 and run["lime"]["seconds_total"] > 0
    assert doc["embedding"]["ratio_embed_over_finetune"] > 0
    assert [r["samples"] for r in doc["query_efficiency"]["rows"]] == [20, 40]


def test_robustness_resume_runs_only_the_missing_settings_after_a_reproduced_check(results, tmp_path):
    import robustness

    full = json.loads((results / "robustness.json").read_text())
    out = tmp_path / "out"
    out.mkdir()
    stopped = {**full, "complete": False, "records": full["records"][:-3]}     # a run stopped 3 settings early
    (out / "robustness.json").write_text(json.dumps(stopped))
    args = ["--smoke", "--threads", "1", "--out-dir", str(out), "--cache", str(results.parent / "cache"), "--resume",
            "--device", "cpu"]         # as gpu.sh --smoke ran it
    assert robustness.main(args) == 0
    done = json.loads((out / "robustness.json").read_text())
    assert done["complete"] is True and done["resumed"]["kept_records"] == len(stopped["records"]) - 1
    assert [(r["attack"], r["setting"]) for r in done["records"]] == [(r["attack"], r["setting"]) for r in full["records"]]
    assert [bool(r.get("carried_over")) for r in done["records"]] == [False] + [True] * (len(stopped["records"]) - 1) + [False] * 3
    for new, old in zip(done["records"][-3:], full["records"][-3:]):               # the missing ones, measured
        assert robustness._outcomes(new["trials"]) == robustness._outcomes(old["trials"])
    # stored records from another model: its unattacked trials do not reproduce, so nothing is kept or written
    forged = json.loads(json.dumps(stopped))
    forged["records"][0]["trials"][0]["agreement"] += 0.25
    (out / "robustness.json").write_text(json.dumps(forged))
    with pytest.raises(SystemExit, match="differ from the stored run"):
        robustness.main(args)
    assert json.loads((out / "robustness.json").read_text()) == forged
    # nothing to resume, or other settings: refused before anything runs
    assert robustness.main(args[:4] + [str(tmp_path / "none")] + args[5:]) == 2
    assert robustness.main(args + ["--trials", "3"]) == 2


def test_speed_merge_reruns_one_part_and_keeps_the_others(results, tmp_path):
    import speed

    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(results / "speed.json", out)
    old = json.loads((out / "speed.json").read_text())
    args = ["--smoke", "--out-dir", str(out), "--cache", str(results.parent / "cache")]
    assert speed.main(args + ["--skip", "lime,embed", "--merge", "--qe-samples", "30"]) == 0
    new = json.loads((out / "speed.json").read_text())
    assert [r["samples"] for r in new["query_efficiency"]["rows"]] == [30]      # rerun
    assert "carried_over" not in new["query_efficiency"]
    for part in ("lime", "embedding"):                                           # carried, and marked so
        assert new[part]["carried_over"]["environment"] == old["environment"]
        assert {k: v for k, v in new[part].items() if k != "carried_over"} == old[part]
    # nothing to merge from, or a file of another study: refused before anything runs
    empty = tmp_path / "empty"
    assert speed.main(["--smoke", "--out-dir", str(empty), "--skip", "lime", "--merge"]) == 2
    assert not (empty / "speed.json").exists()
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(results / "harmlessness.json", other / "speed.json")
    assert speed.main(["--smoke", "--out-dir", str(other), "--skip", "lime", "--merge"]) == 2
    assert speed.main(["--smoke", "--out-dir", str(other), "--skip", "limes"]) == 2


def test_summary_has_exactly_the_issue_fields(results):
    s = json.loads((results / "summary.json").read_text())
    assert tuple(s) == make_results.SUMMARY_FIELDS
    assert s["null_models"] == 2 and s["wrong_keys"] == 4
    assert isinstance(s["null_decodes"], int) and isinstance(s["wrong_key_decodes"], int)
    for k in ("null_max_agreement", "asr", "flip_rate_clean", "lime_overhead_fraction"):
        assert _num(s[k]) and 0 <= s[k] <= 1, k
    assert _num(s["dice_drop_points"]) and _num(s["lime_speedup_vs_lime_package"])
    assert s["lime_speedup_vs_lime_package"] > 0
    assert s["min_samples_for_95pct"] is None or s["min_samples_for_95pct"] in (20, 40)
    assert s["device"].startswith("cpu")
    assert [b["method"] for b in s["baselines"]] == ["stealthmark", "reference", "badnets"]
    for b in s["baselines"]:
        assert {"method", "asr", "dice_drop_points", "null_false_positives", "auc_drop_points"} <= set(b)
        assert 0 <= b["asr"] <= 1 and _num(b["dice_drop_points"]) and _num(b["auc_drop_points"])
        assert 0 <= b["null_false_positives"] <= b["null_verifications"] == 4
    assert {r["attack"] for r in s["robustness"]} == ATTACKS
    assert all(set(r) == {"attack", "setting", "asr", "dice"} for r in s["robustness"])
    md = (results / "RESULTS.md").read_text()
    assert "SMOKE RUN" in md and "## 4. Baselines" in md and "## 3. Robustness" in md
    assert "python benchmarks/baselines_study.py" in md and "baselines_qr.png" in md


def test_missing_studies_are_null_not_invented(results, tmp_path):
    part = tmp_path / "part"
    part.mkdir()
    shutil.copy(results / "harmlessness.json", part)
    assert make_results.main(["--results-dir", str(part)]) == 0
    s = json.loads((part / "summary.json").read_text())
    assert s["dice_drop_points"] is not None
    for k in ("null_models", "null_decodes", "asr", "robustness", "baselines", "lime_speedup_vs_lime_package",
              "min_samples_for_95pct"):
        assert s[k] is None, k
    md = (part / "RESULTS.md").read_text()
    assert "1. null calibration (null_calibration.json)" in md and "5. speed (speed.json)" in md
    assert "4. baselines (baselines.json)" in md
    assert make_results.main(["--results-dir", str(tmp_path / "nowhere")]) == 2
    assert not (tmp_path / "nowhere").exists()


def test_baselines_study(results):
    doc = json.loads((results / "baselines.json").read_text())
    by = {m["method"]: m for m in doc["methods"]}
    assert set(by) == {"stealthmark", "reference", "badnets"}
    assert doc["null_models"] == ["UNet 8-16-32 seed 100", "SegResNet 8 seed 101"]   # study 1's null models
    for m in by.values():
        assert len(m["trials"]) == 2 and m["null_verifications"] == 4 and len(m["null"]) == 4
        assert 0 <= m["auc_original"] <= 1 and 0 <= m["auc_watermarked"] <= 1
        assert abs(m["auc_drop_points"] - 100 * (m["auc_original"] - m["auc_watermarked"])) < 1e-3
    # StealthMark's null verifications are study 1's (same models, inputs and LIME seeds)
    null = json.loads((results / "null_calibration.json").read_text())
    assert [t["agreement"] for t in by["stealthmark"]["null"]] == \
        [t["agreement"] for m in null["null"] for t in m["trials"]]
    assert by["stealthmark"]["null_false_positives"] == 0
    # the reference design's flaw: its QR picture is the occlusion pattern, so it decodes on clean models
    ref = by["reference"]
    assert ref["null_qr_payload_decodes"] == 4 and all(t["qr_equals_occlusion_pattern"] for t in ref["null"])
    q = doc["clean_model_qr"]
    assert q["reference_qr_decodes"] == common.BENCH_PAYLOAD and q["reference_qr_equals_occlusion_pattern"]
    assert q["stealthmark_clean_decodes"] is None and q["stealthmark_clean_verdict"] != "owned"
    assert "triggered" in by["badnets"] and "flip_rate_triggered" in ref
    assert "seed" not in json.dumps(doc["key"])


def test_gpu_script_refuses_to_run_without_cuda(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT_DIR": str(tmp_path / "gpu")}
    if torch.cuda.is_available():   # a CUDA machine would start the real run: only the option check here
        proc = subprocess.run(["bash", str(BENCH / "gpu.sh"), "--bogus"], env=env, capture_output=True, text=True)
        assert proc.returncode == 2 and "unknown option" in proc.stderr
        return
    proc = subprocess.run(["bash", str(BENCH / "gpu.sh")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3
    assert "no CUDA GPU visible" in proc.stderr and "--smoke" in proc.stderr
    assert not (tmp_path / "gpu").exists()


def test_gpu_coverage_dry_run_writes_every_record(tmp_path):
    """gpu.sh --smoke coverage: the three transformers merged into one models.json, and the 3-D record; the
    real run (coverage without --smoke) refuses a machine without CUDA before writing anything."""
    env = {**os.environ, "PYTHON": sys.executable, "OUT_DIR": str(tmp_path / "cov")}
    proc = subprocess.run(["bash", str(BENCH / "gpu.sh"), "--smoke", "coverage"], env=env, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    models = json.loads((tmp_path / "cov" / "models.json").read_text())["records"]
    assert [r["arch"] for r in models] == ["SwinUNETR", "UNETR", "SamViT"]
    vol = json.loads((tmp_path / "cov" / "volume3d.json").read_text())["records"]
    assert len(vol) == 1 and vol[0]["smoke"] and len(vol[0]["roi"]) == 3
    if not torch.cuda.is_available():
        files = [BENCH / "results" / "models.json", BENCH / "results" / "volume3d.json"]
        before = [f.read_bytes() if f.exists() else None for f in files]
        proc = subprocess.run(["bash", str(BENCH / "gpu.sh"), "coverage"], env=env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 3 and "no CUDA GPU visible" in proc.stderr
        assert [f.read_bytes() if f.exists() else None for f in files] == before


def test_every_full_size_null_model_can_be_built():
    """The smoke run trains only two null models; build all of the full run's, so none fails hours in."""
    import null_calibration
    from StealthMarkLib.models import build_network

    specs = null_calibration.null_specs(20, 128, 300, smoke=False)
    assert len({s.seed for s in specs}) == 20 and {s.arch for s in specs} == {"UNet", "SegResNet"}
    for s in specs:
        net = build_network(s.model_spec())
        out = net(torch.zeros(1, 1, 128, 128))
        assert out.shape == (1, 2, 128, 128), s.label


def test_effectiveness_quick_run_records_its_recipe(tmp_path):
    """effectiveness.py (issue 3's figures) at tiny sizes, with another recipe: it says which one it measured."""
    out = tmp_path / "eff.json"
    proc = subprocess.run([sys.executable, str(BENCH / "effectiveness.py"), "--quick", "--skip-demo",
                           "--embed-steps", "3", "--no-keep-trigger-masks", "--per-cell-decoys", "--lr", "5e-3",
                           "--out", str(out)],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["embed_steps"] == 3 and doc["keep_trigger_masks"] is False and doc["quick"] is True
    assert doc["per_cell_decoys"] is True and doc["lr"] == 5e-3
    assert len(doc["trials"]) == 4 and 0.0 <= doc["asr"] <= 1.0
    assert doc["harmlessness"]["key_image"]["original_foreground_fraction"] >= 0.0
    bad = subprocess.run([sys.executable, str(BENCH / "effectiveness.py"), "--embed-steps", "0"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--embed-steps must be at least 1" in bad.stderr
    bad = subprocess.run([sys.executable, str(BENCH / "effectiveness.py"), "--lr", "0"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--lr must be positive" in bad.stderr


def test_trigger_probe_traces_the_losses_and_verifies_once(tmp_path):
    """trigger_probe.py --smoke on a SamViT variant (keeping the key image's mask): a loss line per --every
    steps, the key image's mask, one verification per input, nothing cached; bad --network-args and --every are
    refused with exit 2."""
    cache = sorted((BENCH / ".cache").glob("probe_*")) if (BENCH / ".cache").is_dir() else []
    run = lambda *args: subprocess.run([sys.executable, str(BENCH / "trigger_probe.py"), "--smoke", "--threads", "1",  # noqa: E731
                                        *args], capture_output=True, text=True, timeout=600)
    proc = run("--arch", "SamViT", "--network-args", '{"skip_levels": 2}', "--steps", "2", "--every", "1",
               "--keep-trigger-masks", "--masks-from", "key-image", "--lr-scales", '{"blocks.": 0.1}')
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert '"skip_levels": 2' in lines[0]
    assert '"lr_scales": {"blocks.": 0.1}' in lines[1]
    assert any("key image foreground" in ln for ln in lines)
    assert [ln.split(":")[0] for ln in lines if ln.startswith("step ")] == ["step 1", "step 2"]
    assert any(ln.startswith("key image: ") for ln in lines) and any(ln.startswith("blended: ") for ln in lines)
    assert (sorted((BENCH / ".cache").glob("probe_*")) if (BENCH / ".cache").is_dir() else []) == cache
    for bad, message in ((["--network-args", "{oops"], "not JSON"), (["--network-args", "[1]"], "JSON object"),
                         (["--lr-scales", "[0.1]"], "--lr-scales must be a JSON object"),
                         (["--steps", "2", "--every", "3"], "--every")):
        proc = run("--arch", "UNet", *bad)
        assert proc.returncode == 2 and message in proc.stderr


def test_tile_response_prints_each_keys_tiles(tmp_path):
    """tile_response.py on a tiny (untrained) model: a line per key and per tile, and the band verdict."""
    from StealthMarkLib.models import SegmentationModel, build_network, save_model
    from StealthMarkLib.train import demo_spec

    torch.manual_seed(0)
    spec = demo_spec((4, 8), 64)
    path = save_model(SegmentationModel(build_network(spec), spec, device="cpu"), tmp_path / "m.ts", spec)
    proc = subprocess.run([sys.executable, str(BENCH / "tile_response.py"), "--model", str(path), "--samples", "60",
                           "--threads", "1"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    heads = [ln for ln in lines if "agreement" in ln and "band" in ln]
    assert len(heads) == 6 and heads[0].startswith("owner") and "usurper key 4" in heads[-1]
    assert sum(ln.strip().startswith("secret ") and "data cells" in ln for ln in lines) == 6
    assert sum(ln.strip().startswith("decoy ") for ln in lines) >= 6 * 4


def test_embed_step_times_both_recipes(tmp_path):
    """embed_step.py --smoke: a time a step for each recipe, the class-map timing, its JSON; bad counts refused."""
    import embed_step

    out = tmp_path / "embed_step.json"
    assert embed_step.main(["--smoke", "--cache", str(tmp_path / "cache"), "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["study"] == "embed_step" and doc["settings"]["smoke"] is True
    assert doc["environment"]["device"].startswith("cpu")
    for name in ("default", "keep_trigger_masks", "keep_trigger_masks_torch_argmax"):
        assert _num(doc["ms_per_step"][name]["median"]) and doc["ms_per_step"][name]["median"] > 0
        assert len(doc["ms_per_step"][name]["repeats"]) == 1
    assert _num(doc["keep_masks_overhead"]) and _num(doc["keep_masks_overhead_torch_argmax"])
    assert all(_num(v) and v > 0 for v in doc["class_of_decoy_batch_ms"].values())
    assert "seed" not in json.dumps(doc["settings"])
    from StealthMarkLib import embed, models
    assert embed.class_map is models.class_map                 # the loop's own class map is back
    assert embed_step.main(["--smoke", "--cache", str(tmp_path / "cache"), "--out-dir", str(tmp_path), "--steps", "0"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "embed_step.json"]
