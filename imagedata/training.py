"""Training utilities shared by MDA and GLAM: checkpoints, resume, seeding, torchrun/DDP helpers.

Checkpoints hold model / optimizer / scheduler (/ grad scaler) state, a :class:`TrainState` (epoch,
step, best metric, free-form extra) and every RNG state (python, numpy, torch CPU and CUDA). They
are written to a temporary file in the same folder and renamed (``os.replace``), so a crash never
leaves a half-written checkpoint. DDP: :func:`setup_distributed` reads torchrun's ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``) and initialises the process
group (nccl on GPU, gloo on CPU); without them it returns a single-process world.
"""
from __future__ import annotations

import logging
import os
import pickle
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler, RandomSampler, Sampler, SequentialSampler

from asmk_index.persistence import atomic_file


logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT_VERSION = 2   # 2: RNG states, config and train state in weights_only-safe types
_UNSAFE_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")   # how torch names a global it refused


@dataclass
class TrainState:
    """Progress of a training run (what resume needs besides module states)."""

    epoch: int = 0            # epochs completed
    step: int = 0             # optimizer steps taken
    best_metric: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel wrappers."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def rng_state() -> dict[str, Any]:
    """Every RNG state (python, numpy, torch CPU, all CUDA devices), in types that
    ``torch.load(weights_only=True)`` reads: tuples of ints, plain dicts and tensors."""
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {"bit_generator": numpy_state["bit_generator"],
                  "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                  "pos": int(numpy_state["state"]["pos"]),
                  "has_gauss": int(numpy_state["has_gauss"]), "gauss": float(numpy_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state(state: Any) -> Any:
    """numpy's legacy RNG state from :func:`rng_state`'s dict (or a ``np.random.get_state()`` tuple)."""
    if not isinstance(state, dict):
        return state
    key = state["key"]
    key = key.numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
    return (state["bit_generator"], key.astype(np.uint32), int(state["pos"]), int(state["has_gauss"]),
            float(state["gauss"]))


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    np.random.set_state(_numpy_state(state["numpy"]))
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


_PLAIN_SCALARS = (str, int, float, bool, type(None))


def _plain(value: Any, where: str) -> Any:
    """``value`` with numpy scalars/arrays and paths made plain (ints, floats, str, tensors), so
    ``torch.load(weights_only=True)`` reads it back; anything else raises TypeError naming ``where``."""
    if isinstance(value, np.generic):              # before the plain types: np.float64 is a float
        return value.item()
    if isinstance(value, _PLAIN_SCALARS) or isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        return {_plain(k, f"{where} key"): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(f"checkpoint {where} holds a {type(value).__name__}; store plain values (numbers, "
                    f"strings, lists, dicts, tensors) so the checkpoint loads without running code")


def save_checkpoint(path: str | os.PathLike, *, model: nn.Module, state: TrainState,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any | None = None,
                    scaler: Any | None = None, config: dict[str, Any] | None = None) -> Path:
    """Atomically write a checkpoint (temp file in the same folder + os.replace). Returns the path.

    ``config``: JSON-able model/training configuration stored alongside (for rebuilding the model).
    Everything is stored in types that ``torch.load(weights_only=True)`` reads (numpy scalars and
    paths in ``config`` / ``state.extra`` become plain values; other objects raise TypeError).
    Only call on the main process under DDP (see :func:`is_main_process`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "train_state": _plain(asdict(state), "train state"),
        "rng": rng_state(),
        "config": _plain(config, "config"),
    }
    with atomic_file(path) as temporary:
        torch.save(payload, temporary)
    return path


def load_checkpoint(path: str | os.PathLike, *, model: nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any | None = None,
                    scaler: Any | None = None, map_location: str | torch.device = "cpu",
                    restore_rng: bool = True, strict: bool = True) -> tuple[TrainState, dict[str, Any]]:
    """Restore what :func:`save_checkpoint` wrote into the given objects.

    The file is read with ``torch.load(weights_only=True)``: tensors and plain containers only, so
    a checkpoint that holds any other object (one written before format version 2, or a crafted
    file) is refused with a ValueError naming the object, and no code in it runs.

    Returns ``(TrainState, checkpoint dict)`` (the dict also holds 'config'). Raises
    FileNotFoundError for a missing file and ValueError for a file that is not our checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        refused = _UNSAFE_GLOBAL.search(str(error))
        what = f"the object {refused.group(1)}" if refused else "an object"
        raise ValueError(
            f"{path}: refused to load the checkpoint: it holds {what}, which only a full unpickle "
            f"(that can run code) would read. Checkpoints written by save_checkpoint since format "
            f"version {CHECKPOINT_FORMAT_VERSION} hold tensors and plain values only; an older "
            f"checkpoint cannot be resumed safely: start the run again in a new directory") from None
    except Exception as error:
        raise ValueError(f"cannot read checkpoint {path}: {error}") from None
    if not isinstance(checkpoint, dict) or "train_state" not in checkpoint or "model" not in checkpoint:
        raise ValueError(f"{path} is not a training checkpoint written by save_checkpoint")
    version = checkpoint.get("format_version")
    if version != CHECKPOINT_FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format version {version}, this code reads "
                         f"{CHECKPOINT_FORMAT_VERSION}; start the run again in a new directory")
    if model is not None:
        unwrap_model(model).load_state_dict(checkpoint["model"], strict=strict)
    for target, key in ((optimizer, "optimizer"), (scheduler, "scheduler"), (scaler, "scaler")):
        if target is not None:
            if checkpoint.get(key) is None:
                raise ValueError(f"{path} holds no {key} state to restore")
            target.load_state_dict(checkpoint[key])
    if restore_rng and checkpoint.get("rng") is not None:
        set_rng_state(checkpoint["rng"])
    return TrainState(**checkpoint["train_state"]), checkpoint


def seed_everything(seed: int, *, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (all devices); ``deterministic`` also asks cuDNN for determinism."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed python/numpy in each worker from torch's per-worker seed."""
    seed = torch.initial_seed() % (2**32)
    random.seed(seed)
    np.random.seed(seed)


@dataclass
class DistributedInfo:
    """Where this process sits in the (possibly single-process) world."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(backend: str | None = None, *, device: str | torch.device | None = None) -> DistributedInfo:
    """Initialise torch.distributed from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK).

    backend: None = nccl when CUDA is available, else gloo. Without WORLD_SIZE > 1 (plain python),
    nothing is initialised and a single-process :class:`DistributedInfo` is returned.
    device: None or "auto" (a GPU when there is one), "cpu", "cuda" or "cuda:N"
    (:func:`imagedata.extraction.resolve_device`: a GPU asked for and missing is a ValueError); a
    plain "cuda" is ``cuda:LOCAL_RANK``, one GPU per process.
    """
    from .extraction import resolve_device

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device)
    if device.type == "cuda" and device.index is None:
        device = resolve_device(f"cuda:{local_rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size <= 1:
        return DistributedInfo(0, 1, 0, device, None)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    logger.info("distributed: rank %d/%d (local %d) on %s via %s", rank, world_size, local_rank, device, backend)
    return DistributedInfo(rank, world_size, local_rank, device, backend)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """True on rank 0 or when not distributed."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def wrap_ddp(model: nn.Module, info: DistributedInfo | None = None, **ddp_kwargs: Any) -> nn.Module:
    """Move ``model`` to the process's device and wrap it in DDP when the world has > 1 process."""
    info = info or DistributedInfo()
    model = model.to(info.device)
    if not info.is_distributed:
        return model
    if info.device.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [info.device.index])
        ddp_kwargs.setdefault("output_device", info.device.index)
    return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)


def make_sampler(dataset: Dataset, info: DistributedInfo | None = None, *, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False) -> Sampler:
    """DistributedSampler in a multi-process world, else a Random/Sequential sampler.

    With a DistributedSampler call ``sampler.set_epoch(epoch)`` each epoch (:func:`set_sampler_epoch`).
    """
    info = info or DistributedInfo()
    if info.is_distributed:
        return DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=shuffle,
                                  seed=seed, drop_last=drop_last)
    if shuffle:
        return RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    return SequentialSampler(dataset)


def set_sampler_epoch(sampler: Sampler, epoch: int) -> None:
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Average a tensor over processes (identity when not distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value
