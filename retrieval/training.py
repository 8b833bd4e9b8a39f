"""One trainer for the retrieval model: the global head, the local head, or both at once.

Every batch holds pairs of images of one class each (no class twice in a batch): two photos of a
labelled class (one photo twice when it is alone in its class), or one unlabelled photo twice; the
two sides are augmented independently (kornia). The losses (``SystemConfig.train``):

* global head: ArcFace on the GLAM descriptors (labelled data), or the contrastive loss of each
  pair and of every descriptor's hardest in-batch negative (``glam.losses.paired_contrastive_loss``;
  on unlabelled data it is the two-view loss);
* local head: MDA's contrastive loss per head on the attention-pooled descriptors with hardest
  in-batch negatives (``mda.functional.head_descriptor_loss``) plus ``diversity_weight`` x the
  Hellinger diversity penalty of the attention maps;
* total = ``global_weight`` x global + ``local_weight`` x local.

The backbone is frozen (``trainable_stages: 0``), partly trainable (its last stages) or fully
trainable (null). With a frozen backbone and ``cache_backbone``, its maps of ``views_per_image``
augmented views of every image are computed once (``RUN/backbone_cache/``, reused by a resumed or
repeated run) and the heads train on them: minutes on a CPU.

Checkpoints (``RUN/checkpoint.pt``, :mod:`imagedata.training`) hold the model, the ArcFace weights,
optimizer, scheduler and grad scaler states, every RNG state, the epoch's batch order and how many
of its batches are done; they are written atomically every ``checkpoint_every`` steps and at each
epoch end, and rerunning the same command resumes exactly where the run stopped. Under
``torchrun`` the model is wrapped in DDP, each process takes every world-size-th batch of the
epoch's order, and only rank 0 writes. The result is one model file, ``RUN/model.pt``
(:meth:`retrieval.network.RetrievalNet.save`), for ``build_codebook.py --model``.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import logging
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from glam.losses import ArcFaceLoss, paired_contrastive_loss
from imagedata.augment import AugmentConfig, build_augmentation
from imagedata.datasets import LabelledImageList, TrainImageConfig, load_train_image
from imagedata.images import ImageLoadError
from imagedata.training import (DistributedInfo, TrainState, barrier, load_checkpoint, save_checkpoint,
                                seed_everything, setup_distributed, wrap_ddp)
from mda import functional as MF

from .config import TrainConfig
from .network import LevelOutput, RetrievalNet

logger = logging.getLogger(__name__)

CHECKPOINT_FILE, MODEL_FILE, CACHE_DIR = "checkpoint.pt", "model.pt", "backbone_cache"
CACHE_COMPLETE = "complete"


# ---------------------------------------------------------------------- data
@dataclass
class TrainingImages:
    """The training photos and the class of each (unlabelled: every photo its own class)."""
    paths: list[Path]
    labels: np.ndarray
    unlabelled: bool

    @classmethod
    def from_list(cls, images: LabelledImageList) -> "TrainingImages":
        """Labelled photos of a list (unlabelled ones dropped), or, when none is labelled, all."""
        labelled = images.labels >= 0
        if labelled.any():
            keep = np.flatnonzero(labelled)
            if len(keep) < len(images):
                logger.info("training on the %d labelled images of %d", len(keep), len(images))
            return cls([images.paths[i] for i in keep], images.labels[keep], unlabelled=False)
        return cls(list(images.paths), np.arange(len(images), dtype=np.int64), unlabelled=True)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if len(self.labels) else 0


def epoch_batches(labels: np.ndarray, pairs_per_batch: int, *, seed: int, epoch: int) -> list[list[int]]:
    """This epoch's batches, each a flat list ``[a1, p1, a2, p2, ...]`` of image positions: every
    image is the anchor of one pair, its positive another image of its class (itself when alone);
    no class appears twice in a batch. Each batch takes a pair from each of the classes with the
    most pairs left (random among equals), so as few pairs as possible are left over (pairs of one
    class alone at the end cannot form a batch); the batches come in random order. Deterministic
    in (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    members: dict[int, list[int]] = defaultdict(list)
    for position, label in enumerate(labels.tolist()):
        members[label].append(position)
    pairs: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for anchor in rng.permutation(len(labels)).tolist():
        label = int(labels[anchor])
        mates = [m for m in members[label] if m != anchor]
        pairs[label].append((anchor, int(rng.choice(mates)) if mates else anchor))
    tie_break = rng.permutation(len(pairs))
    heap = [(-len(queue), int(tie), label) for (label, queue), tie in zip(pairs.items(), tie_break)]
    heapq.heapify(heap)
    batches: list[list[int]] = []
    while len(heap) >= 2:
        chosen = [heapq.heappop(heap) for _ in range(min(pairs_per_batch, len(heap)))]
        batches.append([i for _, _, label in chosen for i in pairs[label].pop()])
        for left, tie, label in chosen:
            if left + 1 < 0:
                heapq.heappush(heap, (left + 1, tie, label))
    return [batches[i] for i in rng.permutation(len(batches))]


class _PhotoItems(Dataset):
    """Loads training photo i -> (i, (3, S, S) float in [0, 1] or None when it cannot be read)."""

    def __init__(self, paths: Sequence[Path], size: int):
        self.paths = list(paths)
        self.config = TrainImageConfig(size=size, square=True)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None]:
        try:
            return index, load_train_image(self.paths[index], self.config)
        except ImageLoadError as error:
            logger.warning("skipping training image: %s", error)
            return index, None


