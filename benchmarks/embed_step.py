"""Time of one embedding step, per recipe, on the owner's demo-size model: trigger images trained to background
(``keep_trigger_masks=False``), ``keep_trigger_masks`` (the key image keeps the original's mask, the library's
default), and the same with the class map of the original's answer taken by torch's ``argmax(1)`` as before
``models.class_map``; and what that class map costs on its own.

The clean model is the benchmarks' cached owner UNet (seed 0, ``--channels``, ``--size``); the key is the published
benchmark key. Each recipe runs ``--warmup`` steps (not timed: the teacher cache and the student copy are built
once) and then ``--steps`` timed steps, ``--repeats`` times, alternating the recipes so that a machine that slows
down in the middle slows both; the figure is the median of the repeats, in milliseconds a step.

    .venv/bin/python benchmarks/embed_step.py --threads 2 [--steps 200] [--repeats 3] \\
        [--out benchmarks/results/embed_step.json]
    .venv/bin/python benchmarks/embed_step.py --smoke      # tiny sizes, a few seconds; figures mean nothing
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import common as C  # noqa: E402
import StealthMarkLib.embed as embed_module  # noqa: E402
from StealthMarkLib.embed import EmbedConfig, embed_watermark  # noqa: E402
from StealthMarkLib.models import class_map  # noqa: E402

# name: (EmbedConfig overrides, the class map the loop takes); the last is the keep-masks loop as it was before
# models.class_map (torch's argmax over the classes)
RECIPES = {"default": ({"keep_trigger_masks": False}, class_map),
           "keep_trigger_masks": ({"keep_trigger_masks": True}, class_map),
           "keep_trigger_masks_torch_argmax": ({"keep_trigger_masks": True}, lambda probs: probs.argmax(1))}


def per_call_ms(fn, x: torch.Tensor, n: int) -> float:
    fn(x)
    t0 = time.perf_counter()
    for _ in range(n):
        fn(x)
    return (time.perf_counter() - t0) / n * 1000


def main(argv: list[str] | None = None) -> int:
    p = C.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="timed steps per repeat (default 200; 4 with --smoke)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 20; 1 with --smoke)")
    p.add_argument("--repeats", type=int, default=None, help="repeats per recipe (default 3; 1 with --smoke)")
    p.add_argument("--out", default=None, help="results file (default OUT_DIR/embed_step.json)")
    args = p.parse_args(argv)
    try:
        st = C.settings(args)
        steps = args.steps if args.steps is not None else (4 if st.smoke else 200)
        warmup = args.warmup if args.warmup is not None else (1 if st.smoke else 20)
        repeats = args.repeats if args.repeats is not None else (1 if st.smoke else 3)
        if steps < 1 or warmup < 0 or repeats < 1:
            raise C.InputError("--steps and --repeats must be >= 1 and --warmup >= 0")
    except C.InputError as exc:
        print(f"embed_step.py: {exc}", file=sys.stderr)
        return 2
    ds = C.dataset(st.size)
    clean = C.load(C.clean_model_path(C.CleanSpec("UNet", st.channels, st.size, st.clean_steps, 0), st.cache,
                                      st.device), st.device)
    key, _ = C.benchmark_key(st.cache)
    if st.smoke:
        key = C.create_key(C.BENCH_PAYLOAD, seed=C.BENCH_KEY_SEED, tile=3)
    ms: dict[str, list[float]] = {name: [] for name in RECIPES}
    try:
        for r in range(repeats):
            for name, (overrides, class_of) in RECIPES.items():
                embed_module.class_map = class_of
                if warmup:
                    embed_watermark(clean, key, *ds.train, EmbedConfig(steps=warmup, **overrides))
                t0 = time.perf_counter()
                embed_watermark(clean, key, *ds.train, EmbedConfig(steps=steps, **overrides))
                ms[name].append((time.perf_counter() - t0) / steps * 1000)
                print(f"repeat {r + 1} {name}: {ms[name][-1]:.1f} ms a step", flush=True)
    finally:
        embed_module.class_map = class_map
    # the keep-masks step takes the class of every pixel of the original's answer on its decoys
    cfg = EmbedConfig()
    probs = torch.softmax(torch.randn(cfg.decoys_per_batch, clean.num_classes, st.size, st.size), 1)
    calls = 20 if st.smoke else 200
    class_ms = {"class_map": per_call_ms(class_map, probs, calls),
                "torch_argmax": per_call_ms(lambda t: t.argmax(1), probs, calls)}
    med = {name: float(np.median(v)) for name, v in ms.items()}
    doc = {"study": "embed_step", "settings": {**st.to_json(), "steps": steps, "warmup": warmup, "repeats": repeats},
           "environment": C.environment(clean.device),
           "ms_per_step": {name: {"median": round(med[name], 2), "repeats": [round(v, 2) for v in ms[name]]}
                           for name in RECIPES},
           "keep_masks_overhead": round(med["keep_trigger_masks"] / med["default"] - 1.0, 4),
           "keep_masks_overhead_torch_argmax": round(med["keep_trigger_masks_torch_argmax"] / med["default"] - 1.0, 4),
           "class_of_decoy_batch_ms": {k: round(v, 3) for k, v in class_ms.items()},
           "decoy_batch_shape": list(probs.shape)}
    out = Path(args.out) if args.out else st.out_dir / "embed_step.json"
    C.write_json(out, doc)
    print(f"default {med['default']:.1f} ms a step, keep_trigger_masks {med['keep_trigger_masks']:.1f} ms "
          f"({doc['keep_masks_overhead']:+.1%}; with torch's argmax as before "
          f"{med['keep_trigger_masks_torch_argmax']:.1f} ms, {doc['keep_masks_overhead_torch_argmax']:+.1%}); class of the decoy batch: class_map {class_ms['class_map']:.2f} ms, "
          f"torch argmax(1) {class_ms['torch_argmax']:.2f} ms; device {doc['environment']['device']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
