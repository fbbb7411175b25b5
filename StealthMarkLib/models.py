"""The one query interface through which everything reaches a segmentation model.

A :class:`SegmentationModel` turns images ``(B, C, H, W)`` in the model's input space into class
probabilities ``(B, K, H, W)``; verification only ever calls it, embedding fine-tunes its ``.module``.

Model files come from vendors and are untrusted: a state dict is read with ``torch.load(weights_only=True)``
and a TorchScript archive with ``torch.jit.load``; no Python object is ever unpickled. A state dict needs a
:class:`ModelSpec` (JSON) that names the MONAI network and its constructor arguments.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from monai.networks import nets as monai_nets

from .errors import InputError, ModelError, ResourceError, StealthMarkError
from .fileio import atomic_path, refuse_overwriting_inputs
from .samvit import CONFIGS as SAMVIT_CONFIGS
from .samvit import PATCH_SIZE as SAMVIT_PATCH
from .samvit import SamViT

EXPECTED = ("a TorchScript file or a PyTorch state dict with a JSON spec; or a MONAI bundle (folder or .zip); "
            "or an ONNX file (verification only)")
SPEC_EXTRA_FILE = "stealthmark.json"
HEADS = ("softmax", "sigmoid", "probabilities")
NETWORKS: dict[str, type[torch.nn.Module]] = {
    "UNet": monai_nets.UNet,
    "BasicUNet": monai_nets.BasicUNet,
    "SegResNet": monai_nets.SegResNet,
    "SwinUNETR": monai_nets.SwinUNETR,
    "UNETR": monai_nets.UNETR,
    "SamViT": SamViT,   # SAM ViT image encoder + segmentation head (StealthMarkLib/samvit.py)
}
#: arguments older MONAI releases took and 1.5+ does not, with what to do instead
_DROPPED_ARGS = {("SwinUNETR", "img_size"): "MONAI's SwinUNETR no longer takes img_size: the input size is the "
                                            "spec's image_size"}
STATE_DICT_KEYS = ("state_dict", "model", "network")
PROBABILITY_TOLERANCE = 1e-3
# metadata travels inside model files handed to others, so key material must never go there
_SECRET_WORDS = ("seed", "secret", "private")


# -- devices -------------------------------------------------------------------------------------------
def _cuda_available() -> bool:
    return bool(torch.backends.cuda.is_built() and torch.cuda.is_available())


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or None) -> the first CUDA GPU if there is one, else the CPU; ``"cpu"``, ``"cuda[:N]"``."""
    if name is None or (isinstance(name, str) and name.strip().lower() == "auto"):
        return torch.device("cuda", torch.cuda.current_device()) if _cuda_available() else torch.device("cpu")
    try:
        device = name if isinstance(name, torch.device) else torch.device(str(name).strip().lower())
    except (RuntimeError, ValueError) as exc:
        raise InputError(f"unknown device {name!r}: use auto, cpu or cuda[:N]") from exc
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        if not _cuda_available():
            why = "this PyTorch was built without CUDA" if not torch.backends.cuda.is_built() else "no GPU is visible"
            raise ResourceError(f"device {name!r} was asked for, but {why}; use --device cpu (or auto)")
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ResourceError(
                f"device {name!r} does not exist: {torch.cuda.device_count()} GPU(s) visible; "
                "use --device cuda:0 or --device cpu"
            )
        return torch.device("cuda", index)
    if device.type == "mps":
        if not (torch.backends.mps.is_built() and torch.backends.mps.is_available()):
            raise ResourceError(f"device {name!r} is not available here; use --device cpu")
        return torch.device("mps")
    raise InputError(f"unsupported device {name!r}: use auto, cpu or cuda[:N]")


def describe_device(device: str | torch.device | None) -> str:
    """A one-line description for logs and reports: ``cuda:0 (NVIDIA H100, 79.1 GiB)`` or ``cpu (8 threads)``."""
    device = device if isinstance(device, torch.device) else resolve_device(device)
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        props = torch.cuda.get_device_properties(index)
        return f"cuda:{index} ({props.name}, {props.total_memory / 2**30:.1f} GiB)"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)


