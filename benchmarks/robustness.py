"""Study 3, robustness: does the watermark survive removal attacks and deployment transformations?

The owner's first watermarked model (study 1's, clean seed 0, embed seed 0) is attacked, then verified
--trials times (default 10: the key image and 4 key-blended held-out slices alternately; the same inputs
and LIME seeds for every attack) through the attacked query. Per attack: ASR (fraction of trials that
decode the owner's payload), the owned-verdict rate, mean data-module agreement and the held-out Dice of
the attacked model (through the same query).

Attacks:
- ``finetune``: plain supervised fine-tuning on clean data (cross-entropy + soft Dice, Adam, batch 8) for 1,
  5, 10 epochs, lr 1e-4 and 1e-3, on 10% and 50% of the training slices;
- ``prune``: global L1 unstructured pruning (``torch.nn.utils.prune.global_unstructured``) of all conv
  weights, 10/30/50/70%;
- ``fp16``: weights cast to float16 and back; and float16 inference (model and inputs in half precision);
- ``int8``: ``torch.ao.quantization.quantize_dynamic`` (it quantises ``nn.Linear`` only: the MONAI nets have
  none, so it changes nothing, recorded as such) and a weight-only int8 fake quantisation of every conv
  weight (symmetric, per output channel: round(w / s) * s with s = max|w| / 127);
- ``torchscript`` and ``onnx`` export round trips (ONNX via ``torch.onnx.export(dynamo=False)`` and
  onnxruntime, through a small local query wrapper);
- ``input-noise`` (Gaussian sigma 0.01, 0.05) and ``input-blur`` (Gaussian sigma 0.5, 1 px) applied to
  every query by a wrapper;
- ``temperature`` scaling of the output (T = 0.5, 2), ``round`` (probabilities rounded to 2 decimals) and
  ``label-only`` (one-hot argmax: no uncertainty left, so verification is expected to fail).

Writes ``robustness.json`` and ``robustness.png`` into --out-dir; the JSON is rewritten after every attack, so
a stopped run keeps what it measured.

    python benchmarks/robustness.py            # full
    python benchmarks/robustness.py --smoke    # tiny sizes, < 30 s
    python benchmarks/robustness.py --resume   # finish a stopped run

``--resume`` keeps the records of an earlier run's ``robustness.json`` in --out-dir and runs only the settings
it lacks. It first measures the unattacked watermarked model again and goes on only if every trial of it
(verdict, decoded payload, agreement, bit errors, p-value) equals the stored one: the stored records then
came from the same model, inputs, LIME seeds and verification code. Kept records are marked ``carried_over``.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common as C  # noqa: E402
from StealthMarkLib.models import SegmentationModel, file_sha256, load_model, save_model  # noqa: E402

CONV = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)


# -- query wrappers --------------------------------------------------------------------------------
class Query:
    """A black box around a model: optional input transform before, output transform after."""

    def __init__(self, model: Callable, pre: Callable | None = None, post: Callable | None = None) -> None:
        self.model, self.pre, self.post = model, pre, post
        self.device = getattr(model, "device", None)   # where LIME builds its masked images

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x)
        if self.pre is not None:
            x = self.pre(x)
        p = torch.as_tensor(self.model(x))
        return self.post(p) if self.post is not None else p


def gaussian_noise(sigma: float, seed: int) -> Callable:
    gen = torch.Generator().manual_seed(seed)

    def pre(x: torch.Tensor) -> torch.Tensor:
        return x + sigma * torch.randn(x.shape, generator=gen).to(x.device, x.dtype)
    return pre


def gaussian_blur(sigma: float) -> Callable:
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k1 = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k1 = k1 / k1.sum()

    def pre(x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        k = k1.to(x.device, x.dtype)
        y = F.pad(x, (r, r, r, r), mode="reflect")
        y = F.conv2d(y, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
        return F.conv2d(y, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    return pre


def temperature(t: float) -> Callable:
    return lambda p: torch.softmax(p.clamp_min(1e-12).log() / t, dim=1)


def round_probs(decimals: int) -> Callable:
    f = 10.0 ** decimals
    return lambda p: torch.round(p * f) / f


def label_only(p: torch.Tensor) -> torch.Tensor:
    return F.one_hot(p.argmax(1), p.shape[1]).permute(0, 3, 1, 2).to(p.dtype)


class OnnxQuery:
    """Minimal onnxruntime query: (B, C, H, W) images -> (B, K, H, W) probabilities (a torch tensor)."""

    def __init__(self, path: Path, cuda: bool) -> None:
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if cuda and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        so = ort.SessionOptions()
        so.intra_op_num_threads = max(1, torch.get_num_threads())
        self.session = ort.InferenceSession(str(path), so, providers=providers)
        self.providers = self.session.get_providers()
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(torch.as_tensor(x).detach().cpu().numpy().astype(np.float32))
        return torch.from_numpy(self.session.run(None, {self.input: arr})[0])


class _Softmax(torch.nn.Module):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), dim=1)


class _Half(torch.nn.Module):
    """Runs the wrapped network in float16; returns float32 logits."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net.half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.half()).float()


