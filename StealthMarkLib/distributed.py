"""Distributed embedding: ``torchrun --nproc_per_node=K -m StealthMarkLib.cli embed ...`` (README
"Distributed embedding").

- torchrun is detected from its environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``). Without it, or with
  ``WORLD_SIZE=1``, every function here is a no-op and embedding is the single-process path, unchanged.
- Backend ``nccl`` when the device is CUDA (each rank uses ``cuda:LOCAL_RANK``), ``gloo`` on the CPU.
- Data parallel with K times the batch: every rank draws its own full batch of the configured sizes from
  its own random stream (derived from the embedding config's seed and the rank), so K ranks train on a
  global batch of K x ``clean_batch`` clean and K x ``trigger_batch`` trigger images per step.
- Gradients are averaged with one ``all_reduce`` per step after ``loss.backward()``, for ``nn.Module`` and
  TorchScript models alike (no DistributedDataParallel wrapper, which TorchScript modules do not take).
  Every rank starts from rank 0's weights (broadcast) and applies the same averaged gradient with the same
  optimizer, so the ranks' weights stay identical; this is checked at the end by hashing every rank's weights.
- Only rank 0 computes the harmlessness figures, writes files and reports; the others stay quiet.

This module imports torch only when a function needs it, so that ``stealthmark --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import numpy as np

from .errors import InputError, ResourceError

ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
TIMEOUT = timedelta(minutes=30)   # a rank waiting for the others (a failed rank is noticed much sooner)


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise InputError(f"WORLD_SIZE is set but {name} is not: start distributed embedding with torchrun, "
                             "e.g. torchrun --nproc_per_node=2 -m StealthMarkLib.cli embed ...")
        return default
    try:
        return int(value)
    except ValueError:
        raise InputError(f"environment variable {name}={value!r} is not a number") from None


def launched_world_size() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return max(1, _env_int("WORLD_SIZE", 1))


def launched_rank() -> int:
    """This process's rank under torchrun (0 without it)."""
    return _env_int("RANK") if launched_world_size() > 1 else 0


def active() -> bool:
    """True inside an initialised process group of more than one process."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if active() else 0


@dataclass
class DistInfo:
    """One rank of a distributed run (never holds secrets)."""

    world_size: int
    rank: int
    local_rank: int
    backend: str
    device: Any   # torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def to_json(self) -> dict:
        return {"world_size": self.world_size, "backend": self.backend}


def rank_device(device: Any, local_rank: int) -> Any:
    """The device of one rank: the CPU, or ``cuda:LOCAL_RANK`` (auto picks CUDA when there is a GPU)."""
    import torch

    from .models import _cuda_available, resolve_device

    name = str(device if device is not None else "auto").strip().lower()
    if name == "cpu" or (name == "auto" and not _cuda_available()):
        return torch.device("cpu")
    if name not in ("auto", "cuda"):
        asked = resolve_device(name)
        if asked.type != "cuda" or asked.index != local_rank:
            raise InputError(f"under torchrun each rank uses its own GPU (cuda:LOCAL_RANK, here cuda:{local_rank}): "
                             f"pass --device cuda, auto or cpu, not {device!r}")
    return resolve_device(f"cuda:{local_rank}")


@contextlib.contextmanager
def session(device: Any = "auto") -> Iterator[DistInfo | None]:
    """Yield None outside torchrun. Under torchrun, start the process group (nccl on CUDA, gloo on the CPU),
    yield this rank's :class:`DistInfo`, and end the group on the way out, on success or failure. A process
    group the caller started already is used as it is, and left running."""
    world = launched_world_size()
    if world <= 1:
        yield None
        return
    import torch
    import torch.distributed as dist

    rank_, local = _env_int("RANK"), _env_int("LOCAL_RANK")
    dev = rank_device(device, local)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dist.is_available() and dist.is_initialized():
        yield DistInfo(dist.get_world_size(), dist.get_rank(), local, dist.get_backend(), dev)
        return
    if not dist.is_available():
        raise ResourceError("this torch build has no torch.distributed: run embed as one process")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    try:
        dist.init_process_group(backend, init_method="env://", rank=rank_, world_size=world, timeout=TIMEOUT,
                                **({"device_id": dev} if backend == "nccl" else {}))
    except Exception as exc:  # noqa: BLE001 - a rendezvous or backend failure, reported in one line
        raise ResourceError(f"cannot start distributed embedding (rank {rank_} of {world}, backend {backend}): "
                            f"{_short(exc)}; start it with torchrun, e.g. torchrun --nproc_per_node=2 "
                            "-m StealthMarkLib.cli embed ...") from None
    try:
        yield DistInfo(world, rank_, local, backend, dev)
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _collective(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a collective; a lost peer (a rank that failed or was stopped) becomes one clear error."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as exc:
        raise ResourceError(f"distributed embedding: rank {rank()} lost contact with the other ranks (one of them "
                            f"probably failed: see its message): {_short(exc)}; nothing was written") from None


# -- hooks of the fine-tuning loop (embed.py); no-ops in one process ------------------------------------------
def rank_rng(seed: int) -> np.random.Generator:
    """``np.random.default_rng(seed)`` in one process; under torchrun, each rank's own stream of that seed."""
    if not active():
        return np.random.default_rng(seed)
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(rank(),)))