# -- spec ----------------------------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class ModelSpec:
    """JSON-serialisable description of a model, stored beside or inside its file.

    ``head`` says what turns the module's raw output into probabilities: ``"softmax"`` (K logits),
    ``"sigmoid"`` (one logit, giving K = 2 classes ``[1 - p, p]``) or ``"probabilities"`` (the module already
    returns probabilities). ``metadata`` is free-form but never holds key seeds: model files are shared.
    """

    network: str | None
    args: dict
    head: str = "softmax"
    in_channels: int = 1
    num_classes: int = 2
    image_size: list[int] | None = None
    intensity: dict | None = None
    metadata: dict = field(default_factory=dict)
    # 2: images (B, C, H, W), image_size [H, W]; 3: volumes (B, C, D, H, W), image_size the ROI [D, H, W]
    # (the slab a 3-D model is queried on; larger volumes go through the sliding-window inferer)
    spatial_dims: int = 2

    def check(self) -> "ModelSpec":
        """Raise :class:`ModelError` unless every field has a usable type and value; return self."""
        problems = []
        if self.network is not None and not isinstance(self.network, str):
            problems.append(f"network must be a name or null, not {self.network!r}")
        if not isinstance(self.args, dict) or not all(isinstance(k, str) for k in self.args):
            problems.append("args must be an object of constructor arguments")
        if self.head not in HEADS:
            problems.append(f"head must be one of {', '.join(HEADS)}, not {self.head!r}")
        if not _is_int(self.in_channels) or self.in_channels < 1:
            problems.append(f"in_channels must be a positive integer, not {self.in_channels!r}")
        if not _is_int(self.num_classes) or self.num_classes < 2:
            problems.append(f"num_classes must be an integer >= 2, not {self.num_classes!r}")
        if self.spatial_dims not in (2, 3) or not _is_int(self.spatial_dims):
            problems.append(f"spatial_dims must be 2 or 3, not {self.spatial_dims!r}")
        dims = self.spatial_dims if self.spatial_dims in (2, 3) else 2
        if self.image_size is not None and not (
            isinstance(self.image_size, (list, tuple))
            and len(self.image_size) == dims
            and all(_is_int(s) and s > 0 for s in self.image_size)
        ):
            shape = "[H, W]" if dims == 2 else "the ROI [D, H, W]"
            problems.append(f"image_size must be {shape} (positive integers) or null, not {self.image_size!r}")
        if self.intensity is not None and not isinstance(self.intensity, dict):
            problems.append(f"intensity must be an object or null, not {self.intensity!r}")
        if not isinstance(self.metadata, dict):
            problems.append(f"metadata must be an object, not {self.metadata!r}")
        if problems:
            raise ModelError("bad model spec: " + "; ".join(problems))
        return self

    def to_json(self) -> dict:
        """A plain JSON-ready dict (a deep copy; tuples become lists)."""
        self.check()
        d = dataclasses.asdict(self)
        if d["spatial_dims"] == 2:  # 2-D specs are written as before the field existed
            del d["spatial_dims"]
        try:
            return json.loads(json.dumps(d, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise ModelError(f"the model spec cannot be written as JSON: {exc}") from exc

    @classmethod
    def from_json(cls, d: Any) -> "ModelSpec":
        if not isinstance(d, dict):
            raise ModelError(f"a model spec must be a JSON object, not {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ModelError(
                f"bad model spec: unknown field(s) {', '.join(map(repr, unknown))}; "
                f"known fields: {', '.join(sorted(names))}"
            )
        missing = [n for n in ("network", "args") if n not in d]
        if missing:
            raise ModelError(f"bad model spec: missing field(s) {', '.join(missing)}")
        return cls(**d).check()


def read_spec(path: str | os.PathLike) -> ModelSpec:
    """Read a JSON spec file; :class:`ModelError` if it is missing, not JSON or not a spec."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ModelError(f"model spec not found: {path}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"cannot read the model spec {path}: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelError(f"the model spec {path} is not valid JSON: {exc}") from exc
    try:
        return ModelSpec.from_json(data)
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}") from exc


def _spec_or_path(spec: ModelSpec | str | os.PathLike | None) -> ModelSpec | None:
    if spec is None or isinstance(spec, ModelSpec):
        return spec.check() if spec is not None else None
    if isinstance(spec, (str, os.PathLike)):
        return read_spec(spec)
    raise InputError(f"spec must be a ModelSpec or a JSON file path, not {type(spec).__name__}")


# -- networks ------------------------------------------------------------------------------------------
def build_network(spec: ModelSpec) -> torch.nn.Module:
    """Construct the MONAI network the spec names, with freshly initialised weights."""
    spec.check()
    if spec.network is None:
        raise ModelError("the spec names no network (a TorchScript-only model), so none can be built")
    cls = NETWORKS.get(spec.network)
    if cls is None:
        raise ModelError(f"unknown network {spec.network!r}; known networks: {', '.join(NETWORKS)}")
    sig = inspect.signature(cls)
    params = sig.parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(spec.args) - set(params))
        if unknown:
            hints = [_DROPPED_ARGS[(spec.network, a)] for a in unknown if (spec.network, a) in _DROPPED_ARGS]
            raise ModelError(
                f"{spec.network} has no argument(s) {', '.join(unknown)}; "
                f"its arguments are: {', '.join(params)}" + "".join(f" ({h})" for h in hints)
            )
    required = [
        n for n, p in params.items()
        if p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    missing = [n for n in required if n not in spec.args]
    if missing:
        raise ModelError(f"{spec.network} needs argument(s) {', '.join(missing)} in the spec's args")
    bound = sig.bind_partial(**spec.args)
    bound.apply_defaults()
    _check_args_fit_spec(spec, bound.arguments)
    _check_architecture(spec, bound.arguments)
    try:
        return cls(**spec.args)
    except Exception as exc:  # a constructor rejecting its arguments is a spec problem
        raise ModelError(
            f"{spec.network} could not be built from the spec's args: {type(exc).__name__}: {exc}"
        ) from exc


def _check_args_fit_spec(spec: ModelSpec, args: dict) -> None:
    if "spatial_dims" in args and args["spatial_dims"] != spec.spatial_dims:
        if spec.spatial_dims == 2:
            raise ModelError(f"{spec.network}: spatial_dims is {args['spatial_dims']!r}; 2-D models need spatial_dims 2 "
                             "(a 3-D model needs the spec's spatial_dims 3 and image_size [D, H, W])")
        raise ModelError(f"{spec.network}: spatial_dims is {args['spatial_dims']!r} but the spec's spatial_dims is 3")
    if spec.spatial_dims == 3 and spec.network != "UNet":
        raise ModelError(f"{spec.network}: 3-D models are supported for MONAI UNet only")
    if "in_channels" in args and args["in_channels"] != spec.in_channels:
        raise ModelError(
            f"{spec.network}: args in_channels {args['in_channels']!r} differs from the spec's in_channels "
            f"{spec.in_channels}"
        )
    out = args.get("out_channels")
    if out is None:
        return
    if spec.head == "sigmoid" and out != 1:
        raise ModelError(f"{spec.network}: a sigmoid head needs out_channels 1 (got {out!r}); use head softmax")
    if spec.head != "sigmoid" and out != spec.num_classes and not (out == 1 and spec.num_classes == 2):
        raise ModelError(
            f"{spec.network}: out_channels {out!r} does not give the spec's num_classes {spec.num_classes}"
        )
    if spec.head == "sigmoid" and spec.num_classes != 2:
        raise ModelError(f"{spec.network}: a sigmoid head gives 2 classes, but the spec says {spec.num_classes}")


def _sizes(value: Any) -> list[int] | None:
    if _is_int(value):
        return [value, value]
    if isinstance(value, (list, tuple)) and all(_is_int(v) for v in value):
        return list(value)
    return None


def _check_architecture(spec: ModelSpec, args: dict) -> None:
    """The constraints of the transformer networks, checked before building so the message is clear."""
    name, size = spec.network, spec.image_size
    if name == "SwinUNETR":
        patch = args.get("patch_size")
        multiple = patch ** 5 if _is_int(patch) and patch > 0 else None
        if multiple is None:
            raise ModelError(f"SwinUNETR: patch_size must be a positive integer, not {patch!r}")
        if size is None:
            raise ModelError(f"SwinUNETR needs the spec's image_size [H, W] (multiples of {multiple} = "
                             f"patch_size {patch} ** 5)")
        if any(s % multiple for s in size):
            raise ModelError(f"SwinUNETR: image size {size[0]}x{size[1]} is not divisible by {multiple} "
                             f"(patch_size {patch} ** 5); use e.g. {multiple * max(1, round(size[0] / multiple))}")
        fs = args.get("feature_size")
        if not _is_int(fs) or fs % 12:
            raise ModelError(f"SwinUNETR: feature_size must be a multiple of 12, not {fs!r}")
    elif name == "UNETR":
        img = _sizes(args.get("img_size"))
        if img is None or len(img) != 2:
            raise ModelError(f"UNETR: img_size must be an integer or [H, W] for 2-D, not {args.get('img_size')!r}")
        if any(s % 16 or s < 16 for s in img):
            raise ModelError(f"UNETR: img_size {img} must be multiples of its patch size 16")
        if size is not None and list(size) != img:
            raise ModelError(f"UNETR: img_size {img} differs from the spec's image_size {list(size)}; "
                             "UNETR runs at the size it was built for only")
        hidden, heads = args.get("hidden_size"), args.get("num_heads")
        if not (_is_int(hidden) and _is_int(heads) and heads > 0 and hidden % heads == 0):
            raise ModelError(f"UNETR: hidden_size {hidden!r} must be divisible by num_heads {heads!r}")
    elif name == "SamViT":
        if args.get("config") not in SAMVIT_CONFIGS:
            raise ModelError(f"SamViT: unknown config {args.get('config')!r}; choose one of "
                             f"{', '.join(SAMVIT_CONFIGS)}")
        img = _sizes(args.get("img_size"))
        if img is None or len(img) != 2 or any(s % SAMVIT_PATCH or s < SAMVIT_PATCH for s in img):
            raise ModelError(f"SamViT: img_size {args.get('img_size')!r} must be [H, W] multiples of the patch "
                             f"size {SAMVIT_PATCH}")
        if size is not None and any(s % SAMVIT_PATCH for s in size):
            raise ModelError(f"SamViT: the spec's image_size {list(size)} is not a multiple of the patch size "
                             f"{SAMVIT_PATCH}")


# -- the query interface -------------------------------------------------------------------------------
def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def _short(exc: BaseException, limit: int = 600) -> str:
    msg = f"{type(exc).__name__}: {exc}".strip()
    # TorchScript errors carry a long serialized traceback; the cause is at the end
    return msg if len(msg) <= limit else "..." + msg[-limit:]


def _as_tensor(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(images, np.ndarray):
        if images.dtype.kind not in "biuf":
            raise InputError(f"images must be a real-valued array, not dtype {images.dtype}")
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise InputError(f"images must be a torch.Tensor or numpy array, not {type(images).__name__}")
    if images.is_complex():
        raise InputError("images must be real-valued, not complex")
    if images.ndim not in (4, 5):
        raise InputError(f"images must be (B, C, H, W) (or volumes (B, C, D, H, W)); got shape {tuple(images.shape)}")
    return images if images.dtype == torch.float32 else images.float()


def to_channels(images: torch.Tensor | np.ndarray, in_channels: int, spatial_dims: int = 2) -> torch.Tensor:
    """Grey images (B, H, W) -> (B, C, H, W) by repeating them over the model's ``in_channels``; images that
    already have channels (B, C, H, W), such as colour images, must have ``in_channels`` of them.
    ``spatial_dims=3``: the same for volumes, (B, D, H, W) -> (B, C, D, H, W)."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float32)) if isinstance(images, np.ndarray) else images
    if x.ndim == 1 + spatial_dims:
        return x.unsqueeze(1).expand(-1, in_channels, *x.shape[1:]).contiguous()
    if x.ndim == 2 + spatial_dims and x.shape[1] == in_channels:
        return x
    dims = "H, W" if spatial_dims == 2 else "D, H, W"
    raise InputError(f"images must be (B, {dims}) or (B, {in_channels}, {dims}) for a model with {in_channels} "
                     f"input channel(s), got shape {tuple(x.shape)}")


def class_map(probs: torch.Tensor) -> torch.Tensor:
    """``probs.argmax(1)`` (the first class on ties) for (B, K, ...) class probabilities, without torch's
    CPU argmax over the channel axis of a contiguous tensor, which is slow: 12.2 ms for a (4, 2, 128, 128)
    batch against 0.2 ms here (2 threads), 11 ms of a 128 ms embedding step that keeps trigger masks
    (benchmarks/embed_step.py)."""
    best = probs[:, 0]
    labels = torch.zeros(best.shape, dtype=torch.long, device=probs.device)
    for k in range(1, probs.shape[1]):
        labels = torch.where(probs[:, k] > best, k, labels)
        best = torch.maximum(best, probs[:, k])
    return labels


def train_memory_format(device: torch.device, spatial_dims: int) -> torch.memory_format | None:
    """``channels_last`` for 2-D models on the CPU, else None (the module's own layout).

    The same arithmetic in another memory layout, faster on the CPU: the demo's 2200 embedding steps (its
    UNet, 2 threads) took 254 s in the default layout and 201-207 s in channels_last (the demo's stage
    times, benchmarks/results/key_specificity/demo_*.log). Not used on GPUs, where it has not been
    measured."""
    return torch.channels_last if device.type == "cpu" and spatial_dims == 2 else None


class SegmentationModel:
    """images ``(B, C, H, W)`` in model input space -> class probabilities ``(B, K, H, W)``.

    Calling the object is the same as :meth:`probabilities`, so it can be handed to LIME as the query
    function. ``logits=True`` declares that a module whose spec head is ``"probabilities"`` really returns
    logits: softmax (K > 1 channels) or sigmoid (1 channel) is applied instead of checking the values.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        spec: ModelSpec,
        device: str | torch.device | None = "auto",
        max_batch: int = 32,
        logits: bool = False,
        source: str | None = None,
        sha256: str | None = None,
    ) -> None:
        if not isinstance(spec, ModelSpec):
            raise InputError(f"spec must be a ModelSpec, not {type(spec).__name__}")
        spec.check()
        if not _is_int(max_batch) or max_batch < 1:
            raise InputError(f"the batch size must be a positive integer, not {max_batch!r}")
        self.device = resolve_device(device)
        self.spec = spec
        self.module = module.to(self.device)
        self.max_batch = max_batch
        self.logits = bool(logits)
        self.source = None if source is None else str(source)
        self.sha256 = sha256
        # False for a TorchScript file without a spec: K is learnt from the first answer, C is not checked
        self.spec_known = True
        self._classes_learnt = False
        self._chunk = max_batch  # shrinks after an out-of-memory error and stays small
        # a message when the model can be queried but not fine-tuned (ONNX), else None
        self.verify_only: str | None = None

    def __repr__(self) -> str:
        what = self.spec.network or ("ONNX" if self.verify_only else "TorchScript")
        return (
            f"SegmentationModel({what}, head={self.spec.head!r}, in_channels={self.in_channels}, "
            f"num_classes={self.num_classes}, device={self.device}, source={self.source!r})"
        )

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def in_channels(self) -> int:
        return self.spec.in_channels

    @property
    def spatial_dims(self) -> int:
        """2 for images (B, C, H, W), 3 for volumes (B, C, D, H, W)."""
        return self.spec.spatial_dims

    @property
    def device_description(self) -> str:
        """Where the model runs, in one line for logs and reports (a remote model says so)."""
        return describe_device(self.device)

    def __call__(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        return self.probabilities(images)

    def probabilities(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Class probabilities ``(B, K, H, W)``, float32 on the model's device, without gradients."""
        x = self._check_input(images)
        if x.shape[0] == 0:
            return torch.empty(0, self.num_classes, *x.shape[2:], device=self.device)
        b = x.shape[0]
        was_training = self.module.training
        self.module.eval()
        outs = []
        try:
            start = 0
            while start < b:
                size = min(self._chunk, b - start)
                chunk = x[start:start + size]
                raw, oom = self._forward_chunk(chunk)
                if oom:
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    if size == 1:
                        where = "GPU memory" if self.device.type == "cuda" else "memory"
                        raise ResourceError(
                            f"out of {where} on {self.device} even for one image of shape "
                            f"{(1, *chunk.shape[1:])}; try --batch-size N smaller or --device cpu"
                        )
                    self._chunk = max(1, size // 2)
                    continue
                outs.append(self._to_probabilities(raw, tuple(chunk.shape), check=True))
                start += size
        finally:
            self.module.train(was_training)
        result = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
        return result

    def forward_train(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Class probabilities ``(B, K, H, W)`` WITH gradients, module in its current mode (for fine-tuning)."""
        x = self._check_input(images).to(self.device)
        return self._to_probabilities(self.module(x), tuple(x.shape), check=False)

    # -- internals ---------------------------------------------------------------------------------------
    def _check_input(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        x = _as_tensor(images)
        if x.ndim != 2 + self.spatial_dims:
            what = ("a 3-D model takes volumes (B, C, D, H, W)" if self.spatial_dims == 3
                    else "a 2-D model takes images (B, C, H, W)")
            raise InputError(f"{what}; got shape {tuple(x.shape)}")
        if self.spec_known and x.shape[1] != self.in_channels:
            raise InputError(
                f"the model takes {self.in_channels} input channel(s), got images of shape {tuple(x.shape)}"
            )
        return x

    def _forward_chunk(self, chunk: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
        """(raw output, False), or (None, True) when the device ran out of memory."""
        try:
            # no_grad, not inference_mode: TorchScript's executor, once it has run a module with gradients
            # (fine-tuning in this process), runs it through differentiable graphs that must save tensors
            # for backward, which inference mode refuses ("Inference tensors cannot be saved for backward")
            with torch.no_grad():
                return self.module(chunk.to(self.device)), False
        except StealthMarkError:
            raise
        except Exception as exc:
            if _is_oom(exc):
                return None, True
            raise ModelError(
                f"the model failed on input of shape {tuple(chunk.shape)}: {_short(exc)}"
            ) from exc

    def _to_probabilities(self, raw: Any, in_shape: tuple, check: bool) -> torch.Tensor:
        if not isinstance(raw, torch.Tensor):
            raise ModelError(
                f"the model returned {type(raw).__name__} for input shape {in_shape}; expected one tensor "
                "(B, K, H, W)"
            )
        b, spatial = in_shape[0], tuple(in_shape[2:])
        if raw.ndim != len(in_shape) or raw.shape[0] != b or tuple(raw.shape[2:]) != spatial:
            raise ModelError(
                f"the model returned shape {tuple(raw.shape)} for input shape {in_shape}; "
                f"expected ({b}, K, {', '.join(map(str, spatial))})"
            )
        y = raw.float()
        k = y.shape[1]
        head = self.spec.head
        if head == "probabilities" and self.logits:
            head = "softmax" if k > 1 else "sigmoid"
        if head == "softmax":
            if k < 2:
                raise ModelError("a softmax head needs at least 2 output channels, got 1; use head sigmoid")
            p = torch.softmax(y, dim=1)
        elif head == "sigmoid":
            if k != 1:
                raise ModelError(f"a sigmoid head needs 1 output channel, got {k}; use head softmax")
            p = torch.sigmoid(y)
        else:
            p = y
            if check:
                self._check_probabilities(p)
        if check and not torch.isfinite(p).all():
            raise ModelError(f"the model returned NaN or infinite values for input shape {in_shape}")
        if p.shape[1] == 1:
            p = torch.cat([1.0 - p, p], dim=1)
        if check:
            if not self.spec_known and not self._classes_learnt:
                self.spec.num_classes = int(p.shape[1])
                self._classes_learnt = True
            if p.shape[1] != self.num_classes:
                raise ModelError(
                    f"the model returned {p.shape[1]} classes (shape {tuple(raw.shape)}) but its spec says "
                    f"num_classes {self.num_classes}"
                )
        return p

    @staticmethod
    def _check_probabilities(p: torch.Tensor) -> None:
        hint = "if it returns logits, pass --logits"
        lo, hi = float(p.min()), float(p.max())
        if p.shape[1] > 1:
            sums = p.sum(dim=1)
            s_lo, s_hi = float(sums.min()), float(sums.max())
            ok = (abs(s_lo - 1) <= PROBABILITY_TOLERANCE and abs(s_hi - 1) <= PROBABILITY_TOLERANCE
                  and lo >= -PROBABILITY_TOLERANCE and hi <= 1 + PROBABILITY_TOLERANCE)
            if not ok:
                raise ModelError(
                    f"model outputs do not look like probabilities (channel sums range {s_lo:.4g}..{s_hi:.4g}, "
                    f"values {lo:.4g}..{hi:.4g}); {hint}"
                )
        elif not (lo >= -PROBABILITY_TOLERANCE and hi <= 1 + PROBABILITY_TOLERANCE):
            raise ModelError(f"model outputs do not look like probabilities (values range {lo:.4g}..{hi:.4g}); {hint}")


# -- files ---------------------------------------------------------------------------------------------
def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc
    return digest.hexdigest()


def is_torchscript(path: str | os.PathLike) -> bool:
    """A TorchScript archive is a zip with ``<root>/constants.pkl`` or ``<root>/code/``; torch.save zips lack both."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return False
    for name in names:
        parts = name.split("/")
        if len(parts) >= 2 and (parts[1] == "code" or (len(parts) == 2 and parts[1] == "constants.pkl")):
            return True
    return False


def _sidecar_spec_path(path: Path) -> Path:
    return path.with_suffix(".json")


def _is_flat_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _describe(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, dict):
        keys = list(obj)[:5]
        return f"a dict with keys {keys}{'...' if len(obj) > 5 else ''}, not all tensors"
    return f"a {type(obj).__name__}"


def _load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        msg = str(exc)
        found = re.search(r"GLOBAL ([\w.]+)", msg)
        with open(path, "rb") as fh:
            magic = fh.read(4)
        # a refused global, or a plain pickle (PROTO opcode first) that the safe loader cannot read
        if isinstance(exc, pickle.UnpicklingError) and (found or "global" in msg.lower() or magic[:1] == b"\x80"):
            what = f" (such as {found.group(1)})" if found else ""
            raise ModelError(
                f"{path} is not a state dict: it is a pickle of Python objects{what}, which are never "
                f"unpickled from a model file (unsafe); expected {EXPECTED}"
            ) from exc
        why = "a truncated or corrupt zip archive" if magic == b"PK\x03\x04" else "not a model file"
        raise ModelError(f"{path} cannot be read ({why}); expected {EXPECTED}") from exc
    if _is_flat_state_dict(obj):
        return dict(obj)
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if _is_flat_state_dict(obj.get(key)):
                return dict(obj[key])
    raise ModelError(
        f"{path} is not a state dict (it holds {_describe(obj)}); expected a {{name: tensor}} dict, "
        f"possibly nested under {' / '.join(map(repr, STATE_DICT_KEYS))}"
    )


def _fit_state_dict(path: Path, module: torch.nn.Module, sd: dict[str, torch.Tensor], spec: ModelSpec) -> None:
    own = module.state_dict()
    if set(sd) != set(own) and all(k.startswith("module.") for k in sd):  # saved from DataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape (e.g. {'; '.join(shapes[:3])})")
        raise ModelError(
            f"the weights in {path} do not fit the spec's {spec.network} {spec.args}: {'; '.join(parts)} key(s)"
        )
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"the weights in {path} do not fit the spec's {spec.network}: {_short(exc)}") from exc


def load_model(
    path: str | os.PathLike,
    spec: ModelSpec | str | os.PathLike | None = None,
    device: str | torch.device | None = "auto",
    max_batch: int = 32,
    logits: bool = False,
) -> SegmentationModel:
    """Load a TorchScript file, a state dict (+ JSON spec), a MONAI bundle or an ONNX file as a
    :class:`SegmentationModel`.

    MONAI bundle (a folder or .zip with ``configs/metadata.json``): see :mod:`StealthMarkLib.bundle`.
    ONNX (``.onnx``, verification only): see :mod:`StealthMarkLib.onnx_model`.
    TorchScript: the spec is the archive's ``stealthmark.json`` extra file, else ``spec``, else a
    ``<stem>.json`` beside it, else a default (head ``probabilities``, K learnt from the first answer).
    State dict: the spec is ``spec``, else ``<stem>.json`` beside the file; it is required.
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model file not found: {path} (expected {EXPECTED})")
    from .bundle import is_bundle, load_bundle

    if is_bundle(path):
        return load_bundle(path, spec=spec, device=device, max_batch=max_batch, logits=logits)
    if path.is_dir():
        raise ModelError(f"{path} is a directory without configs/metadata.json (not a MONAI bundle); "
                         f"expected {EXPECTED}")
    if path.stat().st_size == 0:
        raise ModelError(f"{path} is empty; expected {EXPECTED}")
    dev = resolve_device(device)
    given = _spec_or_path(spec)
    sha = file_sha256(path)
    sidecar = _sidecar_spec_path(path)
    has_sidecar = sidecar != path and sidecar.is_file()

    from .onnx_model import is_onnx, load_onnx

    if is_onnx(path):
        return load_onnx(path, given, dev, max_batch, logits, sha, sidecar if has_sidecar else None)

    if is_torchscript(path):
        extra = {SPEC_EXTRA_FILE: ""}
        try:
            module = torch.jit.load(str(path), map_location=dev, _extra_files=extra)
        except Exception as exc:
            raise ModelError(f"{path} looks like TorchScript but cannot be loaded: {_short(exc)}") from exc
        embedded = extra[SPEC_EXTRA_FILE]
        known = True
        if embedded:
            if given is not None:
                warnings.warn(f"{path} carries its own spec ({SPEC_EXTRA_FILE}); the spec passed in is not used")
            try:
                model_spec = ModelSpec.from_json(json.loads(embedded))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ModelError(f"{path}: its {SPEC_EXTRA_FILE} is not valid JSON: {exc}") from exc
            except ModelError as exc:
                raise ModelError(f"{path}: its {SPEC_EXTRA_FILE}: {exc}") from exc
        elif given is not None:
            model_spec = given
        elif has_sidecar:
            model_spec = read_spec(sidecar)
        else:
            model_spec, known = ModelSpec(network=None, args={}, head="probabilities"), False
        model = SegmentationModel(module, model_spec, dev, max_batch, logits, source=str(path), sha256=sha)
        model.spec_known = known
        return model

    sd = _load_state_dict_file(path)
    if given is None and has_sidecar:
        given = read_spec(sidecar)
    if given is None:
        raise ModelError(
            f"{path} is a state dict, which needs a JSON spec naming the network and its arguments: "
            f"pass --spec SPEC.json or put {sidecar.name} beside it"
        )
    if given.network is None:
        raise ModelError(f"{path} is a state dict, but its spec names no network to load it into")
    module = build_network(given)
    _fit_state_dict(path, module, sd, given)
    return SegmentationModel(module, given, dev, max_batch, logits, source=str(path), sha256=sha)


class _ProbabilityModule(torch.nn.Module):
    """Wraps a network so that it returns class probabilities (B, K, H, W) itself: a pure black box."""

    def __init__(self, net: torch.nn.Module, mode: str) -> None:
        super().__init__()
        self.net = net
        self.mode = mode  # "softmax" | "sigmoid" | "logits" | "probabilities"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x).float()
        if self.mode == "softmax" or (self.mode == "logits" and y.shape[1] > 1):
            return torch.softmax(y, dim=1)
        if self.mode == "sigmoid" or self.mode == "logits":
            y = torch.sigmoid(y)
        if y.shape[1] == 1:
            return torch.cat([1.0 - y, y], dim=1)
        return y


def _secret_keys(obj: Any, prefix: str = "") -> list[str]:
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            name = f"{prefix}{k}"
            if any(word in str(k).lower() for word in _SECRET_WORDS):
                found.append(name)
            found += _secret_keys(v, name + ".")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found += _secret_keys(v, f"{prefix}{i}.")
    return found


def module_device(module: torch.nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


def save_model(
    model: SegmentationModel | torch.nn.Module,
    out: str | os.PathLike,
    spec: ModelSpec,
    fmt: str = "torchscript",
    refuse: Iterable[str | os.PathLike | None] = (),
) -> Path:
    """Write ``model`` atomically as a self-contained TorchScript black box or as a state dict + spec JSON.

    ``"torchscript"``: the head is applied inside, so the file returns probabilities (B, K, H, W); its
    embedded spec has head ``probabilities`` and keeps the original network/args under
    ``metadata["source_network"]``. ``"state_dict"``: ``out`` holds the weights, ``<stem>.json`` the spec.
    ``refuse`` lists input paths never to overwrite (a SegmentationModel's own ``source`` is always refused).
    """
    out = Path(out)
    spec.check()
    secrets = _secret_keys(spec.metadata)
    if secrets:
        raise ModelError(
            f"the spec metadata holds {', '.join(secrets)}: key material must never go into a model file"
        )
    refused = list(refuse)
    if isinstance(model, SegmentationModel):
        refused.append(model.source)
        module, logits = model.module, model.logits
    elif isinstance(model, torch.nn.Module):
        module, logits = model, False
    else:
        raise InputError(f"save_model needs a SegmentationModel or torch.nn.Module, not {type(model).__name__}")
    refuse_overwriting_inputs(out, refused)

    if fmt == "state_dict":
        if spec.network is None:
            raise ModelError("a state dict needs a spec naming its network; save this model as torchscript")
        sidecar = _sidecar_spec_path(out)
        if sidecar == out:
            raise InputError(f"a state dict cannot be written to a .json file ({out}): its spec goes there")
        refuse_overwriting_inputs(sidecar, refused)
        text = json.dumps(spec.to_json(), indent=2) + "\n"
        with atomic_path(out) as tmp:
            torch.save(module.state_dict(), tmp)
        with atomic_path(sidecar) as tmp:
            tmp.write_text(text, encoding="utf-8")
        return out

    if fmt != "torchscript":
        raise InputError(f"unknown model format {fmt!r}: use torchscript or state_dict")
    mode = "logits" if spec.head == "probabilities" and logits else spec.head
    meta = dict(spec.metadata)
    if spec.network is not None:
        meta["source_network"] = {"network": spec.network, "args": spec.args, "head": spec.head}
    saved = dataclasses.replace(spec, network=None, args={}, head="probabilities", metadata=meta)
    text = json.dumps(saved.to_json())
    was_training = module.training
    wrapper = _ProbabilityModule(module, mode).eval()
    try:
        try:
            scripted = torch.jit.script(wrapper)
        except Exception:  # not scriptable: trace at the training size (shapes then follow the example)
            size = spec.image_size or (64,) * spec.spatial_dims
            example = torch.zeros(1, spec.in_channels, *size, device=module_device(module))
            with torch.no_grad():
                scripted = torch.jit.trace(wrapper, example, check_trace=False)
        scripted.eval()
        with atomic_path(out) as tmp:
            torch.jit.save(scripted, str(tmp), _extra_files={SPEC_EXTRA_FILE: text})
    finally:
        module.train(was_training)
    return out
