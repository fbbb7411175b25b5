"""Speed of StealthMark's vectorised LIME against the ``lime`` package on the same model and samples.

Model: MONAI ``UNet(2, 1, 2, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2)``, random (seeded)
weights, eval mode, softmax head. Both explainers explain the mean normalised entropy with the same seed
(hence the same masks); the script reports total time, time in forward passes, the engine's overhead
(total - forward) and the largest coefficient difference between the two.

    python benchmarks/lime_speed.py --size 128 --grid 25 --samples 1000 --batch 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=128, help="image height and width (px)")
    p.add_argument("--grid", type=int, default=25, help="G, cells per side")
    p.add_argument("--samples", type=int, default=1000, help="LIME samples N")
    p.add_argument("--batch", type=int, default=64, help="images per forward pass")
    p.add_argument("--channels", default="16,32,64,128,256", help="UNet channels (strides 2)")
    p.add_argument("--seed", type=int, default=0, help="model, image and sampler seed")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--skip-lime", action="store_true", help="time only the StealthMark engine")
    p.add_argument("--out", default="benchmarks/results/lime_speed.json", help="JSON results file")
    return p.parse_args(argv)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    args = parse_args(argv)
    from monai.networks.nets import UNet

    from StealthMarkLib.fileio import write_text_atomic
    from StealthMarkLib.grid import cell_index
    from StealthMarkLib.lime_engine import LimeExplainer, normalised_entropy

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    torch.manual_seed(args.seed)
    channels = tuple(int(c) for c in args.channels.split(","))
    net = UNet(2, 1, 2, channels, (2,) * (len(channels) - 1), num_res_units=2).to(device).eval()
    n_params = sum(p.numel() for p in net.parameters())
    rng = np.random.default_rng(args.seed)
    yy, xx = np.mgrid[0 : args.size, 0 : args.size] / args.size
    image = np.clip(np.exp(-((yy - 0.5) ** 2 + (xx - 0.5) ** 2) / 0.05) + 0.1 * rng.random(yy.shape), 0, 1)
    image = image.astype(np.float32)

    def query(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return torch.softmax(net(images.to(device)), dim=1)

    # warm-up: first calls allocate and pick kernels
    with torch.inference_mode():
        query(torch.zeros(args.batch, 1, args.size, args.size, device=device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)

    explainer = LimeExplainer(query, args.grid, n_samples=args.samples, hide_value="mean",
                              batch_size=args.batch, device=device)
    ours = explainer.attribute(image, seed=args.seed)
    overhead = ours.seconds_total - ours.seconds_queries
    result = {
        "config": {"size": args.size, "grid": args.grid, "samples": args.samples, "batch": args.batch,
                   "seed": args.seed, "hide_value": "mean", "scalar": "entropy"},
        "model": {"name": f"monai.networks.nets.UNet(2, 1, 2, {channels}, strides 2, num_res_units=2)",
                  "parameters": n_params},
        "environment": {
            "device": str(device),
            "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                            else cpu_name()),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_1min_before": load_before,  # other processes on the machine skew CPU timings
        },
        "ours": {
            "seconds_total": ours.seconds_total,
            "seconds_forward": ours.seconds_queries,
            "seconds_overhead": overhead,
            "overhead_fraction": overhead / ours.seconds_total,
        },
    }

    if not args.skip_lime:
        from lime import lime_image

        seconds_lime_forward = 0.0

        def classifier_fn(rgb: np.ndarray) -> np.ndarray:
            nonlocal seconds_lime_forward
            t = time.perf_counter()
            x = torch.from_numpy(rgb[..., 0].astype(np.float32))[:, None].to(device)
            probs = query(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds_lime_forward += time.perf_counter() - t
            s = normalised_entropy(probs).cpu().numpy()
            return np.stack([1.0 - s, s], axis=1)

        segments = cell_index(args.size, args.size, args.grid)
        t0 = time.perf_counter()
        exp = lime_image.LimeImageExplainer(kernel_width=0.25, random_state=args.seed).explain_instance(
            image.astype(np.float64), classifier_fn, labels=(1,), top_labels=None, hide_color=None,
            num_samples=args.samples, batch_size=args.batch, segmentation_fn=lambda img: segments,
            num_features=100000, random_seed=0,  # random_seed given: the masks come straight from random_state
        )
        seconds_lime = time.perf_counter() - t0
        ref = np.zeros(args.grid * args.grid)
        for feature, value in exp.local_exp[1]:
            ref[feature] = value
        diff = np.abs(ours.coefficients.ravel() - ref).max() / np.abs(ref).max()
        corr = float(np.corrcoef(ours.coefficients.ravel(), ref)[0, 1])
        result["lime"] = {"seconds_total": seconds_lime, "seconds_forward": seconds_lime_forward,
                          "seconds_overhead": seconds_lime - seconds_lime_forward}
        result["comparison"] = {"speedup_lime_over_ours": seconds_lime / ours.seconds_total,
                                "max_relative_coefficient_difference": float(diff),
                                "coefficient_correlation": corr}

    env = result["environment"]
    print(f"LIME {args.size}x{args.size}, grid {args.grid}, N={args.samples}, batch {args.batch}; "
          f"{env['device_name']} ({env['device']}), torch {env['torch']} ({env['torch_threads']} threads), "
          f"{env['cpu_count']} CPUs, load {load_before}")
    print(f"{'':10s}{'total s':>10s}{'forward s':>11s}{'overhead s':>12s}{'overhead':>10s}")
    rows = [("ours", result["ours"])] + ([("lime", result["lime"])] if "lime" in result else [])
    for name, r in rows:
        print(f"{name:10s}{r['seconds_total']:10.3f}{r['seconds_forward']:11.3f}{r['seconds_overhead']:12.3f}"
              f"{r['seconds_overhead'] / r['seconds_total']:10.1%}")
    if "comparison" in result:
        c = result["comparison"]
        print(f"lime / ours = {c['speedup_lime_over_ours']:.2f}x; max relative coefficient difference "
              f"{c['max_relative_coefficient_difference']:.2e} (correlation {c['coefficient_correlation']:.12f})")
    write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
