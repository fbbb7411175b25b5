"""Tests for StealthMarkLib.models: the query interface, safe loading and saving, with real tiny MONAI nets."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import zipfile

import numpy as np
import pytest
import torch

from StealthMarkLib.errors import InputError, ModelError, ResourceError
from StealthMarkLib.models import (
    NETWORKS,
    ModelSpec,
    SegmentationModel,
    build_network,
    class_map,
    describe_device,
    file_sha256,
    load_model,
    read_spec,
    resolve_device,
    save_model,
)

pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.jit.*deprecated:DeprecationWarning")

UNET_ARGS = {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "channels": [4, 8, 16], "strides": [2, 2],
             "num_res_units": 1}
SPECS = {
    "UNet": ModelSpec("UNet", UNET_ARGS, head="softmax"),
    "BasicUNet": ModelSpec("BasicUNet", {"spatial_dims": 2, "in_channels": 1, "out_channels": 1,
                                         "features": [4, 4, 8, 8, 16, 4]}, head="sigmoid"),
    "SegResNet": ModelSpec("SegResNet", {"spatial_dims": 2, "in_channels": 1, "out_channels": 3, "init_filters": 4,
                                         "blocks_down": [1, 1], "blocks_up": [1],
                                         "norm": ["GROUP", {"num_groups": 2}]}, head="softmax", num_classes=3),
}


def unet_spec(**changes) -> ModelSpec:
    spec = ModelSpec("UNet", dict(UNET_ARGS), image_size=[32, 32],
                     intensity={"mode": "minmax", "low": 0.0, "high": 255.0},
                     metadata={"commitment": "ab" * 32, "training": {"steps": 3}})
    for k, v in changes.items():
        setattr(spec, k, v)
    return spec


def tiny_unet(seed: int = 0) -> SegmentationModel:
    torch.manual_seed(seed)
    spec = unet_spec()
    return SegmentationModel(build_network(spec), spec, device="cpu")


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(5, 1, 32, 32, generator=torch.Generator().manual_seed(1))


class Raw(torch.nn.Module):
    """A 1x1 conv to ``k`` channels: returns logits, not probabilities."""

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, k, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * 5.0


class HalfSize(torch.nn.Module):
    """Returns probabilities at half the input resolution: the wrong shape."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(torch.nn.functional.avg_pool2d(x, 2))
        return torch.cat([1.0 - p, p], dim=1)


class Boom:
    """Unpickling this would create ``marker``: proves a loader does not execute pickles."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# -- networks and heads --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SPECS))
def test_build_each_network_gives_probabilities(name, images):
    spec = SPECS[name]
    net = build_network(spec)
    assert isinstance(net, NETWORKS[name])
    assert sum(p.numel() for p in net.parameters()) <= 100_000
    model = SegmentationModel(net, spec, device="cpu")
    p = model(images)
    assert p.shape == (5, spec.num_classes, 32, 32) and p.dtype == torch.float32
    assert torch.allclose(p.sum(dim=1), torch.ones(5, 32, 32), atol=1e-5)
    assert p.min() >= 0 and p.max() <= 1
    assert model.num_classes == spec.num_classes and model.in_channels == 1


def test_numpy_input_and_result_usable_as_training_target(images):
    model = tiny_unet()
    p_np = model.probabilities(images.numpy().astype(np.float64))
    p = model(images)
    assert torch.allclose(p, p_np, atol=1e-6)
    assert not p.is_inference() and not p.requires_grad
    w = torch.ones(1, requires_grad=True)
    (p * w).sum().backward()  # an inference tensor would refuse this
    assert model.module.training  # probabilities() restores the module's mode


@pytest.mark.parametrize("shape", [(4, 2, 16, 16), (3, 3, 8, 8), (2, 3, 4, 8, 8)])
def test_class_map_is_argmax_over_classes(shape):
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(shape, generator=g), 1)
    first = (0,) * (len(shape) - 2)                    # one pixel (voxel)
    probs[(0, slice(None)) + first] = 1.0 / shape[1]   # a tie between all classes: argmax takes the first
    probs[(-1, slice(None)) + first] = torch.tensor([0.2] + [0.8 / (shape[1] - 1)] * (shape[1] - 1))
    labels = class_map(probs)
    assert labels.dtype == torch.long and labels.shape == probs[:, 0].shape
    assert torch.equal(labels, probs.argmax(1))
    assert labels[(0,) + first] == 0 and labels[(-1,) + first] == 1
    if len(shape) == 4:
        assert torch.equal(class_map(probs.contiguous(memory_format=torch.channels_last)), labels)


def test_forward_train_has_gradients(images):
    model = tiny_unet()
    p = model.forward_train(images[:2])
    assert p.shape == (2, 2, 32, 32) and p.requires_grad
    p[:, 1].mean().backward()
    assert all(q.grad is not None for q in model.module.parameters() if q.requires_grad)


def test_wrong_input_channels_is_input_error():
    with pytest.raises(InputError, match="1 input channel"):
        tiny_unet()(torch.rand(1, 3, 32, 32))
    with pytest.raises(InputError, match=r"\(B, C, H, W\)"):
        tiny_unet()(torch.rand(1, 32, 32))


def test_max_batch_chunking_matches_one_batch(images):
    model = tiny_unet()
    model.module.eval()
    whole = model(images)
    chunked = SegmentationModel(model.module, model.spec, device="cpu", max_batch=2)(images)
    assert torch.allclose(whole, chunked, atol=1e-6)


class OomAbove(torch.nn.Module):
    """Raises the CUDA out-of-memory error for batches larger than ``limit`` (cannot run a GPU here)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.conv = torch.nn.Conv2d(1, 2, 1)

    def forward(self, x):
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.conv(x)


