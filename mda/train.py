"""Training MDA: contrastive loss per head + lambda x Hellinger diversity penalty.

Loader batches come in three forms (all through :func:`train`):

* pairs ``(images_a (B, 3, S, S), images_b (B, 3, S, S), label (B,))``, label 1 = same object:
  :class:`imagedata.datasets.ImagePairs` (revisitop / GLDv2 labelled lists; or an unlabelled folder,
  whose positive pairs are one image twice: give ``augment`` so the two sides differ). With
  ``augment`` both sides of every pair are augmented independently.
* grouped pairs ``{"anchor", "positive": (B, 3, S, S), "group": (B,)}``: anchor i and positive i show
  object ``group[i]``; each anchor also gets its hardest in-batch negative (another group).
* images ``(B, 3, S, S)`` (unlabelled): two augmentations (``augment``, e.g.
  :class:`imagedata.augment.TwoViews`) are the positive pair, the hardest other image (either view)
  the negative.

Hardest negatives use :func:`imagedata.datasets.hardest_negatives` on the heads' descriptors
concatenated (similarity = mean over heads of the dot products). The loss is the sum over heads of
the contrastive loss (mean over pairs) plus ``diversity_weight`` x the diversity penalty of the
batch's attention maps. Checkpoints (:mod:`imagedata.training`: model, optimizer, scheduler, RNG,
step, epoch, batches done in the epoch) are written atomically every ``checkpoint_every`` steps and
at each epoch end; :func:`train` resumes from the latest. Multi-GPU: launch with ``torchrun``; the
model is wrapped in DDP (:func:`imagedata.training.wrap_ddp`), only rank 0 writes.

CLI: ``python -m mda.train --help``.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn

from imagedata.datasets import hardest_negatives
from imagedata.training import (TrainState, load_checkpoint, save_checkpoint, set_sampler_epoch,
                                setup_distributed, wrap_ddp)

from . import functional as MF
from .config import MdaConfig, TrainConfig, to_dict
from .model import MdaModel

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"


# --- loss ----------------------------------------------------------------------------------------

@dataclass
class LossParts:
    """One batch's loss: ``total`` (a tensor to backpropagate) and its parts as floats."""

    total: torch.Tensor
    contrastive: float
    diversity: float
    positive_distance: float
    negative_distance: float


def contrastive_diversity_loss(g_first: torch.Tensor, g_second: torch.Tensor, labels: torch.Tensor,
                               attention_maps: list[torch.Tensor], config: TrainConfig) -> LossParts:
    """Sum over heads of the contrastive loss of pairs (G (P, N, D) both sides, labels (P,) 1 = match;
    mean over pairs) + ``diversity_weight`` x the mean diversity penalty of ``attention_maps``
    (a list of (B, N, h, w) batches)."""
    contrastive = MF.contrastive_loss(g_first, g_second, labels, config.margin, reduction="mean")
    diversity = torch.stack([MF.diversity_penalty(maps) for maps in attention_maps]).mean()
    total = contrastive + config.diversity_weight * diversity
    with torch.no_grad():
        distance = (g_first - g_second).pow(2).sum(-1).sqrt().mean(-1)
        positive = labels > 0
        mean = lambda mask: float(distance[mask].mean()) if mask.any() else float("nan")  # noqa: E731
    return LossParts(total, float(contrastive.detach()), float(diversity.detach()), mean(positive), mean(~positive))


def pair_loss(first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor],
              labels: torch.Tensor, config: TrainConfig) -> LossParts:
    """Loss of given pairs from the model outputs ``(G (P, N, D), A (P, N, h, w))`` of both sides."""
    return contrastive_diversity_loss(first[0], second[0], labels, [first[1], second[1]], config)


