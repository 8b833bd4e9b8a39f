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
import random
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

CHECKPOINT_FORMAT_VERSION = 1


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
    """Every RNG state (python, numpy, torch CPU, all CUDA devices)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def save_checkpoint(path: str | os.PathLike, *, model: nn.Module, state: TrainState,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any | None = None,
                    scaler: Any | None = None, config: dict[str, Any] | None = None) -> Path:
    """Atomically write a checkpoint (temp file in the same folder + os.replace). Returns the path.

    ``config``: JSON-able model/training configuration stored alongside (for rebuilding the model).
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
        "train_state": asdict(state),
        "rng": rng_state(),
        "config": config,
    }
    with atomic_file(path) as temporary:
        torch.save(payload, temporary)
    return path


def load_checkpoint(path: str | os.PathLike, *, model: nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any | None = None,
                    scaler: Any | None = None, map_location: str | torch.device = "cpu",
                    restore_rng: bool = True, strict: bool = True) -> tuple[TrainState, dict[str, Any]]:
    """Restore what :func:`save_checkpoint` wrote into the given objects.

    Returns ``(TrainState, checkpoint dict)`` (the dict also holds 'config'). Raises
    FileNotFoundError for a missing file and ValueError for a file that is not our checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:
        raise ValueError(f"cannot read checkpoint {path}: {error}") from None
    if not isinstance(checkpoint, dict) or "train_state" not in checkpoint or "model" not in checkpoint:
        raise ValueError(f"{path} is not a training checkpoint written by save_checkpoint")
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
    nothing is initialised and a single-process :class:`DistributedInfo` is returned. On GPU the
    process uses ``cuda:LOCAL_RANK``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    if device is None:
        device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    device = torch.device(device)
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