def test_out_of_memory_halves_the_batch_then_gives_up(images):
    spec = ModelSpec(None, {}, head="softmax")
    model = SegmentationModel(OomAbove(2), spec, device="cpu", max_batch=8)
    reference = SegmentationModel(OomAbove(99), spec, device="cpu")
    reference.module.load_state_dict(model.module.state_dict())
    assert torch.allclose(model(images), reference(images), atol=1e-6)
    assert model._chunk == 2
    with pytest.raises(ResourceError, match="--batch-size.*--device cpu"):
        SegmentationModel(OomAbove(0), spec, device="cpu")(images)


# -- specs and building --------------------------------------------------------------------------------
def test_spec_json_round_trip_and_validation(tmp_path):
    spec = unet_spec()
    assert ModelSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec.to_json()))
    assert read_spec(path) == spec
    bad = [({**spec.to_json(), "head": "argmax"}, "head"),
           ({**spec.to_json(), "num_class": 2}, "unknown field"),
           ({**spec.to_json(), "in_channels": "1"}, "in_channels"),
           ({**spec.to_json(), "image_size": [32]}, "image_size"),
           ({"args": {}}, "missing field"),
           ([1, 2], "JSON object")]
    for d, msg in bad:
        with pytest.raises(ModelError, match=msg):
            ModelSpec.from_json(d)
    path.write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        read_spec(path)
    with pytest.raises(ModelError, match="not found"):
        read_spec(tmp_path / "nope.json")


def test_unknown_network_lists_known_ones():
    with pytest.raises(ModelError, match="unknown network 'ResNet'.*UNet.*BasicUNet.*SegResNet"):
        build_network(ModelSpec("ResNet", {}))


def test_wrong_args_name_network_and_problem():
    with pytest.raises(ModelError, match="UNet has no argument.*colors"):
        build_network(unet_spec(args={**UNET_ARGS, "colors": 3}))
    args = dict(UNET_ARGS)
    del args["channels"]
    with pytest.raises(ModelError, match="UNet needs argument.*channels"):
        build_network(unet_spec(args=args))
    with pytest.raises(ModelError, match="UNet could not be built"):
        build_network(unet_spec(args={**UNET_ARGS, "channels": [4], "strides": []}))
    with pytest.raises(ModelError, match="spatial_dims 2"):
        build_network(ModelSpec("BasicUNet", {"features": [4, 4, 8, 8, 16, 4]}))  # defaults to 3-D
    with pytest.raises(ModelError, match="num_classes"):
        build_network(unet_spec(num_classes=3))


# -- saving and loading ------------------------------------------------------------------------------
def test_state_dict_round_trip(tmp_path, images):
    model = tiny_unet()
    out = save_model(model, tmp_path / "model.pt", model.spec, fmt="state_dict")
    assert (tmp_path / "model.json").is_file()
    loaded = load_model(out, device="cpu")
    assert loaded.spec == model.spec and loaded.sha256 == file_sha256(out) and loaded.source == str(out)
    assert torch.equal(loaded(images), model(images))
    # an explicit spec path works too, with the file anywhere
    (tmp_path / "model.json").rename(tmp_path / "elsewhere.json")
    assert torch.equal(load_model(out, spec=tmp_path / "elsewhere.json", device="cpu")(images), model(images))


@pytest.mark.parametrize("key", ["state_dict", "model"])
def test_nested_state_dict_accepted(tmp_path, images, key):
    model = tiny_unet()
    torch.save({key: model.module.state_dict(), "epoch": 7}, tmp_path / "ckpt.pt")
    loaded = load_model(tmp_path / "ckpt.pt", spec=model.spec, device="cpu")
    assert torch.equal(loaded(images), model(images))


