"""ONNX models, for verification only: an onnxruntime session behind the usual query interface.

A 2-D model's graph takes images ``(B, C, H, W)``, a 3-D model's (spec ``spatial_dims`` 3) volumes
``(B, C, D, H, W)``; a graph whose rank, channel count or fixed size disagrees with its spec is refused
with both shapes named.

:func:`load_onnx` wraps the session in :class:`OnnxModule` (a ``torch.nn.Module`` without parameters whose
forward runs the session on numpy arrays), so that :class:`~StealthMarkLib.models.SegmentationModel` queries
it like any other model, in chunks of at most ``max_batch``. Its weights cannot be fine-tuned: embedding
refuses ONNX models. :func:`export_onnx` writes a torch model as an ONNX black box that returns probabilities,
with its spec in the file's metadata (``metadata_props``), for ONNX round trips.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import InputError, ModelError
from .fileio import atomic_path, refuse_overwriting_inputs

SPEC_METADATA_KEY = "stealthmark.json"  # same name as the TorchScript extra file
VERIFY_ONLY = ("ONNX models can be verified but not watermarked (their weights cannot be fine-tuned here): "
               "embed the original PyTorch model (TorchScript, state dict or MONAI bundle), then export it")


def is_onnx(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == ".onnx"


def _dim(d: Any) -> int | None:
    """A static dimension as an int, a symbolic/unknown one as None."""
    return int(d) if isinstance(d, (int, np.integer)) and int(d) > 0 else None


def _shape_text(shape: list) -> str:
    return "(" + ", ".join(str(d) if isinstance(d, int) else repr(d) for d in shape) + ")"


class OnnxModule(torch.nn.Module):
    """Runs an onnxruntime session: x (B, C, H, W) float32 (a 3-D model's graph: (B, C, D, H, W)) -> the
    graph's first output, as a torch tensor.

    A graph with a fixed batch size N is fed N images at a time (the last group padded with zeros).
    """

    def __init__(self, session: Any, path: str) -> None:
        super().__init__()
        self.session = session
        self.path = path
        inp = session.get_inputs()[0]
        self.input_name = inp.name
        self.input_shape = list(inp.shape)
        self.rank = len(self.input_shape)          # 4 (images) or 5 (volumes)
        self.fixed_batch = _dim(self.input_shape[0])
        self.channels = _dim(self.input_shape[1])
        self.size = tuple(_dim(d) for d in self.input_shape[2:])
        out = session.get_outputs()[0]
        self.output_name = out.name
        self.output_shape = list(out.shape)
        self.providers = list(session.get_providers())

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != self.rank:
            what = "(B, C, H, W) images" if self.rank == 4 else "(B, C, D, H, W) volumes"
            raise InputError(f"{self.path} takes {what} (graph input {_shape_text(self.input_shape)}); got shape "
                             f"{tuple(x.shape)}")
        if self.channels is not None and x.shape[1] != self.channels:
            raise InputError(f"{self.path} takes {self.channels} input channel(s) (graph input "
                             f"{_shape_text(self.input_shape)}); got images of shape {tuple(x.shape)}")
        for want, got in zip(self.size, x.shape[2:]):
            if want is not None and want != got:
                size = " x ".join("?" if s is None else str(s) for s in self.size)
                what = "images" if self.rank == 4 else "volumes"
                raise InputError(f"{self.path} takes {what} of size {size} (graph input "
                                 f"{_shape_text(self.input_shape)}); got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        n = self.fixed_batch
        if n is None or n == len(arr):
            out = self._run(arr)
        else:  # a graph with a fixed batch size: feed it n images at a time
            outs = []
            for start in range(0, len(arr), n):
                part = arr[start:start + n]
                pad = n - len(part)
                if pad:
                    part = np.concatenate([part, np.zeros((pad, *part.shape[1:]), part.dtype)])
                outs.append(self._run(part)[: n - pad])
            out = np.concatenate(outs)
        return torch.from_numpy(np.ascontiguousarray(out)).to(x.device)

    def _run(self, arr: np.ndarray) -> np.ndarray:
        try:
            (out,) = self.session.run([self.output_name], {self.input_name: arr})
        except Exception as exc:
            msg = f"{type(exc).__name__}: {exc}"
            if "out of memory" in msg.lower() or "bad_alloc" in msg.lower():
                raise RuntimeError("out of memory: " + msg[-300:]) from exc  # models._is_oom halves the batch
            raise ModelError(f"the ONNX model {self.path} failed on input of shape {arr.shape}: "
                             f"{msg[-600:]}") from exc
        if not isinstance(out, np.ndarray):
            raise ModelError(f"the ONNX model {self.path} returned {type(out).__name__}, not an array")
        return out.astype(np.float32, copy=False)


def _session(path: Path, device: torch.device) -> Any:
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ModelError("reading ONNX models needs the onnxruntime package: pip install onnxruntime") from exc
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as exc:
        raise ModelError(f"{path} cannot be read as an ONNX model: {type(exc).__name__}: {str(exc)[-400:]}") from exc


def _spec_input(spec: Any) -> str:
    """The input shape a spec describes, e.g. ``(B, 1, 4, 48, 48)`` or ``(B, 1, H, W)``."""
    names = ("H", "W") if spec.spatial_dims == 2 else ("D", "H", "W")
    size = spec.image_size or names
    return "(B, " + ", ".join(str(v) for v in (spec.in_channels, *size)) + ")"


def load_onnx(path: Path, given: Any, device: torch.device, max_batch: int, logits: bool, sha256: str,
              sidecar: Path | None) -> Any:
    """Load ``path`` as a verification-only SegmentationModel (see :func:`StealthMarkLib.models.load_model`).

    The spec is the file's own ``stealthmark.json`` metadata (written by :func:`export_onnx`), else ``given``,
    else the JSON ``sidecar``, else a default (head ``probabilities``, K from the graph or the first answer;
    a rank-5 graph input makes it a 3-D model). Static channel and spatial sizes of the graph fill in
    ``in_channels`` and ``image_size``; a graph that disagrees with the spec (rank, channels, size) is refused.
    """
    from .models import ModelSpec, SegmentationModel, read_spec

    session = _session(path, device)
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1:
        names = ", ".join(f"{i.name} {_shape_text(list(i.shape))}" for i in inputs)
        raise ModelError(f"{path} has {len(inputs)} inputs ({names}); expected one image input (B, C, H, W) "
                         "(or, for a 3-D model, one volume input (B, C, D, H, W))")
    if not outputs:
        raise ModelError(f"{path} has no outputs; expected probabilities or logits (B, K, H, W)")
    inp = inputs[0]
    shape = list(inp.shape) if inp.shape is not None else []
    if len(shape) not in (4, 5):
        raise ModelError(f"{path} has input {inp.name!r} of shape {_shape_text(shape)} (rank {len(shape)}); "
                         "expected a rank-4 image input (B, C, H, W), or rank 5 (B, C, D, H, W) for a 3-D model")
    if inp.type != "tensor(float)":
        raise ModelError(f"{path} has input {inp.name!r} of type {inp.type}; expected float32 images "
                         "(tensor(float))")
    module = OnnxModule(session, str(path))
    graph_dims = len(shape) - 2

    embedded = session.get_modelmeta().custom_metadata_map.get(SPEC_METADATA_KEY)
    known = True
    if embedded:
        try:
            spec = ModelSpec.from_json(json.loads(embedded))
        except json.JSONDecodeError as exc:
            raise ModelError(f"{path}: its {SPEC_METADATA_KEY} metadata is not valid JSON: {exc}") from exc
        except ModelError as exc:
            raise ModelError(f"{path}: its {SPEC_METADATA_KEY} metadata: {exc}") from exc
        if given is not None:
            warnings.warn(f"{path} carries its own spec ({SPEC_METADATA_KEY}); the spec passed in is not used")
    elif given is not None:
        spec = dataclasses.replace(given)
    elif sidecar is not None:
        spec = read_spec(sidecar)
    else:
        spec, known = ModelSpec(network=None, args={}, head="probabilities", spatial_dims=graph_dims), False
        if module.channels is not None:
            spec.in_channels = module.channels
        out_shape = list(outputs[0].shape) if outputs[0].shape is not None else []
        k = _dim(out_shape[1]) if len(out_shape) == len(shape) else None
        if k is not None and k >= 2:
            spec.num_classes, known = k, True
    if graph_dims != spec.spatial_dims:
        what = {2: "2-D images (B, C, H, W)", 3: "3-D volumes (B, C, D, H, W)"}
        raise ModelError(f"{path} takes {what[graph_dims]} (graph input {inp.name!r} {_shape_text(shape)}), but its "
                         f"spec says spatial_dims {spec.spatial_dims}: inputs {_spec_input(spec)}; export the "
                         f"{spec.spatial_dims}-D model again, or fix the spec")
    if module.channels is not None and spec.in_channels != module.channels:
        raise ModelError(f"{path} takes {module.channels} input channel(s) (graph input {_shape_text(shape)}), "
                         f"but its spec says in_channels {spec.in_channels}: inputs {_spec_input(spec)}")
    if all(s is not None for s in module.size):
        graph_size = [int(s) for s in module.size]
        if spec.image_size is not None and list(spec.image_size) != graph_size:
            raise ModelError(f"{path} takes inputs of size {' x '.join(map(str, graph_size))} (graph input "
                             f"{_shape_text(shape)}), but its spec says image_size {spec.image_size}: inputs "
                             f"{_spec_input(spec)}")
        spec.image_size = graph_size
    model = SegmentationModel(module, spec, device, max_batch, logits, source=str(path), sha256=sha256)
    model.spec_known = known
    model.verify_only = VERIFY_ONLY
    return model


def export_onnx(model: Any, path: str | os.PathLike, image_size: tuple[int, int] | list[int] | None = None,
                spec: Any = None, refuse: Any = (), opset: int = 17) -> Path:
    """Write a torch model as an ONNX black box returning probabilities (B, K, H, W), atomically.

    ``model`` is a SegmentationModel (its spec is used) or a ``torch.nn.Module`` with ``spec``. The graph
    has a dynamic batch axis and a fixed ``image_size`` (default: the spec's); the spec, with head
    ``probabilities``, goes into the file's metadata so that :func:`load_onnx` needs no sidecar. A 3-D
    model (spec ``spatial_dims`` 3) gives a graph on volumes (B, C, D, H, W) -> (B, K, D, H, W), its
    ``image_size`` the ROI [D, H, W].
    """
    import onnx

    from .models import (ModelSpec, SegmentationModel, _ProbabilityModule, _secret_keys, module_device)

    path = Path(path)
    if isinstance(model, SegmentationModel):
        if getattr(model, "verify_only", None):
            raise ModelError("this model is already an ONNX file; export the original PyTorch model instead")
        module, logits, spec = model.module, model.logits, spec or model.spec
        refuse = [*refuse, model.source]
    elif isinstance(model, torch.nn.Module):
        module, logits = model, False
        if not isinstance(spec, ModelSpec):
            raise InputError("export_onnx of a torch.nn.Module needs its ModelSpec (spec=...)")
    else:
        raise InputError(f"export_onnx needs a SegmentationModel or torch.nn.Module, not {type(model).__name__}")
    spec.check()
    size = image_size or spec.image_size
    dims = spec.spatial_dims
    if not size or len(size) != dims or not all(isinstance(s, int) and s > 0 for s in size):
        want = "the input size [H, W]" if dims == 2 else "a 3-D model's ROI [D, H, W]"
        raise InputError(f"export_onnx needs {want} (image_size), got {size!r}")
    secrets = _secret_keys(spec.metadata)
    if secrets:
        raise ModelError(f"the spec metadata holds {', '.join(secrets)}: key material must never go into a model file")
    refuse_overwriting_inputs(path, refuse)
    mode = "logits" if spec.head == "probabilities" and logits else spec.head
    meta = dict(spec.metadata)
    if spec.network is not None:
        meta["source_network"] = {"network": spec.network, "args": spec.args, "head": spec.head}
    saved = dataclasses.replace(spec, network=None, args={}, head="probabilities", metadata=meta,
                                image_size=[int(s) for s in size])
    text = json.dumps(saved.to_json())
    was_training = module.training
    wrapper = _ProbabilityModule(module, mode).eval()
    example = torch.zeros(1, spec.in_channels, *(int(s) for s in size), device=module_device(module))
    try:
        with atomic_path(path) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.no_grad():
                torch.onnx.export(wrapper, (example,), str(tmp), input_names=["image"],
                                  output_names=["probabilities"], opset_version=opset,
                                  dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}},
                                  dynamo=False)
            proto = onnx.load(str(tmp))
            entry = proto.metadata_props.add()
            entry.key, entry.value = SPEC_METADATA_KEY, text
            onnx.checker.check_model(proto)
            onnx.save(proto, str(tmp))
    finally:
        module.train(was_training)
    return path
