"""Shared pieces of the benchmark studies (issue 5): data, cached models, the benchmark key, trials.

Every study script imports this module. It only uses StealthMarkLib's public functions (data loading,
``train.train_segmentation``, ``workflows.run_embed``, ``verify.verify_query``, ``key.create_key``,
``models.load_model`` / ``save_model``) so that changes inside the method (trigger, embedding) do not break
the benchmarks; cached models are keyed by their settings and by a fingerprint of the library's source, so a
changed method retrains instead of reusing stale models.

Cache: ``benchmarks/.cache`` by default (ignored by git); ``--cache DIR`` elsewhere.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from StealthMarkLib import KEEP_MASKS_EMBED_STEPS  # noqa: E402
from StealthMarkLib.data import DEFAULT_INTENSITY, SliceDataset, load_dataset  # noqa: E402
from StealthMarkLib.errors import InputError  # noqa: E402
from StealthMarkLib.fileio import write_text_atomic  # noqa: E402
from StealthMarkLib.key import WatermarkKey, create_key, load_key  # noqa: E402
from StealthMarkLib.models import (ModelSpec, SegmentationModel, describe_device, load_model,  # noqa: E402
                                   resolve_device, save_model)
from StealthMarkLib.sample_data import SAMPLE_LABEL, sample_paths, sample_split  # noqa: E402
from StealthMarkLib.train import demo_spec, dice_loss, train_segmentation  # noqa: E402
from StealthMarkLib.verify import ALPHA_OWNED, binomial_p_value, verify_query  # noqa: E402

REEXPORTED = (resolve_device, SegmentationModel)   # the studies use them as common.resolve_device, ...
RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "benchmarks" / ".cache"
#: the published benchmark key: its seed is public, so never use it to protect a real model
BENCH_PAYLOAD = "SM:BENCH-0001"
BENCH_KEY_SEED = 20261127
EPS = 1e-6

# source files whose change invalidates cached models
_CLEAN_SOURCES = ("train.py", "models.py", "data.py", "volume.py", "sample_data.py")
_EMBED_SOURCES = _CLEAN_SOURCES + ("embed.py", "trigger.py", "key.py", "qr.py", "grid.py", "workflows.py")


# -- run settings ----------------------------------------------------------------------------------
def base_parser(description: str) -> argparse.ArgumentParser:
    """Options every study takes."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (< 30 s), for the test suite")
    p.add_argument("--out-dir", default=str(RESULTS), help="where the JSON and PNG results go")
    p.add_argument("--cache", default=str(CACHE), help="trained-model cache (reused between studies)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default; 1 with --smoke)")
    p.add_argument("--size", type=int, default=None, help="image size (px); default 128 (64 with --smoke)")
    p.add_argument("--channels", default=None,
                   help="UNet channels of the owner's model, e.g. 8,16,32,64 (default; 8,16,32 with --smoke)")
    p.add_argument("--samples", type=int, default=None,
                   help="LIME samples per image (default: the verifier's, 4000 on the key image alone and 1000 per "
                        "blended slice; 60 with --smoke)")
    p.add_argument("--trials", type=int, default=None, help="verification trials per setting (default 10; 2 smoke)")
    return p


def _add_config_flag(p: argparse.ArgumentParser, field: str, text: str, default: bool | None = None,
                     why: str = ", the library's") -> None:
    """``--[no-]FIELD`` for a boolean EmbedConfig field, defaulting to the library's setting unless ``default`` says
    otherwise (``why``: the reason, for the help)."""
    from StealthMarkLib.embed import EmbedConfig
    on = getattr(EmbedConfig, field) if default is None else default
    p.add_argument(f"--{field.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=on,
                   help=f"{text} (EmbedConfig.{field}; default {'on' if on else 'off'}{why})")


def add_per_cell_decoys_argument(p: argparse.ArgumentParser, decoys: str = "decoy images") -> None:
    """``--[no-]per-cell-decoys`` (EmbedConfig.per_cell_decoys), defaulting to the library's setting."""
    _add_config_flag(p, "per_cell_decoys", f"{decoys} with a random tile in every cell")


def add_keep_trigger_masks_argument(p: argparse.ArgumentParser, default: bool | None = None,
                                    why: str = ", the library's") -> None:
    """``--[no-]keep-trigger-masks`` (EmbedConfig.keep_trigger_masks), defaulting to the library's setting unless
    ``default`` says otherwise (``why``: the reason, for the help)."""
    _add_config_flag(p, "keep_trigger_masks", "trigger images keep the original's mask on the key image", default, why)