def test_torchscript_round_trip_is_a_black_box(tmp_path, images):
    model = tiny_unet()
    out = save_model(model, tmp_path / "model.ts", model.spec)
    loaded = load_model(out, device="cpu")
    assert isinstance(loaded.module, torch.jit.ScriptModule)
    p = loaded(images)
    assert torch.allclose(p, model(images), atol=1e-6)
    assert not p.is_inference()  # a pass-through head still hands back an ordinary tensor
    s = loaded.spec
    assert s.network is None and s.args == {} and s.head == "probabilities"
    assert s.metadata["commitment"] == model.spec.metadata["commitment"]
    assert s.metadata["training"] == {"steps": 3}
    assert s.metadata["source_network"] == {"network": "UNet", "args": UNET_ARGS, "head": "softmax"}
    assert s.image_size == [32, 32] and s.intensity == model.spec.intensity and s.num_classes == 2
    assert model.spec.network == "UNet"  # the caller's spec is not changed
    # saving the loaded black box again keeps the original network's description
    again = load_model(save_model(loaded, tmp_path / "again.ts", loaded.spec), device="cpu")
    assert again.spec.metadata["source_network"]["network"] == "UNet"


def test_torchscript_sigmoid_head_gives_two_classes(tmp_path, images):
    spec = SPECS["BasicUNet"]
    torch.manual_seed(0)
    model = SegmentationModel(build_network(spec), spec, device="cpu")
    loaded = load_model(save_model(model, tmp_path / "b.ts", spec), device="cpu")
    assert loaded.num_classes == 2
    assert torch.allclose(loaded(images), model(images), atol=1e-6)


def test_metadata_must_not_hold_seeds(tmp_path):
    model = tiny_unet()
    spec = unet_spec(metadata={"key": {"trigger_seed": 1}})
    with pytest.raises(ModelError, match="key.trigger_seed"):
        save_model(model, tmp_path / "m.ts", spec)
    assert not (tmp_path / "m.ts").exists()


def test_save_refuses_to_overwrite_its_input(tmp_path):
    model = tiny_unet()
    path = save_model(model, tmp_path / "model.pt", model.spec, fmt="state_dict")
    before = path.read_bytes()
    loaded = load_model(path, device="cpu")
    with pytest.raises(InputError, match="refusing"):
        save_model(loaded, path, loaded.spec, fmt="torchscript")
    with pytest.raises(InputError, match="refusing"):
        save_model(model.module, path, model.spec, fmt="state_dict", refuse=[path])
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.pt"]  # no temporary left


# -- untrusted and broken files ------------------------------------------------------------------------
def test_list_and_tensor_are_not_state_dicts(tmp_path):
    for name, obj in [("list.pt", [torch.zeros(2)]), ("tensor.pt", torch.zeros(2)),
                      ("mixed.pt", {"w": torch.zeros(2), "note": "hi"})]:
        torch.save(obj, tmp_path / name)
        with pytest.raises(ModelError, match="is not a state dict"):
            load_model(tmp_path / name, spec=unet_spec(), device="cpu")


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickled_object_is_refused_without_running_it(tmp_path, writer):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pt"
    if writer == "torch.save":
        torch.save({"state_dict": Boom(marker)}, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(Boom(marker), fh)
    with pytest.raises(ModelError, match="is not a state dict.*pickle of Python objects"):
        load_model(path, spec=unet_spec(), device="cpu")
    assert not marker.exists()
    # the proof is only meaningful if unpickling really would have created the marker
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(Boom(probe))).close()
    assert probe.exists()


def test_corrupt_files_are_model_errors(tmp_path):
    good = save_model(tiny_unet(), tmp_path / "good.pt", unet_spec(), fmt="state_dict")
    good_ts = save_model(tiny_unet(), tmp_path / "good.ts", unet_spec())
    cases = {
        "random.pt": np.random.default_rng(0).bytes(4096),
        "notes.pt": b"these are not weights\n" * 20,
        "empty.pt": b"",
        "cut.pt": good.read_bytes()[:2000],
        "cut.ts": good_ts.read_bytes()[:3000],
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ModelError) as info:
            load_model(path, spec=unet_spec(), device="cpu")
        assert str(path) in str(info.value)
        assert "TorchScript file or a PyTorch state dict" in str(info.value), name
    assert re.search("truncated or corrupt zip", str(pytest.raises(ModelError, load_model, tmp_path / "cut.pt",
                                                                   spec=unet_spec(), device="cpu").value))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ModelError, match="not found.*nope.pt"):
        load_model(tmp_path / "nope.pt", device="cpu")
    with pytest.raises(ModelError, match="is a directory"):
        load_model(tmp_path, device="cpu")