# -- model attacks ---------------------------------------------------------------------------------
def conv_layers(net: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in net.modules() if isinstance(m, CONV)]


def prune_global_l1(net: torch.nn.Module, amount: float) -> dict:
    import torch.nn.utils.prune as prune

    params = [(m, "weight") for m in conv_layers(net)]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)
    for m, name in params:
        prune.remove(m, name)
    total = sum(m.weight.numel() for m, _ in params)
    zeros = sum(int((m.weight == 0).sum()) for m, _ in params)
    return {"conv_layers": len(params), "conv_weight_sparsity": zeros / total}


def fake_int8_conv(net: torch.nn.Module) -> dict:
    n = 0
    with torch.no_grad():
        for m in conv_layers(net):
            w = m.weight
            dims = tuple(range(1, w.ndim))
            s = w.abs().amax(dim=dims, keepdim=True).clamp_min(1e-12) / 127.0
            w.copy_(torch.clamp(torch.round(w / s), -127, 127) * s)
            n += 1
    return {"conv_layers_quantised": n}


BASELINE = ("none", "watermarked model, no attack")


def _outcomes(trials: list[dict]) -> list[dict]:
    """What a trial found, without its timings."""
    return [{k: v for k, v in t.items() if not k.startswith("seconds")} for t in trials]


def previous_records(path: Path, st) -> dict:
    """(attack, setting) -> record of an earlier run in ``path`` with the same settings (for --resume)."""
    if not path.is_file():
        raise ValueError(f"{path} does not exist: there is no run to resume")
    try:
        old = json.loads(path.read_text())
        recs = {(r["attack"], r["setting"]): r for r in old["records"] if r.get("error") is None}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a robustness.py results file ({exc})") from None
    if old.get("study") != "robustness":
        raise ValueError(f"{path} is not a robustness.py results file")
    def comparable(settings: dict) -> dict:   # through JSON, as stored (tuples become lists)
        return {k: v for k, v in json.loads(json.dumps(settings)).items() if k not in ("threads", "out_dir", "cache")}
    mine, theirs = comparable(st.to_json()), comparable(old.get("settings", {}))
    if mine != theirs:
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        raise ValueError(f"{path} was run with other settings ({', '.join(diff)}): run without --resume")
    if BASELINE not in recs:
        raise ValueError(f"{path} has no record of the unattacked model to check against: run without --resume")
    return recs


