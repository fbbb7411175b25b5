"""Distributed embedding (issue #6): ``torchrun --nproc_per_node=2 -m StealthMarkLib.cli embed`` with 2 CPU
processes on gloo, against one process with the same global batch. Real torch.distributed, real MONAI UNet,
NIfTI data written here; nothing mocked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from StealthMarkLib import distributed
from StealthMarkLib.cli import main
from StealthMarkLib.embed import EmbedConfig
from StealthMarkLib.key import create_key
from StealthMarkLib.models import ModelSpec, load_model, save_model
from StealthMarkLib.train import train_segmentation
from StealthMarkLib.data import load_dataset
from StealthMarkLib.workflows import run_embed

warnings.filterwarnings("ignore", category=DeprecationWarning)
pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
ARGS = {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2],
        "num_res_units": 1}
STEPS = 12
WORLD = 2
# one process with the batch of both ranks together: what the 2-rank run is compared with
GLOBAL = EmbedConfig(clean_batch=WORLD * 8, trigger_batch=WORLD * 8, key_images_per_batch=WORLD * 2,
                     decoys_per_batch=WORLD * 4)


def child_env() -> dict[str, str]:
    """The children import this worktree's StealthMarkLib, on one thread each."""
    env = {k: v for k, v in os.environ.items() if k not in distributed.ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = "1"
    return env


def torchrun(*args, script: Path | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    target = [str(script)] if script else ["-m", "StealthMarkLib.cli"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", *target,
           *map(str, args)]
    return subprocess.run(cmd, env=child_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 24-slice NIfTI volume with a disc of changing size, a small trained UNet (state dict + spec), a key."""
    tmp = tmp_path_factory.mktemp("ddp")
    rng = np.random.default_rng(0)
    n = 24
    yy, xx = np.mgrid[:SIZE, :SIZE]
    vol = rng.normal(0.2, 0.05, (n, SIZE, SIZE)).astype(np.float32)
    seg = np.zeros((n, SIZE, SIZE), np.uint8)
    for z in range(n):
        r = 8 + 6 * np.sin(z / 4) ** 2
        disc = (yy - 30 - z % 5) ** 2 + (xx - 34 + z % 3) ** 2 < r ** 2
        vol[z][disc] += 0.6
        seg[z][disc] = 1
    sitk.WriteImage(sitk.GetImageFromArray(vol), str(tmp / "case.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(seg), str(tmp / "case_seg.nii.gz"))
    spec = ModelSpec("UNet", dict(ARGS), image_size=[SIZE, SIZE])
    ds = load_dataset(tmp / "case.nii.gz", (SIZE, SIZE), labels=tmp / "case_seg.nii.gz")
    clean = train_segmentation(spec, *ds.train, steps=40, seed=0, device="cpu")
    save_model(clean, tmp / "clean.pt", spec, fmt="state_dict")
    key = create_key("SM:DDP-0001", seed=20261201).save(tmp / "key.json")
    return {"tmp": tmp, "data": tmp / "case.nii.gz", "labels": tmp / "case_seg.nii.gz",
            "model": tmp / "clean.pt", "key": key}


def embed_args(world, out, data=None) -> list:
    return ["embed", "--model", world["model"], "--data", data or world["data"], "--labels", world["labels"],
            "--key", world["key"], "--out", out, "--steps", STEPS, "--device", "cpu"]


@pytest.fixture(scope="module")
def two_ranks(world):
    out = world["tmp"] / "ddp" / "wm.pt"
    r = torchrun(*embed_args(world, out), "--progress", "json")
    return out, r


@pytest.fixture(scope="module")
def one_process(world):
    out = world["tmp"] / "single" / "wm.pt"
    return out, run_embed(world["model"], world["data"], world["key"], out, labels=world["labels"], steps=STEPS,
                          device="cpu", config=GLOBAL)


def test_two_gloo_ranks_write_once_with_identical_weights(world, two_ranks):
    out, r = two_ranks
    assert r.returncode == 0, r.stderr[-3000:]
    assert "error" not in r.stderr.lower()
    events = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    # rank 0 alone reports: one embed start, one final progress line, one result
    assert [e["event"] for e in events].count("result") == 1
    assert len([e for e in events if e["event"] == "start" and e["stage"] == "embed"]) == 1
    assert len([e for e in events if e["event"] == "progress" and e["done"] == STEPS]) == 1
    result = next(e for e in events if e["event"] == "result")
    assert result["device"].endswith(f"{WORLD} ranks (gloo)")
    assert sorted(p.name for p in out.parent.iterdir()) == ["wm.harmlessness.json", "wm.json", "wm.pt"]
    state = torch.load(out, weights_only=True)
    meta = json.loads((out.parent / "wm.json").read_text())["metadata"]["stealthmark"]["training"]
    d = meta["distributed"]
    assert d["world_size"] == WORLD and d["backend"] == "gloo"
    # every rank hashed its own final weights: all equal, and equal to the file rank 0 wrote
    assert len(d["rank_weights_sha256"]) == WORLD and len(set(d["rank_weights_sha256"])) == 1
    assert d["rank_weights_sha256"][0] == distributed.weights_sha256(state)
    assert result["log"]["distributed"] == d
    text = (out.parent / "wm.json").read_text() + r.stdout + r.stderr
    assert "seed" not in text.lower() and "20261201" not in text   # no key material in logs or metadata
    wm = load_model(out, device="cpu")
    assert wm.num_classes == 2
    assert leftovers(out.parent) == []


def test_two_ranks_match_one_process_with_the_global_batch(world, two_ranks, one_process):
    out2, r = two_ranks
    assert r.returncode == 0, r.stderr[-3000:]
    out1, single = one_process
    log2 = json.loads((out2.parent / "wm.json").read_text())["metadata"]["stealthmark"]["training"]
    log1 = single.log
    assert "distributed" not in log1 and "ranks" not in single.device
    h2 = json.loads((out2.parent / "wm.harmlessness.json").read_text())
    h1 = single.harmlessness
    figures = {"clean loss": (log1["final_clean_loss"], log2["final_clean_loss"]),
               "trigger loss": (log1["final_trigger_loss"], log2["final_trigger_loss"]),
               "dice": (h1["watermarked"]["dice"], h2["watermarked"]["dice"]),
               "flip rate": (h1["flip_rate_clean"], h2["flip_rate_clean"])}
    print("single vs 2 ranks:", json.dumps(figures))
    for name in ("clean loss", "trigger loss"):
        a, b = figures[name]
        assert abs(a - b) <= 0.15 * max(a, b), (name, a, b)
    assert abs(h1["watermarked"]["dice"] - h2["watermarked"]["dice"]) <= 0.02
    assert abs(h1["dice_drop_points"] - h2["dice_drop_points"]) <= 2.0
    assert abs(h1["flip_rate_clean"] - h2["flip_rate_clean"]) <= 0.01


def test_two_ranks_train_a_torchscript_model(world):
    """TorchScript modules take no DDP wrapper: the all_reduce of the gradients serves them the same way."""
    src = world["tmp"] / "clean.ts"
    save_model(load_model(world["model"], device="cpu"), src, ModelSpec("UNet", dict(ARGS), image_size=[SIZE, SIZE]))
    out = world["tmp"] / "ts" / "wm.ts"
    args = embed_args(world, out)
    args[args.index("--model") + 1], args[args.index("--steps") + 1] = src, 4
    r = torchrun(*args, "--progress", "none")
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in out.parent.iterdir()) == ["wm.harmlessness.json", "wm.ts"]
    wm = load_model(out, device="cpu")
    d = wm.spec.metadata["stealthmark"]["training"]["distributed"]
    assert d["world_size"] == WORLD and len(set(d["rank_weights_sha256"])) == 1
    assert "held-out Dice" in r.stdout and r.stdout.count("wrote ") == 1   # rank 0's text, once


def test_bad_data_on_every_rank_writes_nothing(world):
    out = world["tmp"] / "bad" / "wm.pt"
    r = torchrun(*embed_args(world, out, data=world["tmp"] / "missing.nii.gz"), "--progress", "none")
    assert r.returncode != 0
    assert "stealthmark: error: training data not found" in r.stderr
    assert not out.exists() and not (out.parent / "wm.harmlessness.json").exists()


def test_one_failing_rank_stops_the_run_and_writes_nothing(world):
    """Rank 1 alone gets a data path that does not exist: rank 0 must not write OUT."""
    script = world["tmp"] / "rank1_fails.py"
    script.write_text("import os, sys\nfrom StealthMarkLib.cli import main\nargs = sys.argv[1:]\n"
                      "if os.environ['RANK'] == '1':\n    args[args.index('--data') + 1] += '.missing'\n"
                      "sys.exit(main(args))\n")
    out = world["tmp"] / "half" / "wm.pt"
    r = torchrun(*embed_args(world, out), "--progress", "none", script=script)
    assert r.returncode != 0
    assert "stealthmark: error (rank 1): training data not found" in r.stderr
    assert "lost contact with the other ranks" in r.stderr or "cancelled" in r.stderr   # rank 0 (or torchrun stopped it)
    assert not out.exists() and not (out.parent / "wm.harmlessness.json").exists()
    assert not out.parent.exists() or leftovers(out.parent) == []


# -- in-process checks of the torchrun environment (no process group is started) ------------------------------
def test_single_process_streams_are_unchanged():
    assert not distributed.active()
    assert distributed.rank_seed(7) == 7
    assert (distributed.rank_rng(7).integers(0, 1000, 5) == np.random.default_rng(7).integers(0, 1000, 5)).all()


def test_failed_init_is_one_clear_error(world, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    out = world["tmp"] / "noinit.pt"
    assert main([*map(str, embed_args(world, out)), "--progress", "none"]) == 3
    err = capsys.readouterr().err
    assert "cannot start distributed embedding (rank 0 of 2, backend gloo)" in err and "torchrun" in err
    assert not out.exists()


def test_other_commands_refuse_torchrun(world, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    rc = main(["verify", "--model", str(world["model"]), "--key", str(world["key"]), "--out",
               str(world["tmp"] / "v"), "--progress", "none"])
    assert rc == 2 and "only 'embed'" in capsys.readouterr().err