def mined_loss(anchor: tuple[torch.Tensor, torch.Tensor], positive: tuple[torch.Tensor, torch.Tensor],
               groups: torch.Tensor, config: TrainConfig) -> LossParts:
    """Anchors with their positives (label 1) and each anchor's hardest in-batch negative among
    both sides' descriptors of other groups (label 0). groups: (B,)."""
    g_anchor, a_anchor = anchor
    g_positive, a_positive = positive
    batch, heads, dim = g_anchor.shape
    pool = torch.cat([g_anchor, g_positive])                                    # (2B, N, D)
    negatives = hardest_negatives(pool.reshape(2 * batch, heads * dim) / math.sqrt(heads),
                                  torch.cat([groups, groups]))[:batch]
    if (negatives < 0).any():
        raise ValueError("a batch needs images of at least two groups (no negative for some anchor)")
    labels = torch.cat([torch.ones(batch), torch.zeros(batch)]).to(g_anchor.device)
    return contrastive_diversity_loss(torch.cat([g_anchor, g_anchor]), torch.cat([g_positive, pool[negatives]]),
                                      labels, [a_anchor, a_positive], config)


def batch_loss(net: nn.Module, batch: Any, config: TrainConfig, *, augment: nn.Module | None,
               device: torch.device) -> LossParts:
    """Forward both sides of a loader batch (any of the module docstring's forms) and return its loss."""
    if isinstance(batch, dict):
        anchors, positives = batch["anchor"].to(device), batch["positive"].to(device)
        if augment is not None:
            anchors, positives = _augment(augment, anchors), _augment(augment, positives)
        groups = torch.as_tensor(batch["group"], device=device)
        return mined_loss(net(anchors), net(positives), groups, config)
    if isinstance(batch, (tuple, list)) and len(batch) == 3:
        images_a, images_b, labels = batch
        if not isinstance(images_a, torch.Tensor):
            raise TypeError("pair batches need equal-size images stacked into tensors (square training images)")
        images_a, images_b = images_a.to(device), images_b.to(device)
        if augment is not None:
            images_a, images_b = _augment(augment, images_a), _augment(augment, images_b)
        labels = torch.as_tensor(labels, device=device)
        return pair_loss(net(images_a), net(images_b), labels, config)
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    if not isinstance(batch, torch.Tensor) or batch.ndim != 4:
        raise TypeError("a training batch must be (images_a, images_b, labels), a dict(anchor, positive, group) "
                        "or a (B, 3, H, W) image tensor")
    if augment is None:
        raise ValueError("unlabelled image batches need an augmentation (e.g. imagedata.augment.TwoViews())")
    images = batch.to(device)
    views = augment(images) if _is_two_views(augment) else (_augment(augment, images), _augment(augment, images))
    return mined_loss(net(views[0]), net(views[1]), torch.arange(images.shape[0], device=device), config)


def _is_two_views(augment: nn.Module) -> bool:
    return type(augment).__name__ == "TwoViews"


def _augment(augment: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """One augmentation of a batch (a TwoViews module contributes its first view's pipeline)."""
    pipeline = augment.augment if _is_two_views(augment) else augment
    return pipeline(images).clamp(0, 1)


# --- training loop -------------------------------------------------------------------------------

def build_optimizer(model: MdaModel, config: TrainConfig) -> tuple[torch.optim.Optimizer, Any]:
    """Adam: backbone at ``lr`` (frozen when not ``train_backbone``), head at ``lr * head_lr_multiplier``;
    exponential decay ``lr_gamma`` per epoch (HOW)."""
    if not config.train_backbone:
        for parameter in model.backbone.parameters():
            parameter.requires_grad_(False)
    groups = [{"params": [p for p in model.head.parameters() if p.requires_grad],
               "lr": config.lr * config.head_lr_multiplier}]
    backbone_params = [p for p in model.backbone.parameters() if p.requires_grad]
    if backbone_params:
        groups.append({"params": backbone_params, "lr": config.lr})
    optimizer = torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config.lr_gamma)
    return optimizer, scheduler


@dataclass
class TrainResult:
    step: int
    epoch: int
    losses: list[float] = field(default_factory=list)   # total loss of every step run in this call


