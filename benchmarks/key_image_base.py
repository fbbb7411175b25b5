"""What the clean demo-size model segments on the key image, for keys of another neutral grey (``base``).

Probe behind README's "How it works" on the key image's own mask: if some grey made the original give an empty
mask on the key image, the default recipe (which trains trigger images towards background) would keep that
mask. For each base it prints the original's foreground fraction on the key image, on 64 LIME-style masked
copies of it, on a flat image of that grey, and on 4 key-blended held-out slices (18, 22, 42, 46).

    .venv/bin/python benchmarks/key_image_base.py [CLEAN.ts]
(default CLEAN: benchmarks/.cache/key_specificity_clean.ts, the clean model benchmarks/key_specificity.py trains
and caches; run that first.)
"""
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from StealthMarkLib.key import create_key  # noqa: E402
from StealthMarkLib.models import load_model  # noqa: E402
from StealthMarkLib.sample_data import sample_paths  # noqa: E402
from StealthMarkLib.trigger import TriggerOverlay  # noqa: E402
from StealthMarkLib.workflows import volume_trigger_input  # noqa: E402

torch.set_num_threads(2)
model = load_model(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "benchmarks/.cache/key_specificity_clean.ts")
size = model.spec.image_size[-1]
t1, _ = sample_paths()
rng = np.random.default_rng(0)


def foreground(x: torch.Tensor) -> float:
    return (model.probabilities(x).argmax(1) >= 1).float().mean().item()   # probabilities: no gradients


for base in (0.0, 0.1, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6):
    key = create_key("SM:BENCH-0001", seed=20261127, base=base)
    ov = TriggerOverlay(key, size, size)
    img = torch.as_tensor(ov.key_image())[None, None]
    visible = torch.as_tensor(rng.integers(0, 2, (64, key.grid ** 2)), dtype=torch.float32)
    masked = ov.hide(img.expand(64, -1, -1, -1), visible)
    blended = torch.as_tensor(volume_trigger_input(t1, key, (size, size), "18,22,42,46", 4, None).images)[:, None]
    print(f"base {base:.2f}: key image {foreground(img):.4f}  masked {foreground(masked):.4f}  "
          f"flat {foreground(torch.full_like(img, key.hide_value)):.4f}  blended slices {foreground(blended):.4f}",
          flush=True)