def json_object(text: str, option: str, example: str) -> dict:
    """``text``, an option's JSON object, parsed; InputError naming ``option`` (and an ``example``) otherwise."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{option} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InputError(f"{option} must be a JSON object, e.g. '{example}'")
    return value


@dataclass
class Settings:
    smoke: bool
    size: int
    channels: tuple[int, ...]
    clean_steps: int
    embed_steps: int
    samples: int | None            # None: the verifier's default (StealthMarkLib.verify.default_samples)
    trials: int
    device: str
    out_dir: Path
    cache: Path
    batch: int = 64

    def to_json(self) -> dict:
        d = asdict(self)
        d["out_dir"], d["cache"] = _shown(self.out_dir), _shown(self.cache)
        return d


def _shown(path: Path) -> str:
    """A path for the results files: relative to the repository when inside it (no machine's paths)."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def settings(args: argparse.Namespace) -> Settings:
    s = bool(args.smoke)
    threads = args.threads or (1 if s else 0)
    if threads > 0:
        torch.set_num_threads(threads)
    channels = tuple(int(c) for c in args.channels.split(",")) if args.channels else (
        (8, 16, 32) if s else (8, 16, 32, 64))
    st = Settings(smoke=s, size=args.size or (64 if s else 128), channels=channels,
                  clean_steps=20 if s else 300, embed_steps=20 if s else KEEP_MASKS_EMBED_STEPS,
                  samples=args.samples or (60 if s else None), trials=args.trials or (2 if s else 10),
                  device=args.device, out_dir=Path(args.out_dir), cache=Path(args.cache))
    if st.trials < 1 or (st.samples is not None and st.samples < 10) or st.size < 32:
        raise InputError("--trials must be >= 1, --samples >= 10 and --size >= 32")
    st.out_dir.mkdir(parents=True, exist_ok=True)
    st.cache.mkdir(parents=True, exist_ok=True)
    return st


def environment(device: torch.device) -> dict[str, Any]:
    """Where a result was measured (no secrets)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"device": describe_device(device), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def write_json(path: Path, doc: dict, quiet: bool = False) -> Path:
    write_text_atomic(path, json.dumps(doc, indent=2, default=_json_default, allow_nan=True) + "\n")
    if not quiet:
        print(f"wrote {path}")
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None when matplotlib is not installed (plots skipped)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: plots skipped")
        return None
    return plt


def save_figure(fig, path: Path) -> str:
    from StealthMarkLib.fileio import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    import matplotlib.pyplot as plt

    plt.close(fig)
    print(f"wrote {path}")
    return path.name


# -- data ------------------------------------------------------------------------------------------
@lru_cache(maxsize=4)
def dataset(size: int) -> SliceDataset:
    """The bundled T1 MRI and brain mask at ``size`` x ``size`` (fixed train / held-out split)."""
    t1, mask = sample_paths()
    return load_dataset(t1, (size, size), labels=mask, label=SAMPLE_LABEL, intensity=DEFAULT_INTENSITY)


def held_out_slices() -> list[int]:
    return list(sample_split().held_out)


# -- models and their cache ------------------------------------------------------------------------
def _fingerprint(files: Sequence[str]) -> str:
    h = hashlib.sha256()
    for name in files:
        p = ROOT / "StealthMarkLib" / name
        h.update(name.encode())
        h.update(p.read_bytes() if p.is_file() else b"-")
    return h.hexdigest()


def _hash(doc: dict) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CleanSpec:
    """One independently trained clean model."""

    arch: str                      # "UNet" or "SegResNet"
    width: tuple[int, ...]         # UNet channels, or (init_filters,) for SegResNet
    size: int
    steps: int
    seed: int

    @property
    def label(self) -> str:
        return f"{self.arch} {'-'.join(map(str, self.width))} seed {self.seed}"

    def model_spec(self) -> ModelSpec:
        intensity = DEFAULT_INTENSITY.to_json()
        if self.arch == "UNet":
            return demo_spec(self.width, self.size, intensity=intensity)
        if self.arch == "SegResNet":
            return ModelSpec(network="SegResNet",
                             args={"spatial_dims": 2, "init_filters": int(self.width[0]), "in_channels": 1,
                                   "out_channels": 2, "blocks_down": [1, 2, 2], "blocks_up": [1, 1]},
                             head="softmax", in_channels=1, num_classes=2, image_size=[self.size, self.size],
                             intensity=intensity)
        raise InputError(f"unknown benchmark architecture {self.arch!r}: use UNet or SegResNet")


def clean_model_path(cs: CleanSpec, cache: Path, device: str = "auto") -> Path:
    """Train (or reuse from the cache) a clean model; returns its state-dict path (spec JSON beside it)."""
    tag = _hash({"clean": asdict(cs), "code": _fingerprint(_CLEAN_SOURCES)})
    path = Path(cache) / f"clean-{cs.arch}-{tag}.pt"
    if path.is_file() and path.with_suffix(".json").is_file():
        return path
    ds = dataset(cs.size)
    t0 = time.monotonic()
    model = train_segmentation(cs.model_spec(), *ds.train, steps=cs.steps, seed=cs.seed, device=device)
    save_model(model, path, cs.model_spec(), fmt="state_dict")
    write_json(path.with_suffix(".train.json"), {"clean": asdict(cs), "seconds": round(time.monotonic() - t0, 2)})
    return path


def benchmark_key(cache: Path, payload: str = BENCH_PAYLOAD, seed: int = BENCH_KEY_SEED,
                  samples: int = 1000) -> tuple[WatermarkKey, Path]:
    """The fixed, published benchmark key (its seed is in this file) and its key file in the cache."""
    key = create_key(payload, seed=seed, samples=samples)
    path = Path(cache) / f"key-{key.commitment[:16]}.json"
    if not path.is_file():
        key.save(path)
    return load_key(path), path


def watermarked_model_path(clean_path: Path, key_path: Path, steps: int, seed: int, cache: Path,
                           device: str = "auto") -> tuple[Path, dict]:
    """Embed the key into a cached clean model (or reuse); returns the path and run_embed's JSON result."""
    from StealthMarkLib.embed import EmbedConfig
    from StealthMarkLib.workflows import run_embed

    key = load_key(key_path)
    tag = _hash({"clean": clean_path.name, "key": key.commitment, "steps": steps, "seed": seed,
                 "code": _fingerprint(_EMBED_SOURCES)})
    path = Path(cache) / f"wm-{tag}.pt"
    meta = path.with_suffix(".embed.json")
    if path.is_file() and meta.is_file():
        return path, json.loads(meta.read_text())
    t1, mask = sample_paths()
    res = run_embed(clean_path, t1, key_path, path, labels=mask, label=SAMPLE_LABEL, steps=steps, device=device,
                    config=EmbedConfig(steps=steps, seed=seed))
    doc = {"clean": clean_path.name, "steps": steps, "seed": seed, "embed_seconds": res.log.get("seconds"),
           "harmlessness": res.harmlessness, "device": res.device}
    write_json(meta, doc)
    return path, doc


def load(path: Path, device: str = "auto") -> SegmentationModel:
    return load_model(path, device=device)


def owner_models(st: Settings, n: int = 1) -> list[dict]:
    """The owner's clean UNet(s) and their watermarked copies: model i uses clean seed i, embed seed i."""
    key, key_path = benchmark_key(st.cache)
    out = []
    for i in range(n):
        cs = CleanSpec("UNet", st.channels, st.size, st.clean_steps, seed=i)
        cp = clean_model_path(cs, st.cache, st.device)
        wp, meta = watermarked_model_path(cp, key_path, st.embed_steps, i, st.cache, st.device)
        out.append({"index": i, "clean": cp, "watermarked": wp, "clean_spec": cs, "embed": meta})
    return out


# -- training (attacks and timing) -----------------------------------------------------------------
def finetune(model: SegmentationModel, images: np.ndarray, masks: np.ndarray, steps: int, lr: float = 1e-3,
             batch: int = 8, seed: int = 0, epochs_of: np.ndarray | None = None) -> float:
    """Plain supervised fine-tuning of ``model.module`` in place (cross-entropy + soft Dice, Adam).

    ``epochs_of``: a subset of row indices to sweep in shuffled epochs (``steps`` batches); default random
    batches from all rows. Returns the seconds spent.
    """
    dev = model.device
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = model.module
    for p in net.parameters():
        p.requires_grad_(True)
    net.train()
    opt = torch.optim.Adam([p for p in net.parameters() if p.is_floating_point()], lr=lr)
    images = np.asarray(images, dtype=np.float32)
    masks = np.asarray(masks).astype(np.int64)
    order: list[int] = []
    t0 = time.monotonic()
    for _ in range(steps):
        if epochs_of is None:
            idx = rng.integers(0, len(images), batch)
        else:
            while len(order) < batch:
                order.extend(rng.permutation(epochs_of).tolist())
            idx, order = np.array(order[:batch]), order[batch:]
        x = torch.as_tensor(images[idx], device=dev).unsqueeze(1).expand(-1, model.in_channels, -1, -1)
        y = torch.as_tensor(masks[idx], device=dev)
        probs = model.forward_train(x.contiguous())
        loss = F.nll_loss(probs.clamp_min(EPS).log(), y) + dice_loss(probs, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    net.eval()
    return time.monotonic() - t0


# -- verification trials ---------------------------------------------------------------------------
def key_image(key: WatermarkKey, size: int) -> np.ndarray:
    """(1, H, W) the key's plain trigger image (what ``stealthmark verify`` uses without --image/--volume)."""
    from StealthMarkLib.trigger import TriggerOverlay

    return TriggerOverlay(key, size, size).key_image()[None]


def blended_slices(key: WatermarkKey, size: int, slices: Sequence[int]) -> np.ndarray:
    """(n, H, W) held-out slices of the bundled T1 with the key blended in, as ``verify --volume`` builds them."""
    from StealthMarkLib.workflows import volume_trigger_input

    t1, _ = sample_paths()
    spec = ",".join(str(int(k)) for k in slices)
    return volume_trigger_input(t1, key, (size, size), spec, len(slices), None).images


def trigger_inputs(key: WatermarkKey, size: int, n: int, seed: int, n_slices: int = 4,
                   only: str | None = None) -> list[tuple[str, np.ndarray]]:
    """``n`` trigger inputs: even trials the key image, odd trials ``n_slices`` random key-blended held-out
    slices (``only="key-image"`` / ``"blended"`` for one kind)."""
    rng = np.random.default_rng(seed)
    held = held_out_slices()
    out = []
    for i in range(n):
        kind = only or ("key-image" if i % 2 == 0 else "blended")
        if kind == "key-image":
            out.append(("key-image", key_image(key, size)))
        else:
            sl = sorted(int(k) for k in rng.choice(held, n_slices, replace=False))
            out.append((f"blended slices {','.join(map(str, sl))}", blended_slices(key, size, sl)))
    return out


def brief(report) -> dict[str, Any]:
    """The fields of a verification report the studies keep (no secrets)."""
    return {"verdict": report.verdict, "decoded": report.payload_decoded, "match": bool(report.payload_match),
            "agreement": round(float(report.data_module_agreement), 5), "bit_errors": int(report.bit_errors),
            "n_data_modules": int(report.n_data_modules), "p_value": float(report.p_value),
            "seconds": float(report.seconds["total"]), "lime_samples": int(report.lime_samples),
            "seconds_queries": float(report.seconds.get("queries", float("nan")))}


def samples_text(samples: int | None) -> str:
    """How many LIME samples, for figure titles."""
    return f"N={samples} LIME samples" if samples else "the verifier's default LIME samples"


def run_trials(query: Callable, key: WatermarkKey, inputs: Sequence[tuple[str, np.ndarray]], samples: int | None,
               seed: int, device: Any = None, batch: int = 64) -> list[dict]:
    """Verify through ``query`` once per input; trial i uses LIME seeds ``seed + 1000 i`` onwards.
    ``samples`` None: the verifier's default (4000 on the key image alone, 1000 per blended slice)."""
    out = []
    for i, (name, imgs) in enumerate(inputs):
        r = verify_query(query, key, imgs, samples=samples, seed=seed + 1000 * i, in_channels=1,
                         batch_size=batch, device=device).report
        out.append({"input": name, **brief(r)})
    return out


def asr(trials: Sequence[dict]) -> float | None:
    """Attack success rate of verification: the fraction of trials that decode the key's own payload."""
    return float(np.mean([t["match"] for t in trials])) if trials else None


def owned_rate(trials: Sequence[dict]) -> float | None:
    return float(np.mean([t["verdict"] == "owned" for t in trials])) if trials else None


def agreement_threshold(n_data_modules: int) -> float:
    """The smallest data-module agreement whose binomial p-value reaches ALPHA_OWNED (verify.decide)."""
    for k in range(n_data_modules // 2, n_data_modules + 1):
        if binomial_p_value(k, n_data_modules) <= ALPHA_OWNED:
            return k / n_data_modules
    return math.inf


# -- segmentation quality of any query -------------------------------------------------------------
def probabilities(query: Callable, images: np.ndarray, batch: int = 16) -> np.ndarray:
    """(n, K, H, W) numpy probabilities of ``query`` on (n, H, W) images."""
    outs = []
    for i in range(0, len(images), batch):
        x = torch.as_tensor(np.asarray(images[i:i + batch], dtype=np.float32)).unsqueeze(1)
        with torch.no_grad():
            outs.append(torch.as_tensor(query(x)).detach().float().cpu().numpy())
    return np.concatenate(outs)


def held_out_dice(query: Callable, size: int) -> float:
    from StealthMarkLib.metrics import score_segmentation

    x, y = dataset(size).test
    return float(score_segmentation(probabilities(query, x), y).dice)


@dataclass
class Timer:
    seconds: dict[str, float] = field(default_factory=dict)

    def __call__(self, name: str):
        timer = self

        class _T:
            def __enter__(self):
                self.t = time.monotonic()

            def __exit__(self, *exc):
                timer.seconds[name] = round(time.monotonic() - self.t, 2)
        return _T()