def _collate_pairs(items: list[tuple[int, torch.Tensor | None]]) -> dict[str, Any]:
    """Pairs of loaded items -> {"indices": (2P,) anchors then positives, "images": (2P, 3, S, S)};
    a pair with an unreadable photo is dropped."""
    pairs = [(items[k], items[k + 1]) for k in range(0, len(items), 2)
             if items[k][1] is not None and items[k + 1][1] is not None]
    ordered = [a for a, _ in pairs] + [p for _, p in pairs]
    return {"indices": torch.tensor([index for index, _ in ordered], dtype=torch.int64),
            "images": torch.stack([image for _, image in ordered]) if ordered else torch.zeros(0)}


# ---------------------------------------------------------------------- the backbone cache
class BackboneCache:
    """The frozen backbone's maps of ``views`` views of every training photo (view 0 the photo
    itself, the others augmented), float16 on disk, memory-mapped: ``RUN/backbone_cache/<key>/``."""

    def __init__(self, directory: Path, taps: dict[str, np.ndarray], valid: np.ndarray):
        self.directory = directory
        self.taps = taps                  # tap -> (n, views, C, h, w) float16
        self.valid = valid                # (n,) bool: the photo could be read

    @property
    def views(self) -> int:
        return next(iter(self.taps.values())).shape[1]

    @staticmethod
    def key(net: RetrievalNet, paths: Sequence[Path], config: TrainConfig) -> str:
        digest = hashlib.sha256()
        for name, tensor in sorted(net.backbone.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        digest.update(json.dumps({"paths": [os.path.abspath(p) for p in paths], "size": config.image_size,
                                  "views": config.views_per_image, "seed": config.seed}).encode())
        return digest.hexdigest()[:20]

    @classmethod
    def open_or_build(cls, root: Path, net: RetrievalNet, images: TrainingImages, config: TrainConfig, *,
                      info: DistributedInfo, progress: bool) -> "BackboneCache":
        """The cache of these photos and settings: read when complete, else built (by rank 0)."""
        directory = root / cls.key(net, images.paths, config)
        if info.is_main and not (directory / CACHE_COMPLETE).is_file():
            cls._build(directory, net, images, config, progress=progress)
        barrier()
        taps = {tap: np.load(directory / f"{tap}.npy", mmap_mode="r") for tap in net.backbone.tap_channels}
        return cls(directory, taps, np.load(directory / "valid.npy"))

    @staticmethod
    @torch.no_grad()
    def _build(directory: Path, net: RetrievalNet, images: TrainingImages, config: TrainConfig, *,
               progress: bool) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        augment = build_augmentation(AugmentConfig(output_size=config.image_size)).to(net.device)
        generator_state = torch.get_rng_state()
        torch.manual_seed(config.seed)
        loader = DataLoader(_PhotoItems(images.paths, config.image_size), batch_size=None,
                            num_workers=config.num_workers)
        arrays: dict[str, np.ndarray] = {}
        valid = np.zeros(len(images), bool)
        was_training = net.training
        net.eval()
        bar = _progress_bar(len(images), "backbone cache", progress)
        try:
            for index, image in loader:
                bar.update(1)
                if image is None:
                    continue
                image = image.unsqueeze(0).to(net.device)
                views = torch.cat([image] + [augment(image).clamp(0, 1) for _ in range(config.views_per_image - 1)])
                for tap, maps in net.backbone.forward_taps(views).items():
                    if tap not in arrays:
                        arrays[tap] = np.lib.format.open_memmap(
                            directory / f"{tap}.npy", mode="w+", dtype=np.float16,
                            shape=(len(images), config.views_per_image) + tuple(maps.shape[1:]))
                    arrays[tap][index] = maps.cpu().numpy().astype(np.float16)
                valid[index] = True
        finally:
            bar.close()
            net.train(was_training)
            torch.set_rng_state(generator_state)
        if not valid.any():
            raise ValueError("no training photo could be read")
        for array in arrays.values():
            array.flush()
        np.save(directory / "valid.npy", valid)
        (directory / CACHE_COMPLETE).write_text("ok\n")

    def maps(self, indices: np.ndarray, views: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
        """Float32 maps {tap: (len(indices), C, h, w)} of the given photos' given views."""
        order = np.argsort(indices, kind="stable")  # sorted reads from the memory map
        inverse = np.argsort(order)
        return {tap: torch.from_numpy(np.asarray(array[indices[order], views[order]])[inverse]).to(device).float()
                for tap, array in self.taps.items()}


def pick_views(indices: np.ndarray, views: int, rng: np.random.Generator) -> np.ndarray:
    """A view per image of a batch (anchors then positives): random, but the two sides of a
    pair of one photo get different views (when there are at least two)."""
    count = len(indices) // 2
    chosen = rng.integers(0, views, size=len(indices))
    if views > 1:
        same = indices[:count] == indices[count:]
        shift = rng.integers(1, views, size=count)
        chosen[count:] = np.where(same, (chosen[:count] + shift) % views, chosen[count:])
    return chosen


# ---------------------------------------------------------------------- model + losses
class TrainingModule(nn.Module):
    """The retrieval model and the ArcFace class weights in one module (so DDP synchronises both);
    ``forward`` returns the loss and its parts."""

    def __init__(self, net: RetrievalNet, config: TrainConfig, num_classes: int, global_loss: str):
        super().__init__()
        self.net = net
        self.config = config
        self.global_loss = global_loss
        self.arcface = (ArcFaceLoss(net.global_dim, num_classes, config.arcface_scale, config.arcface_margin)
                        if global_loss == "arcface" else None)

    def forward(self, inputs: torch.Tensor | dict[str, torch.Tensor], labels: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, float]]:
        """inputs: images (2P, 3, S, S) or backbone maps {tap: (2P, C, h, w)}, anchors then
        positives; labels: (P,) the class of each pair."""
        output = self.net.heads(inputs) if isinstance(inputs, dict) else self.net(inputs)
        return pair_losses(output, labels, self.config, self.global_loss, self.arcface)


def pair_losses(output: LevelOutput, labels: torch.Tensor, config: TrainConfig, global_loss: str,
                arcface: ArcFaceLoss | None) -> tuple[torch.Tensor, dict[str, float]]:
    """The total loss of a batch of pairs (see the module docstring) and its parts."""
    count = labels.shape[0]
    total = torch.zeros((), device=labels.device)
    parts: dict[str, float] = {}
    if global_loss != "none":
        descriptors = output.global_descriptor.float()
        if global_loss == "arcface":
            loss = arcface(descriptors, torch.cat([labels, labels]))
        else:
            loss = paired_contrastive_loss(descriptors[:count], descriptors[count:], labels, config.global_margin)
        total = total + config.global_weight * loss
        parts["global"] = float(loss.detach())
    if config.local_loss != "none":
        heads = output.head_descriptors().float()
        contrastive = MF.head_descriptor_loss(heads[:count], heads[count:], labels, config.local_margin)
        diversity = MF.diversity_penalty(output.attention.float())
        total = total + config.local_weight * (contrastive + config.diversity_weight * diversity)
        parts["local"] = float(contrastive.detach())
        parts["diversity"] = float(diversity.detach())
    return total, parts


def resolved_global_loss(config: TrainConfig, images: TrainingImages) -> str:
    if config.global_loss == "auto":
        return "contrastive" if images.unlabelled else "arcface"
    if config.global_loss == "arcface" and images.unlabelled:
        raise ValueError("train.global_loss 'arcface' needs labelled images (classes); use 'contrastive' "
                         "for an unlabelled folder")
    return config.global_loss


def all_ranks_agree(flag: bool, info: DistributedInfo) -> bool:
    """``flag`` and-ed over the processes (each must take the same number of optimiser steps)."""
    if not info.is_distributed:
        return flag
    value = torch.tensor(int(flag), device=info.device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value.item())


def _lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up, then cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _progress_bar(total: int, description: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=description, unit="step" if "epoch" in description else "img",
                dynamic_ncols=True, disable=not enabled)


# ---------------------------------------------------------------------- the trainer
@dataclass
class TrainResult:
    model_path: Path
    model_sha256: str
    epochs: int
    steps: int
    losses: list[float] = field(default_factory=list)   # total loss of every step run in this call


class Trainer:
    """One training run of a retrieval model (see the module docstring).

    net: the model to train (a new one fitted to the images, or a trained one to continue);
    images: the training photos; run_dir: checkpoint, backbone cache and the final model.pt.
    """

    def __init__(self, net: RetrievalNet, images: TrainingImages, config: TrainConfig,
                 run_dir: str | os.PathLike, *, device: str | None = None, progress: bool = True,
                 info: DistributedInfo | None = None):
        if len(images) < 2:
            raise ValueError(f"training needs at least 2 photos, got {len(images)}")
        if len(np.unique(images.labels)) < 2:
            raise ValueError("training needs photos of at least 2 classes (in-batch negatives)")
        self.config = config
        self.images = images
        self.run_dir = Path(run_dir)
        self.info = info or setup_distributed(device=device)
        self.progress = progress and self.info.is_main
        seed_everything(config.seed + self.info.rank)
        self.global_loss = resolved_global_loss(config, images)
        net.backbone.set_trainable_stages(config.trainable_stages)
        for head, loss in ((net.global_head, self.global_loss), (net.local_head, config.local_loss)):
            head.requires_grad_(loss != "none")
        self.module = TrainingModule(net, config, images.num_classes, self.global_loss).to(self.info.device)
        self.frozen_backbone = not any(p.requires_grad for p in net.backbone.parameters())
        self.cache: BackboneCache | None = None
        self.augment = build_augmentation(AugmentConfig(output_size=config.image_size)).to(self.info.device)
        self.pairs_per_batch = config.batch_size // 2
        self.batches_per_epoch = math.ceil(len(epoch_batches(images.labels, self.pairs_per_batch,
                                                             seed=config.seed, epoch=0)) / self.info.world_size)
        self.total_steps = max(1, self.batches_per_epoch * config.epochs)
        self.optimizer = self._build_optimizer()
        warmup = max(1, round(config.warmup_epochs * self.batches_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: _lr_factor(step, self.total_steps, warmup))
        self.use_amp = config.amp and self.info.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.state = TrainState()
        self.wrapped: nn.Module = self.module

    @property
    def net(self) -> RetrievalNet:
        return self.module.net

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT_FILE

    def _build_optimizer(self) -> torch.optim.Optimizer:
        config = self.config
        backbone = [p for p in self.net.backbone.parameters() if p.requires_grad]
        backbone_ids = {id(p) for p in backbone}
        rest = [p for p in self.module.parameters() if p.requires_grad and id(p) not in backbone_ids]
        groups = [{"params": rest, "lr": config.lr}]
        if backbone:
            groups.append({"params": backbone, "lr": config.lr * config.backbone_lr_scale})
        if config.optimizer == "adam":
            return torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)

    # ------------------------------------------------------------------ checkpoints
    def resume(self) -> bool:
        """Restore RUN/checkpoint.pt when there is one; returns whether it did."""
        if not self.checkpoint_path.is_file():
            return False
        self.state, payload = load_checkpoint(
            self.checkpoint_path, model=self.module, optimizer=self.optimizer, scheduler=self.scheduler,
            scaler=self.scaler if self.use_amp else None, map_location=self.info.device)
        stored = (payload.get("config") or {}).get("train_images")
        if stored is not None and stored != self._images_fingerprint():
            raise ValueError(f"{self.checkpoint_path}: made for other training photos; use another run directory")
        logger.info("resumed from %s: epoch %d, step %d", self.checkpoint_path, self.state.epoch, self.state.step)
        return True

    def _images_fingerprint(self) -> str:
        return hashlib.sha256(json.dumps([[os.path.abspath(p) for p in self.images.paths],
                                          self.images.labels.tolist()]).encode()).hexdigest()

    def save_checkpoint(self) -> None:
        if self.info.is_main:
            save_checkpoint(self.checkpoint_path, model=self.module, state=self.state, optimizer=self.optimizer,
                            scheduler=self.scheduler, scaler=self.scaler if self.use_amp else None,
                            config={"network": self.net.config.to_dict(), "train_images": self._images_fingerprint()})
        barrier()

    # ------------------------------------------------------------------ steps
    def _batches(self, order: list[list[int]], rounds_done: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """(position in the epoch's order, batch) of this rank's batches (every world-size-th),
        after the first ``rounds_done`` of them."""
        mine = list(range(self.info.rank, len(order), self.info.world_size))[rounds_done:]
        if self.cache is not None:
            for position in mine:
                indices = np.asarray(order[position], np.int64)
                pairs = indices.reshape(-1, 2)
                pairs = pairs[self.cache.valid[pairs].all(axis=1)]
                yield position, {"indices": torch.from_numpy(np.concatenate([pairs[:, 0], pairs[:, 1]]))}
            return
        # its own generator: starting the loader must not draw from the global RNG, whose state a
        # resumed run restores for the augmentations
        loader = DataLoader(_PhotoItems(self.images.paths, self.config.image_size),
                            batch_sampler=[order[position] for position in mine], collate_fn=_collate_pairs,
                            num_workers=self.config.num_workers, pin_memory=self.info.device.type == "cuda",
                            generator=torch.Generator().manual_seed(self.config.seed))
        yield from zip(mine, loader)

    def _inputs(self, batch: dict[str, Any], epoch: int, position: int) -> torch.Tensor | dict[str, torch.Tensor]:
        device = self.info.device
        if self.cache is not None:
            indices = batch["indices"].numpy()
            views = pick_views(indices, self.cache.views,
                               np.random.default_rng([self.config.seed, epoch, position]))
            return self.cache.maps(indices, views, device)
        with torch.no_grad():
            return self.augment(batch["images"].to(device, non_blocking=True)).clamp_(0, 1)

    def step(self, inputs, labels: torch.Tensor) -> tuple[float, dict[str, float]]:
        """One optimisation step on a batch; returns its loss and parts."""
        with torch.autocast(self.info.device.type, dtype=torch.float16, enabled=self.use_amp):
            loss, parts = self.wrapped(inputs, labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {float(loss)} at step {self.state.step}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        if self.config.grad_clip_norm > 0:
            nn.utils.clip_grad_norm_([p for p in self.module.parameters() if p.requires_grad],
                                     self.config.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return float(loss.detach()), parts

    def fit(self, *, resume: bool = True, max_steps: int | None = None) -> TrainResult:
        """Train (resuming RUN/checkpoint.pt) to ``epochs`` (or ``max_steps`` in all) and write
        RUN/model.pt."""
        config = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self.resume()
        if self.frozen_backbone and config.cache_backbone:
            self.cache = BackboneCache.open_or_build(self.run_dir / CACHE_DIR, self.net, self.images, config,
                                                     info=self.info, progress=self.progress)
        self.wrapped = wrap_ddp(self.module, self.info)
        self.wrapped.train()
        losses: list[float] = []
        labels_of = torch.from_numpy(self.images.labels)
        while self.state.epoch < config.epochs and (max_steps is None or self.state.step < max_steps):
            epoch = self.state.epoch
            order = self.state.extra.get("order")
            if order is None or self.state.extra.get("order_epoch") != epoch:
                order = epoch_batches(self.images.labels, self.pairs_per_batch, seed=config.seed, epoch=epoch)
                self.state.extra.update(order=order, order_epoch=epoch, rounds_done=0)
            rounds_done = self.state.extra["rounds_done"]
            bar = _progress_bar(math.ceil(len(order) / self.info.world_size), f"epoch {epoch + 1}/{config.epochs}",
                                self.progress)
            bar.update(rounds_done)
            started, seen = time.perf_counter(), 0
            interrupted = False
            for position, batch in self._batches(order, rounds_done):
                if max_steps is not None and self.state.step >= max_steps:
                    interrupted = True
                    break
                indices = batch["indices"]
                count = len(indices) // 2
                usable = count >= 2 and len(labels_of[indices[:count]].unique()) >= 2
                if all_ranks_agree(usable, self.info):  # unreadable photos can leave a batch too small
                    labels = labels_of[indices[:count]].to(self.info.device)
                    loss, parts = self.step(self._inputs(batch, epoch, position), labels)
                    losses.append(loss)
                    self.state.step += 1
                    seen += len(indices)
                    self.state.extra["last_loss"] = loss
                    if config.log_every and self.state.step % config.log_every == 0 and self.info.is_main:
                        rate = seen / max(time.perf_counter() - started, 1e-9)
                        logger.info("epoch %d step %d loss %.4f (%s) lr %.2e, %.1f img/s", epoch + 1,
                                    self.state.step, loss, ", ".join(f"{k} {v:.4f}" for k, v in parts.items()),
                                    self.scheduler.get_last_lr()[0], rate)
                self.state.extra["rounds_done"] += 1
                bar.update(1)
                if config.checkpoint_every and self.state.step % config.checkpoint_every == 0:
                    self.save_checkpoint()
            bar.close()
            if interrupted:
                self.save_checkpoint()
                break
            self.state.epoch = epoch + 1
            self.state.extra.update(order=None, order_epoch=None, rounds_done=0)
            self.save_checkpoint()
        model_path = self.run_dir / MODEL_FILE
        digest = self.net.model_hash()
        if self.info.is_main:
            digest = self.net.save(model_path)
            logger.info("model written to %s (sha256 %s)", model_path, digest[:16])
        barrier()
        return TrainResult(model_path, digest, self.state.epoch, self.state.step, losses)


__all__ = ["Trainer", "TrainResult", "TrainingImages", "TrainingModule", "BackboneCache", "epoch_batches",
           "pair_losses", "pick_views", "CHECKPOINT_FILE", "MODEL_FILE"]