def train(model: MdaModel, loader: Iterable[Any], config: TrainConfig, *, run_dir: str | os.PathLike,
          augment: nn.Module | None = None, device: torch.device | str | None = None, resume: bool = True,
          max_steps: int | None = None, log_every: int = 10) -> TrainResult:
    """Train ``model`` on ``loader`` batches for ``config.epochs`` epochs (or until ``max_steps``
    total steps), checkpointing to ``run_dir/checkpoint.pt`` and resuming from it when present.

    An epoch is one pass over ``loader`` (at most ``config.steps_per_epoch`` batches); a loader
    whose dataset has ``resample(epoch)`` (ImagePairs) gets it at each epoch start, a sampler with
    ``set_epoch`` likewise. A run resumed mid-epoch skips the batches already done. Under torchrun
    the model is wrapped in DDP and only rank 0 writes checkpoints. Returns the final step/epoch and
    this call's per-step losses; the trained weights stay in ``model`` (save with ``model.save``).
    """
    info = setup_distributed(device=device)
    model.to(info.device)
    optimizer, scheduler = build_optimizer(model, config)
    checkpoint = Path(run_dir) / CHECKPOINT_NAME
    state = TrainState()
    if resume and checkpoint.is_file():
        state, payload = load_checkpoint(checkpoint, model=model, optimizer=optimizer, scheduler=scheduler,
                                         map_location=info.device)
        saved = (payload.get("config") or {}).get("model")
        if saved is not None and MdaConfig.from_dict(saved) != model.config:
            raise ValueError(f"{checkpoint}: trained with another model config; use a new run directory")
        logger.info("resumed from %s at step %d (epoch %d)", checkpoint, state.step, state.epoch)
    net = wrap_ddp(model, info)
    if augment is not None:
        augment = augment.to(info.device)
    result = TrainResult(step=state.step, epoch=state.epoch)
    stored_config = {"model": to_dict(model.config), "train": to_dict(config)}

    def save() -> None:
        if info.is_main:
            save_checkpoint(checkpoint, model=model, state=state, optimizer=optimizer, scheduler=scheduler,
                            config=stored_config)

    net.train()
    started = time.perf_counter()
    while state.epoch < config.epochs and (max_steps is None or state.step < max_steps):
        done_in_epoch = int(state.extra.get("step_in_epoch", 0))
        dataset = getattr(loader, "dataset", None)
        if hasattr(dataset, "resample"):
            dataset.resample(state.epoch)
        set_sampler_epoch(getattr(loader, "sampler", None), state.epoch)
        interrupted = False
        for index, batch in enumerate(loader):
            if index < done_in_epoch:          # resuming mid-epoch: skip the batches already done
                continue
            if config.steps_per_epoch is not None and index >= config.steps_per_epoch:
                break
            if max_steps is not None and state.step >= max_steps:
                interrupted = True
                break
            parts = batch_loss(net, batch, config, augment=augment, device=info.device)
            optimizer.zero_grad(set_to_none=True)
            parts.total.backward()
            optimizer.step()
            state.step += 1
            state.extra["step_in_epoch"] = index + 1
            result.losses.append(float(parts.total.detach()))
            if log_every and state.step % log_every == 0 and info.is_main:
                logger.info("step %d epoch %d loss %.4f (contrastive %.4f, diversity %.4f, d+ %.3f, d- %.3f) %.0fs",
                            state.step, state.epoch, float(parts.total.detach()), parts.contrastive, parts.diversity,
                            parts.positive_distance, parts.negative_distance, time.perf_counter() - started)
            if config.checkpoint_every and state.step % config.checkpoint_every == 0:
                save()
        if interrupted:
            save()
            break
        state.epoch += 1
        state.extra["step_in_epoch"] = 0
        scheduler.step()
        save()
    result.step, result.epoch = state.step, state.epoch
    return result


# --- command line --------------------------------------------------------------------------------

def build_images(args: argparse.Namespace):
    """The training image list named by the CLI arguments (revisitop root, GLDv2 csv or a folder)."""
    from imagedata import datasets

    if args.revisitop:
        from imagedata.revisitop import load_revisitop
        return datasets.labelled_from_revisitop(load_revisitop(args.revisitop))
    if args.gldv2_csv:
        if not args.images_root:
            raise SystemExit("--gldv2-csv needs --images-root")
        return datasets.labelled_from_gldv2_csv(args.gldv2_csv, args.images_root)
    if args.folder:
        return datasets.unlabelled_folder(args.folder)
    raise SystemExit("give one of --revisitop DIR, --gldv2-csv CSV --images-root DIR, --folder DIR")