def test_mismatched_keys_are_listed(tmp_path):
    sd = tiny_unet().module.state_dict()
    first = next(iter(sd))
    sd["extra.weight"] = sd.pop(first)
    torch.save(sd, tmp_path / "m.pt")
    with pytest.raises(ModelError, match=rf"1 missing \(e.g. {re.escape(first)}\).*1 unexpected \(e.g. extra.weight\)"):
        load_model(tmp_path / "m.pt", spec=unet_spec(), device="cpu")
    other = unet_spec(args={**UNET_ARGS, "channels": [8, 8, 16]})
    torch.save(build_network(other).state_dict(), tmp_path / "wide.pt")
    with pytest.raises(ModelError, match="of another shape"):
        load_model(tmp_path / "wide.pt", spec=unet_spec(), device="cpu")


def test_state_dict_without_spec_explains_spec(tmp_path):
    torch.save(tiny_unet().module.state_dict(), tmp_path / "m.pt")
    with pytest.raises(ModelError, match="--spec.*m.json"):
        load_model(tmp_path / "m.pt", device="cpu")


def test_torchscript_wrong_shape_names_shapes(tmp_path):
    torch.jit.save(torch.jit.script(HalfSize()), str(tmp_path / "half.ts"))
    model = load_model(tmp_path / "half.ts", device="cpu")
    with pytest.raises(ModelError, match=r"returned shape \(2, 2, 16, 16\) for input shape \(2, 1, 32, 32\)"):
        model(torch.rand(2, 1, 32, 32))


def test_logits_are_refused_unless_declared(tmp_path, images):
    torch.manual_seed(0)
    net = Raw(3)
    torch.jit.save(torch.jit.script(net), str(tmp_path / "raw.ts"))
    model = load_model(tmp_path / "raw.ts", device="cpu")
    assert model.spec.head == "probabilities" and not model.spec_known
    with pytest.raises(ModelError, match=r"channel sums range .*--logits"):
        model(images)
    as_logits = load_model(tmp_path / "raw.ts", device="cpu", logits=True)
    p = as_logits(images)
    assert p.shape == (5, 3, 32, 32) and as_logits.num_classes == 3  # K learnt from the first answer
    assert torch.allclose(p, torch.softmax(net(images), dim=1), atol=1e-6)
    # a black box saved from it applies the softmax inside
    saved = load_model(save_model(as_logits, tmp_path / "box.ts", as_logits.spec), device="cpu")
    assert torch.allclose(saved(images), p, atol=1e-6)


# -- devices and hashes --------------------------------------------------------------------------------
def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    with pytest.raises(InputError, match="unknown device"):
        resolve_device("gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu_is_resource_error():
    with pytest.raises(ResourceError, match="--device cpu"):
        resolve_device("cuda")
    with pytest.raises(ResourceError):
        SegmentationModel(Raw(2), ModelSpec(None, {}), device="cuda:0")


def test_describe_device():
    assert re.fullmatch(r"cpu \(\d+ threads\)", describe_device("cpu"))
    if torch.cuda.is_available():
        assert re.fullmatch(r"cuda:\d+ \(.+, [\d.]+ GiB\)", describe_device("cuda"))


def test_file_sha256(tmp_path):
    path = tmp_path / "f.bin"
    data = np.random.default_rng(1).bytes(3 << 20)
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()


def test_torchscript_file_is_detected_by_its_content(tmp_path):
    path = save_model(tiny_unet(), tmp_path / "weights.pt", unet_spec())  # TorchScript despite the name
    names = zipfile.ZipFile(path).namelist()
    assert any(n.endswith("/constants.pkl") for n in names)
    assert isinstance(load_model(path, device="cpu").module, torch.jit.ScriptModule)


class VarArgs(torch.nn.Module):
    """``*inputs`` cannot be scripted, so save_model falls back to tracing."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, *inputs):
        return self.conv(inputs[0])


def test_unscriptable_module_is_traced(tmp_path, images):
    torch.manual_seed(0)
    net = VarArgs()
    spec = ModelSpec(None, {}, head="softmax", image_size=[32, 32])
    with pytest.raises(Exception):
        torch.jit.script(net)
    loaded = load_model(save_model(net, tmp_path / "traced.ts", spec), device="cpu")
    assert torch.allclose(loaded(images), torch.softmax(net(images), dim=1), atol=1e-6)


def test_model_failure_is_model_error_with_shape():
    with pytest.raises(ModelError, match=r"failed on input of shape \(1, 1, 30, 30\)"):
        tiny_unet()(torch.rand(1, 1, 30, 30))
