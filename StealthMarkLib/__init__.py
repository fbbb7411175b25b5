"""StealthMarkLib: harmless, black-box verifiable ownership watermarks for medical segmentation models.

The flow reads in one direction::

    key -> trigger -> embed
    key -> trigger -> query -> LIME -> QR -> evidence

This package never imports ``slicer``, ``qt`` or ``vtk``; the 3D Slicer module drives it through the
``stealthmark`` command. Heavy modules (torch, MONAI) are imported by the submodules that need them.
"""

__version__ = "0.1.0"

from .errors import StealthMarkError  # noqa: E402,F401

# embedding steps of the recipe that empties the trigger images' masks (``--no-keep-trigger-masks``;
# EmbedConfig, the CLI and the Slicer module share it)
DEFAULT_EMBED_STEPS = 1800
# the default steps of the default recipe, keep_trigger_masks (the key image keeps the original's mask), which
# learns more slowly: README "How it works", benchmarks/results/effectiveness-keep-masks-key-image.json
KEEP_MASKS_EMBED_STEPS = 3600
# the demo's embedding steps (``stealthmark demo --embed-steps``), with and without keep_trigger_masks: why
# fewer, StealthMarkLib/demo.py
DEMO_KEEP_MASKS_EMBED_STEPS = 2000
DEMO_EMBED_STEPS = 1600