def main(argv: list[str] | None = None) -> None:
    from backbones.networks import BackboneConfig
    from imagedata.augment import AugmentConfig, TwoViews
    from imagedata.datasets import ImagePairs, TrainImageConfig, stack_or_list
    from imagedata.training import make_sampler, seed_everything

    defaults, model_defaults = TrainConfig(), MdaConfig()
    parser = argparse.ArgumentParser(prog="python -m mda.train", description=__doc__.split("\n\n")[0])
    data = parser.add_argument_group("data (one of)")
    data.add_argument("--revisitop", type=Path, help="revisitop-layout folder (jpg/ + gnd_*.pkl): labelled pairs")
    data.add_argument("--gldv2-csv", type=Path, help="GLDv2-style csv (id,landmark_id): labelled pairs")
    data.add_argument("--images-root", type=Path, help="image folder of --gldv2-csv")
    data.add_argument("--folder", type=Path, help="unlabelled image folder: two augmented views = positive pair")
    parser.add_argument("--out", type=Path, required=True, help="run directory (checkpoint.pt, model.pt)")
    parser.add_argument("--init", type=Path, help="start from a saved MdaModel (else a new one)")
    parser.add_argument("--backbone", default=model_defaults.backbone.name)
    parser.add_argument("--tap", default=model_defaults.backbone.tap, choices=["stride16", "stride32"])
    parser.add_argument("--weights", default=None, help="backbone checkpoint (ResNet); default packaged weights")
    parser.add_argument("--heads", type=int, default=model_defaults.num_heads)
    parser.add_argument("--fit-reduction-images", type=int, default=200,
                        help="PCA-whiten the reduction on this many training images first (0: skip)")
    for name in ("margin", "diversity_weight", "lr", "weight_decay", "batch_size", "epochs", "image_size",
                 "checkpoint_every", "num_workers", "seed"):
        value = getattr(defaults, name)
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    parser.add_argument("--steps-per-epoch", type=int, default=None)
    parser.add_argument("--freeze-backbone", action="store_true")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    config = TrainConfig(margin=args.margin, diversity_weight=args.diversity_weight, lr=args.lr,
                         weight_decay=args.weight_decay, batch_size=args.batch_size, epochs=args.epochs,
                         steps_per_epoch=args.steps_per_epoch, image_size=args.image_size,
                         train_backbone=not args.freeze_backbone, checkpoint_every=args.checkpoint_every,
                         num_workers=args.num_workers, seed=args.seed)
    seed_everything(config.seed)
    images = build_images(args)
    if args.init:
        model = MdaModel.load(args.init)
    else:
        model = MdaModel(MdaConfig(backbone=BackboneConfig(name=args.backbone, tap=args.tap, weights=args.weights),
                                   num_heads=args.heads))
    checkpoint = args.out / CHECKPOINT_NAME
    if args.fit_reduction_images and not checkpoint.is_file() and not bool(model.head.reduction_fitted):
        model.fit_reduction(images.paths[: args.fit_reduction_images], max_size=config.image_size)
    info = setup_distributed(device=args.device)
    pairs = ImagePairs(images, TrainImageConfig(size=config.image_size), seed=config.seed)
    loader = torch.utils.data.DataLoader(pairs, batch_size=config.batch_size, num_workers=config.num_workers,
                                         sampler=make_sampler(pairs, info, seed=config.seed), drop_last=True,
                                         collate_fn=stack_or_list)
    augment = TwoViews(AugmentConfig(output_size=config.image_size)) if pairs.unlabelled else None
    result = train(model, loader, config, run_dir=args.out, augment=augment, device=args.device)
    if info.is_main:
        model.save(args.out / "model.pt")
        logger.info("done: step %d, epoch %d; model saved to %s", result.step, result.epoch, args.out / "model.pt")


if __name__ == "__main__":
    main()