def rank_seed(seed: int) -> int:
    """The torch seed: ``seed`` in one process, a per-rank seed derived from it under torchrun."""
    if not active():
        return seed
    return int(np.random.SeedSequence(seed, spawn_key=(rank(),)).generate_state(1)[0])


def broadcast_module(module: Any) -> None:
    """Give every rank rank 0's parameters and buffers."""
    if not active():
        return
    import torch.distributed as dist

    for t in [*module.parameters(), *module.buffers()]:
        _collective(dist.broadcast, t.data, 0)


def sync_gradients(module: Any) -> None:
    """Average the gradients over the ranks, in one ``all_reduce`` per dtype; call after ``loss.backward()``."""
    if not active():
        return
    import torch
    import torch.distributed as dist

    world = dist.get_world_size()
    groups: dict[Any, list] = {}
    for p in module.parameters():
        if p.requires_grad:
            groups.setdefault(p.dtype, []).append(p)
    for params in groups.values():
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        _collective(dist.all_reduce, flat)
        flat /= world
        offset = 0
        for p in params:
            mean = flat[offset:offset + p.numel()].view_as(p)
            if p.grad is None:
                p.grad = mean.clone()
            else:
                p.grad.copy_(mean)
            offset += p.numel()


def mean_over_ranks(*values: float) -> tuple[float, ...]:
    """The mean of each value over the ranks (the values themselves in one process)."""
    if not active():
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    _collective(dist.all_reduce, t)
    return tuple(float(v) / dist.get_world_size() for v in t.cpu())


def weights_sha256(module: Any) -> str:
    """SHA-256 of a module's state dict, or of a state dict (names, dtypes, shapes and values): equal weights,
    equal hash."""
    import torch

    h = hashlib.sha256()
    state = module.state_dict() if hasattr(module, "state_dict") else module
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def agree_on_weights(module: Any) -> list[str]:
    """Every rank's weight hash, in rank order; returns once every rank has finished training (a barrier).
    Raises if the ranks' weights differ (a bug: nothing is then written)."""
    import torch.distributed as dist

    mine = weights_sha256(module)
    if not active():
        return [mine]
    hashes: list[Any] = [None] * dist.get_world_size()
    _collective(dist.all_gather_object, hashes, mine)
    _collective(dist.barrier)
    if len(set(hashes)) != 1:
        raise ResourceError(f"distributed embedding: the ranks' weights differ ({len(set(hashes))} versions): "
                            "nothing was written; please report this as a bug")
    return hashes