def main(argv=None) -> int:
    p = C.base_parser(__doc__)
    p.add_argument("--only", default=None, help="comma-separated attack names to run (default all)")
    p.add_argument("--resume", action="store_true",
                   help="keep the records of the robustness.json in --out-dir and run only the missing settings "
                        "(after checking that the unattacked model's trials reproduce exactly)")
    a = p.parse_args(argv)
    st = C.settings(a)
    try:
        stored = previous_records(st.out_dir / "robustness.json", st) if a.resume else {}
    except ValueError as exc:
        print(f"error: --resume: {exc}", file=sys.stderr)
        return 2
    dev = C.resolve_device(st.device)
    key, _ = C.benchmark_key(st.cache)
    owner = C.owner_models(st, 1)[0]
    wm_path, clean_path = owner["watermarked"], owner["clean"]
    inputs = C.trigger_inputs(key, st.size, st.trials, seed=900)
    train_x, train_y = C.dataset(st.size).train
    only = set(a.only.split(",")) if a.only else None
    work = Path(tempfile.mkdtemp(prefix="sm-robust-"))
    records: list[dict] = []
    res = {"study": "robustness", "complete": False, "settings": st.to_json(), "environment": C.environment(dev),
           "key": key.public_summary(), "model": owner["clean_spec"].label + ", embed seed 0",
           "model_sha256": file_sha256(wm_path),
           "trigger_inputs": [n for n, _ in inputs],
           "records": records,
           "notes": ["label-only outputs are expected to defeat verification: the watermark lives in the "
                     "model's uncertainty, which one-hot labels remove",
                     "int8: torch's dynamic quantisation covers nn.Linear only (none in these conv nets); the "
                     "conv weights are tested with a weight-only int8 fake quantisation instead"]}

    def fresh() -> SegmentationModel:
        return C.load(wm_path, st.device)

    def record(attack: str, setting: str, make: Callable[[], tuple[Callable, dict]]) -> None:
        if only is not None and attack not in only:
            return
        if (attack, setting) in stored and (attack, setting) != BASELINE:
            records.append({**stored[attack, setting], "carried_over": True})
            C.write_json(st.out_dir / "robustness.json", res, quiet=True)
            print(f"{attack:12s} {setting:34s} kept from the stored run")
            return
        t0 = time.monotonic()
        rec: dict = {"attack": attack, "setting": setting}
        try:
            query, info = make()
        except Exception as exc:  # an attack that cannot run here is recorded, not hidden
            rec.update({"asr": None, "dice": None, "mean_agreement": None, "error": f"{type(exc).__name__}: {exc}"})
            records.append(rec)
            print(f"{attack:12s} {setting:34s} not run: {rec['error'][:120]}")
            return
        qdev = info.pop("_device", None) or getattr(query, "device", None)
        trials = C.run_trials(query, key, inputs, st.samples, seed=7000, device=qdev)
        rec.update({"asr": C.asr(trials), "dice": C.held_out_dice(query, st.size),
                    "mean_agreement": float(np.mean([t["agreement"] for t in trials])),
                    "owned_rate": C.owned_rate(trials), **info, "seconds": round(time.monotonic() - t0, 1),
                    "trials": trials})
        if stored and (attack, setting) == BASELINE:
            if _outcomes(trials) != _outcomes(stored[BASELINE]["trials"]):
                raise SystemExit("error: --resume: the unattacked watermarked model's trials differ from the stored "
                                 "run's, so its records came from another model or code; run without --resume")
            res["resumed"] = {"kept_records": len(stored) - 1, "check": "unattacked model's trials reproduced exactly"}
        records.append(rec)
        C.write_json(st.out_dir / "robustness.json", res, quiet=True)    # after every attack: a stopped run keeps its records
        print(f"{attack:12s} {setting:34s} ASR {rec['asr']:.2f}  Dice {rec['dice']:.4f}  agreement "
              f"{rec['mean_agreement']:.3f}")

    record(*BASELINE, lambda: (fresh(), {}))
    record("none", "clean original (reference)", lambda: (C.load(clean_path, st.device), {}))

    # fine-tuning on clean data
    n_train = len(train_x)
    grid = (lambda full, smoke: smoke if st.smoke else full)   # --smoke: one setting per attack
    for frac in grid((0.1, 0.5), (0.1,)):
        subset = np.random.default_rng(11).choice(n_train, max(1, round(frac * n_train)), replace=False)
        steps_per_epoch = math.ceil(len(subset) / 8)
        for lr in grid((1e-4, 1e-3), (1e-3,)):
            for epochs in grid((1, 5, 10), (1,)):
                def ft(frac=frac, lr=lr, epochs=epochs, subset=subset, spe=steps_per_epoch):
                    m = fresh()
                    secs = C.finetune(m, train_x, train_y, steps=epochs * spe, lr=lr, batch=8, seed=epochs,
                                      epochs_of=subset)
                    return m, {"steps": epochs * spe, "train_slices": int(len(subset)),
                               "finetune_seconds": round(secs, 2)}
                record("finetune", f"{epochs} ep, lr {lr:g}, {int(frac * 100)}% data", ft)

    for amount in grid((0.1, 0.3, 0.5, 0.7), (0.5,)):
        def pr(amount=amount):
            m = fresh()
            return m, prune_global_l1(m.module, amount)
        record("prune", f"global L1 {int(amount * 100)}%", pr)

    def fp16_weights():
        m = fresh()
        m.module.half().float()
        return m, {"note": "weights cast to float16 and back to float32"}
    record("fp16", "weights cast to fp16 and back", fp16_weights)

    def fp16_inference():
        m = fresh()
        half = SegmentationModel(_Half(m.module), m.spec, device=m.device)
        half.probabilities(torch.zeros(1, 1, st.size, st.size))  # fails here if half kernels are missing
        return half, {"note": f"model and inputs in float16 on {m.device}"}
    record("fp16", "fp16 inference", fp16_inference)

    def int8_dynamic():
        m = fresh()
        net = m.module.cpu()
        q = torch.ao.quantization.quantize_dynamic(net, {torch.nn.Linear}, dtype=torch.qint8)
        n_linear = sum(isinstance(x, torch.nn.Linear) for x in net.modules())
        return SegmentationModel(q, m.spec, device="cpu"), {
            "note": f"quantize_dynamic covers nn.Linear only; this network has {n_linear} Linear and "
                    f"{len(conv_layers(net))} conv layers, so its weights are unchanged (runs on CPU)",
            "_device": torch.device("cpu")}
    record("int8", "quantize_dynamic (Linear layers only)", int8_dynamic)

    def int8_fake():
        m = fresh()
        return m, fake_int8_conv(m.module)
    record("int8", "weight-only int8 fake quant of conv weights", int8_fake)

    def torchscript():
        m = fresh()
        path = save_model(m, work / "rt.ts", m.spec, fmt="torchscript")
        return load_model(path, device=st.device), {}
    record("torchscript", "save_model + load_model round trip", torchscript)

    def onnx():
        m = fresh()
        net = _Softmax(m.module).cpu().eval()
        path = work / "rt.onnx"
        torch.onnx.export(net, (torch.zeros(1, 1, st.size, st.size),), str(path), dynamo=False,
                          input_names=["images"], output_names=["probabilities"],
                          dynamic_axes={"images": {0: "batch"}, "probabilities": {0: "batch"}}, opset_version=17)
        q = OnnxQuery(path, cuda=dev.type == "cuda")
        return q, {"providers": q.providers, "_device": torch.device("cpu")}
    record("onnx", "torch.onnx.export + onnxruntime", onnx)

    for sigma in grid((0.01, 0.05), (0.05,)):
        record("input-noise", f"Gaussian sigma {sigma:g}", lambda sigma=sigma: (Query(fresh(), pre=gaussian_noise(sigma, 5)), {}))
    for sigma in grid((0.5, 1.0), (1.0,)):
        record("input-blur", f"Gaussian blur sigma {sigma:g} px", lambda sigma=sigma: (Query(fresh(), pre=gaussian_blur(sigma)), {}))
    for t in grid((0.5, 2.0), (2.0,)):
        record("temperature", f"T = {t:g}", lambda t=t: (Query(fresh(), post=temperature(t)), {}))
    record("round", "probabilities rounded to 2 decimals", lambda: (Query(fresh(), post=round_probs(2)), {}))
    record("label-only", "one-hot argmax (expected to fail)", lambda: (Query(fresh(), post=label_only), {
        "note": "label-only outputs carry no uncertainty, so the QR cannot be read: expected to fail"}))

    res["complete"] = True
    plt = C.pyplot()
    ok = [r for r in records if r["asr"] is not None]
    if plt is not None and ok:
        fig, ax = plt.subplots(figsize=(8, 0.28 * len(ok) + 1.2))
        ys = np.arange(len(ok))
        ax.barh(ys, [r["asr"] for r in ok], color="tab:green", alpha=0.7, label="ASR")
        ax.plot([r["dice"] for r in ok], ys, "ko", ms=4, label="held-out Dice")
        ax.set_yticks(ys, [f"{r['attack']}: {r['setting']}" for r in ok], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.02)
        ax.set_xlabel(f"ASR over {st.trials} verifications / Dice")
        ax.legend(loc="lower right", fontsize=8)
        ax.set_title(f"Robustness ({st.size}x{st.size}, {C.describe_device(dev)})", fontsize=9)
        res["figure"] = C.save_figure(fig, st.out_dir / "robustness.png")
    C.write_json(st.out_dir / "robustness.json", res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
