"""MONAI bundles in and out: a folder or .zip with ``configs/metadata.json`` and ``models/model.pt``
(a state dict, its network described by ``configs/inference.json``'s ``network_def``) or ``models/model.ts``
(TorchScript).

Bundles are untrusted. Their configs are MONAI config files, in which ``_target_`` names anything importable
and ``$`` strings are Python expressions; neither is ever run here. ``network_def`` is checked first: its
``_target_`` must be a class of ``monai.networks.nets``, ``@`` references are resolved here to plain values,
and ``$`` expressions, ``%`` macros, nested ``_target_``s and other ``_special_`` keys are refused. Only then is
the network built with ``monai.bundle.ConfigParser`` from plain values. The weights are read with
``torch.load(weights_only=True)`` or ``torch.jit.load``.

The watermarked bundle keeps the input's layout (folder in, folder out; zip in, zip out, with the same top
folder), its ``version`` gets the patch component + 1 with a ``changelog`` entry, and its metadata a
``stealthmark`` block: the key commitment (never seeds), the training settings and the model's input spec.

2-D networks (``spatial_dims`` 2) of any ``monai.networks.nets`` class are read; 3-D networks only as a
``UNet`` (what :mod:`StealthMarkLib.volume3d` watermarks), queried on the ROI ``[D, H, W]`` that metadata's
``network_data_format.inputs.image.spatial_shape`` gives as three integers (in the network's input axis
order; StealthMark's slabs put the slice axis first).
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import json
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from .errors import InputError, ModelError
from .fileio import atomic_path

METADATA = "configs/metadata.json"
INFERENCE = "configs/inference.json"
MODEL_PT = "models/model.pt"
MODEL_TS = "models/model.ts"
BLOCK = "stealthmark"
# other weight files in models/ would be unwatermarked copies of the network: they are not carried over
WEIGHT_SUFFIXES = (".pt", ".pth", ".ts", ".onnx", ".engine", ".plan", ".ckpt", ".safetensors", ".bin")
_TARGET = re.compile(r"^(?:monai\.networks\.nets\.(?:[a-z_][a-z0-9_]*\.)?)?([A-Za-z_][A-Za-z0-9_]*)$")
_MAX_REF_DEPTH = 32


# -- reading -----------------------------------------------------------------------------------------------
def _zip_names(path: Path) -> list[str] | None:
    try:
        with zipfile.ZipFile(path) as zf:
            return [n for n in zf.namelist() if not n.endswith("/")]
    except (zipfile.BadZipFile, OSError, ValueError):
        return None


def _zip_prefix(names: list[str]) -> str | None:
    """'' or 'name/' when the zip holds a bundle (configs/ or models/ at its top or one folder down)."""
    for name in names:
        parts = PurePosixPath(name).parts
        if len(parts) >= 2 and parts[0] in ("configs", "models"):
            return ""
    for name in names:
        parts = PurePosixPath(name).parts
        if len(parts) >= 3 and parts[1] in ("configs", "models"):
            return parts[0] + "/"
    return None


def is_bundle(path: str | os.PathLike) -> bool:
    """A folder with configs/ or models/, or a zip (not TorchScript) holding them: a MONAI bundle to open."""
    path = Path(path)
    if path.is_dir():
        return (path / "configs").is_dir() or (path / "models").is_dir()
    if path.is_file() and path.suffix.lower() == ".zip":
        names = _zip_names(path)
        return names is not None and _zip_prefix(names) is not None
    return False


class Bundle:
    """Read access to a bundle folder or zip, by bundle-relative posix names (``configs/metadata.json``)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.is_zip = self.path.is_file()
        if self.is_zip:
            names = _zip_names(self.path)
            prefix = None if names is None else _zip_prefix(names)
            if prefix is None:
                raise ModelError(f"{self.path} is not a MONAI bundle zip: it has no configs/ or models/ folder")
            self.prefix = prefix
            self._names = sorted(n[len(prefix):] for n in names if n.startswith(prefix))
        elif self.path.is_dir():
            self.prefix = ""
            self._names = sorted(p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file())
        else:
            raise ModelError(f"MONAI bundle not found: {self.path}")

    def names(self) -> list[str]:
        return list(self._names)

    def has(self, name: str) -> bool:
        return name in self._names

    def read(self, name: str) -> bytes:
        try:
            if self.is_zip:
                with zipfile.ZipFile(self.path) as zf:
                    return zf.read(self.prefix + name)
            return (self.path / name).read_bytes()
        except (KeyError, OSError, zipfile.BadZipFile) as exc:
            raise ModelError(f"cannot read {name} from the bundle {self.path}: {exc}") from exc

    def json(self, name: str) -> dict:
        try:
            data = json.loads(self.read(name).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(f"{name} in the bundle {self.path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ModelError(f"{name} in the bundle {self.path} must be a JSON object, not {type(data).__name__}")
        return data

    def metadata(self) -> dict:
        if not self.has(METADATA):
            raise ModelError(f"{self.path} has no {METADATA}: a MONAI bundle needs its metadata file "
                             "(see the MONAI bundle specification)")
        return self.json(METADATA)

    def model_file(self) -> str:
        for name in (MODEL_PT, MODEL_TS):
            if self.has(name):
                return name
        raise ModelError(f"the bundle {self.path} has no model file: expected {MODEL_PT} (a state dict) or "
                         f"{MODEL_TS} (TorchScript)")


# -- the network definition, checked before anything is built ----------------------------------------------
def _lookup(config: dict, ref: str, where: str) -> Any:
    node: Any = config
    for part in re.split(r"::|#", ref):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise ModelError(f"{where}: the reference @{ref} points to nothing in the config")
    return node


def _plain(value: Any, config: dict, where: str, depth: int = 0, top: bool = False) -> Any:
    """``value`` with ``@`` references resolved, as plain JSON values; anything executable is refused."""
    if depth > _MAX_REF_DEPTH:
        raise ModelError(f"{where}: references nest too deeply (a cycle?)")
    if isinstance(value, str):
        if value.startswith("$"):
            raise ModelError(f"{where}: the expression {value[:60]!r} is refused: expressions in an untrusted "
                             "bundle are never evaluated; write plain values in network_def")
        if value.startswith("%"):
            raise ModelError(f"{where}: the macro {value[:60]!r} is refused (it would read another file); write "
                             "plain values in network_def")
        if value.startswith("@"):
            return _plain(_lookup(config, value[1:], where), config, f"{where} -> {value}", depth + 1)
        return value
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ModelError(f"{where}: keys must be strings")
            if k.startswith("_") and k.endswith("_"):
                if top and k == "_target_":
                    out[k] = v
                    continue
                what = "another object to instantiate" if k == "_target_" else f"the special key {k!r}"
                raise ModelError(f"{where}: {what} is refused; network_def may only build one "
                                 "monai.networks.nets class from plain arguments")
            out[k] = _plain(v, config, f"{where}.{k}", depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(v, config, where, depth + 1) for v in value]
    if value is None or isinstance(value, (bool, int, float)):
        return value
    raise ModelError(f"{where}: unsupported value {value!r}")


def safe_network_def(config: dict, where: str) -> tuple[str, dict]:
    """(class name in monai.networks.nets, plain constructor arguments) of ``config['network_def']``."""
    if "network_def" not in config:
        raise ModelError(f"{where} has no network_def: the bundle's state dict cannot be loaded without it")
    net = config["network_def"]
    if isinstance(net, str) and net.startswith("@"):
        net = _lookup(config, net[1:], f"{where} network_def")
    if not isinstance(net, dict) or "_target_" not in net:
        raise ModelError(f"{where}: network_def must be an object with a _target_ naming a monai.networks.nets class")
    net = _plain(net, config, f"{where} network_def", top=True)
    target = net.pop("_target_")
    m = _TARGET.match(target) if isinstance(target, str) else None
    from monai.networks import nets

    cls = getattr(nets, m.group(1), None) if m else None
    if not (inspect.isclass(cls) and issubclass(cls, torch.nn.Module)):
        raise ModelError(f"{where}: network_def's _target_ {target!r} is refused: only monai.networks.nets classes "
                         "(e.g. UNet, BasicUNet, SegResNet) are built from a bundle")
    return m.group(1), net


def build_bundle_network(name: str, args: dict, where: str) -> torch.nn.Module:
    from monai.bundle import ConfigParser

    parser = ConfigParser({"network_def": {"_target_": f"monai.networks.nets.{name}", **args}})
    try:
        net = parser.get_parsed_content("network_def", instantiate=True)
    except Exception as exc:
        raise ModelError(f"{where}: {name} could not be built from network_def: {type(exc).__name__}: "
                         f"{str(exc)[-400:]}") from exc
    if not isinstance(net, torch.nn.Module):  # pragma: no cover - guarded by safe_network_def
        raise ModelError(f"{where}: network_def did not build a torch module")
    return net


def _spatial_dims(name: str, args: dict) -> Any:
    from monai.networks import nets

    if "spatial_dims" in args:
        return args["spatial_dims"]
    p = inspect.signature(getattr(nets, name)).parameters.get("spatial_dims")
    return None if p is None or p.default is inspect.Parameter.empty else p.default


# -- loading -----------------------------------------------------------------------------------------------
# 3-D networks StealthMark can watermark (volume3d.py): the ones models.py accepts with spatial_dims 3
NETWORKS_3D = ("UNet",)


def _image_shape(meta: dict, dims: int = 2) -> list[int] | None:
    """metadata.json's input ``spatial_shape`` when it is ``dims`` fixed positive integers, else None."""
    shape = _raw_image_shape(meta)
    if isinstance(shape, list) and len(shape) == dims and all(isinstance(s, int) and not isinstance(s, bool)
                                                              and s > 0 for s in shape):
        return [int(s) for s in shape]
    return None


def _raw_image_shape(meta: dict) -> Any:
    try:
        return meta["network_data_format"]["inputs"]["image"]["spatial_shape"]
    except (KeyError, TypeError):
        return None


def _output_channels(meta: dict) -> int | None:
    try:
        outputs = meta["network_data_format"]["outputs"]
        k = next(iter(outputs.values()))["num_channels"]
    except (KeyError, TypeError, StopIteration, AttributeError):
        return None
    return k if isinstance(k, int) and k > 0 else None


def _bundle_dims(bundle: Bundle, meta: dict, name: str | None, args: dict, own: dict) -> int:
    """2 or 3: from network_def (its spatial_dims, or the class's default), else from a StealthMark block,
    else from the length of metadata's input spatial_shape; a clear error for what is not supported."""
    if name is not None:
        dims = _spatial_dims(name, args)
        if dims == 3 and name not in NETWORKS_3D:
            raise ModelError(f"the bundle {bundle.path} holds a 3-D {name}; StealthMark watermarks 3-D models for "
                             f"MONAI {' and '.join(NETWORKS_3D)} only (2-D models: spatial_dims 2)")
        if dims not in (2, 3):
            raise ModelError(f"the bundle {bundle.path} holds a {dims}-D {name}; StealthMark watermarks 2-D "
                             f"segmentation models (spatial_dims 2) and 3-D {' / '.join(NETWORKS_3D)} "
                             "(spatial_dims 3)")
        return int(dims)
    if own.get("spatial_dims") in (2, 3):
        return int(own["spatial_dims"])
    shape = _raw_image_shape(meta)
    return 3 if isinstance(shape, list) and len(shape) == 3 else 2


def _spec_for(bundle: Bundle, meta: dict, name: str | None, args: dict, given: Any) -> Any:
    from .models import ModelSpec

    head, in_ch, k = "probabilities", 1, None
    own = meta.get(BLOCK, {}).get("spec", {}) if isinstance(meta.get(BLOCK), dict) else {}
    own = own if isinstance(own, dict) else {}
    dims = _bundle_dims(bundle, meta, name, args, own)
    if name is not None:
        in_ch = args.get("in_channels", 1)
        k = args.get("out_channels")
    if k is None:
        k = _output_channels(meta)
    if isinstance(k, int) and k >= 1:
        head = "sigmoid" if k == 1 else "softmax"  # MONAI networks return logits
    spec = ModelSpec(network=name, args=args if name else {}, head=own.get("head", head),
                     in_channels=own.get("in_channels", in_ch),
                     num_classes=own.get("num_classes", 2 if k in (None, 1) else k),
                     image_size=own.get("image_size") or _image_shape(meta, dims),
                     intensity=own.get("intensity"), spatial_dims=dims)
    if given is not None:
        if given.spatial_dims != dims and given.image_size:
            raise ModelError(f"the bundle {bundle.path} holds a {dims}-D network, but the spec given with it says "
                             f"spatial_dims {given.spatial_dims} (image_size {given.image_size})")
        spec.image_size = spec.image_size or given.image_size
        spec.intensity = spec.intensity or given.intensity
    if dims == 3 and not spec.image_size:
        raw = _raw_image_shape(meta)
        raise ModelError(f"the bundle {bundle.path} holds a 3-D {name or 'network'} but does not record the ROI it "
                         f"is queried on: {METADATA}'s network_data_format.inputs.image.spatial_shape is {raw!r}; "
                         "StealthMark needs three fixed integers [D, H, W] there (or --spec SPEC.json with "
                         "spatial_dims 3 and image_size [D, H, W])")
    try:
        return spec.check(), k is not None or bool(own)
    except ModelError as exc:
        raise ModelError(f"the bundle {bundle.path}: {exc}") from exc


def load_bundle(path: str | os.PathLike, spec: Any = None, device: Any = "auto", max_batch: int = 32,
                logits: bool = False) -> Any:
    """Open a MONAI bundle as a SegmentationModel (``models/model.pt`` preferred, else ``models/model.ts``)."""
    from .models import (SPEC_EXTRA_FILE, ModelSpec, SegmentationModel, _fit_state_dict, _load_state_dict_file,
                         _short, _spec_or_path, file_sha256, resolve_device)

    bundle = Bundle(path)
    meta = bundle.metadata()
    model_name = bundle.model_file()
    dev = resolve_device(device)
    given = _spec_or_path(spec)
    config = bundle.json(INFERENCE) if bundle.has(INFERENCE) else None
    where = f"{bundle.path}: {INFERENCE}"
    if model_name == MODEL_PT and (config is None or "network_def" not in config):
        if not bundle.has(MODEL_TS):
            raise ModelError(f"the bundle {bundle.path} has {MODEL_PT} (a state dict) but no {INFERENCE} with a "
                             f"network_def to build its network; add one, or ship {MODEL_TS}")
        model_name = MODEL_TS
    with tempfile.TemporaryDirectory(prefix="stealthmark-bundle-") as tmp:
        local = Path(tmp) / PurePosixPath(model_name).name
        local.write_bytes(bundle.read(model_name))
        sha = file_sha256(local)
        if model_name == MODEL_PT:
            name, args = safe_network_def(config, where)
            model_spec, _ = _spec_for(bundle, meta, name, args, given)
            module = build_bundle_network(name, args, where)
            _fit_state_dict(local, module, _load_state_dict_file(local), model_spec)
            known = True
        else:
            extra = {SPEC_EXTRA_FILE: ""}
            try:
                module = torch.jit.load(str(local), map_location=dev, _extra_files=extra)
            except Exception as exc:
                raise ModelError(f"{MODEL_TS} in the bundle {bundle.path} cannot be loaded as TorchScript: "
                                 f"{_short(exc)}") from exc
            if extra[SPEC_EXTRA_FILE]:
                try:
                    model_spec, known = ModelSpec.from_json(json.loads(extra[SPEC_EXTRA_FILE])), True
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise ModelError(f"{bundle.path}: its model.ts {SPEC_EXTRA_FILE} is not valid JSON: {exc}") from exc
            else:
                name, args = (None, {})
                if config is not None and "network_def" in config:
                    name, args = safe_network_def(config, where)
                model_spec, known = _spec_for(bundle, meta, name, args, given)
    model = SegmentationModel(module, model_spec, dev, max_batch, logits, source=str(bundle.path), sha256=sha)
    model.spec_known = known
    model.bundle = {"path": str(bundle.path), "model_file": model_name, "version": meta.get("version")}
    return model


# -- writing -----------------------------------------------------------------------------------------------
def bump_version(version: Any, where: str) -> str:
    m = re.match(r"^(\d+)\.(\d+)\.(\d+)", version) if isinstance(version, str) else None
    if not m:
        raise ModelError(f"{where}: version {version!r} is not MAJOR.MINOR.PATCH, so it cannot be bumped; "
                         "fix the bundle's metadata.json")
    return f"{m.group(1)}.{m.group(2)}.{int(m.group(3)) + 1}"


@dataclass
class BundlePlan:
    """Everything checked before fine-tuning, so that a bad bundle or OUT fails before any work."""

    source: Bundle
    out: Path
    metadata: dict
    new_version: str
    model_files: list[str]   # which of model.pt / model.ts to write
    dropped: list[str]       # other weight files, not carried over


def plan_bundle_output(src: str | os.PathLike, out: str | os.PathLike) -> BundlePlan:
    bundle = Bundle(src)
    out = Path(out)
    meta = bundle.metadata()
    bundle.model_file()
    new_version = bump_version(meta.get("version"), f"{bundle.path} {METADATA}")
    if bundle.is_zip and out.suffix.lower() != ".zip":
        raise InputError(f"the input bundle is a zip, so OUT must be a .zip file too, not {out}")
    if not bundle.is_zip:
        if out.suffix.lower() == ".zip":
            raise InputError(f"the input bundle is a folder, so OUT must be a folder too, not the zip {out}")
        src_dir = bundle.path.resolve()
        res = out.resolve()
        if res == src_dir or src_dir in res.parents or res in src_dir.parents:
            raise InputError(f"OUT {out} must be outside the input bundle {bundle.path} (and not contain it)")
        if out.exists() and not out.is_dir():
            raise InputError(f"OUT {out} is a file; the watermarked bundle is a folder: choose another path")
        if out.is_dir() and any(out.iterdir()) and not (out / METADATA).is_file():
            raise InputError(f"OUT {out} is a folder that is not empty and not a MONAI bundle: choose another path")
    elif out.is_dir():
        raise InputError(f"OUT {out} is a folder; the watermarked bundle is a zip file: choose another path")
    files = [n for n in (MODEL_PT, MODEL_TS) if bundle.has(n)]
    dropped = [n for n in bundle.names() if n.startswith("models/") and n not in files
               and n.lower().endswith(WEIGHT_SUFFIXES)]
    return BundlePlan(bundle, out, meta, new_version, files, dropped)


def watermarked_metadata(plan: BundlePlan, block: dict) -> dict:
    """The input metadata with version + 1 patch, a changelog entry first, and the stealthmark block."""
    from .models import _secret_keys

    secrets = _secret_keys(block)
    if secrets:
        raise ModelError(f"the stealthmark block holds {', '.join(secrets)}: key material must never go into a bundle")
    meta = dict(plan.metadata)
    old = meta.get("changelog") if isinstance(meta.get("changelog"), dict) else {}
    note = (f"watermarked with StealthMark (key commitment {block.get('key_commitment', '?')[:16]}...; "
            f"{block.get('training', {}).get('steps', '?')} fine-tuning steps)")
    meta["version"] = plan.new_version
    meta["changelog"] = {plan.new_version: note, **{k: v for k, v in old.items() if k != plan.new_version}}
    meta[BLOCK] = block
    return meta


def _model_bytes(name: str, module: torch.nn.Module, spec: Any) -> bytes:
    from .models import SPEC_EXTRA_FILE

    buf = io.BytesIO()
    if name == MODEL_PT:
        torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, buf)
        return buf.getvalue()
    # TorchScript stays the raw network (MONAI's inference.json post-processing expects its logits); its
    # extra file tells StealthMark the head
    was_training = module.training
    module.eval()
    try:
        scripted = module if isinstance(module, torch.jit.ScriptModule) else torch.jit.script(module)
        text = json.dumps(dataclasses.replace(spec, network=None, args={}).to_json())
        torch.jit.save(scripted, buf, _extra_files={SPEC_EXTRA_FILE: text})
    except Exception as exc:
        raise ModelError(f"the watermarked network cannot be written as TorchScript for {MODEL_TS}: "
                         f"{type(exc).__name__}: {str(exc)[-300:]}") from exc
    finally:
        module.train(was_training)
    return buf.getvalue()


def write_bundle(plan: BundlePlan, module: torch.nn.Module, spec: Any, block: dict) -> Path:
    """Write the watermarked bundle atomically in the input's layout; returns OUT."""
    meta = watermarked_metadata(plan, block)
    new = {METADATA: (json.dumps(meta, indent=4) + "\n").encode("utf-8")}
    for name in plan.model_files:
        new[name] = _model_bytes(name, module, spec)
    src, out = plan.source, plan.out
    keep = [n for n in src.names() if n not in new and n not in plan.dropped]

    if src.is_zip:
        with atomic_path(out) as tmp:
            with zipfile.ZipFile(src.path) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
                for name in keep:
                    zout.writestr(src.prefix + name, zin.read(src.prefix + name))
                for name, data in new.items():
                    zout.writestr(src.prefix + name, data)
        return out

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    old = None
    try:
        for name in keep:
            dest = tmp / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src.path / name, dest)
        for name, data in new.items():
            dest = tmp / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
        os.chmod(tmp, 0o777 & ~_umask())
        if out.exists():  # an earlier bundle (or an empty folder): swap it out, then remove it
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.rmdir(old)
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        if old is not None and old.exists() and not out.exists():
            os.replace(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def stealthmark_block(key_commitment: str, training: dict, data: str, spec: Any) -> dict:
    own = {"head": spec.head, "in_channels": spec.in_channels, "num_classes": spec.num_classes,
           "image_size": spec.image_size, "intensity": spec.intensity}
    if spec.spatial_dims != 2:  # 2-D blocks are written as before 3-D bundles were read
        own["spatial_dims"] = spec.spatial_dims
    return {"key_commitment": key_commitment, "embedded": datetime.now(timezone.utc).isoformat(),
            "training": training, "data": data, "spec": own}
