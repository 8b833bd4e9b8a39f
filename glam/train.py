"""Train GLAM: ArcFace on labelled images, contrastive on pairs, or two-view contrastive on a folder.

Library functions (`build_training_data`, `GlamTrainer`, `train`) hold the logic; `main` is the CLI:

    python -m glam.train --mode arcface --gldv2-csv train.csv --images-root train/ --out runs/glam
    python -m glam.train --mode unlabelled --folder my_photos/ --out runs/glam_unsup
    torchrun --nproc_per_node 4 -m glam.train ...        # DDP, one process per GPU

Every epoch (and every `checkpoint_every` steps) a checkpoint (model, loss head, optimiser,
scheduler, RNG states) is written atomically to OUT/checkpoint.pt; rerunning the same command
resumes from it, mid-epoch included. The final model is OUT/glam.pt (`GlamModel.load`).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from backbones.networks import BackboneConfig
from glam.config import ATTENTION_SWITCHES, ExtractionConfig, GlamConfig, TrainConfig
from glam.losses import ArcFaceLoss, contrastive_loss, two_view_contrastive_loss
from glam.model import GlamModel
from imagedata.augment import AugmentConfig, TwoViews, build_augmentation
from imagedata.datasets import (
    ClassificationImages,
    ImagePairs,
    LabelledImageList,
    TrainImageConfig,
    labelled_from_gldv2_csv,
    labelled_from_revisitop,
    unlabelled_folder,
)
from imagedata.training import (
    DistributedInfo,
    is_main_process,
    TrainState,
    all_reduce_mean,
    barrier,
    cleanup_distributed,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
    setup_distributed,
    wrap_ddp,
)

logger = logging.getLogger(__name__)

__all__ = ["TrainingData", "build_training_data", "GlamTrainer", "train", "main", "CHECKPOINT_NAME", "MODEL_NAME"]

CHECKPOINT_NAME = "checkpoint.pt"
MODEL_NAME = "glam.pt"


@dataclass
class TrainingData:
    """The dataset of one training mode plus what the loss needs (num_classes for ArcFace)."""

    mode: str
    dataset: Dataset
    images: LabelledImageList
    num_classes: int = 0


def build_training_data(
    mode: str,
    images: LabelledImageList,
    config: TrainConfig,
) -> TrainingData:
    """Wrap an image list for a training mode.

    arcface: (image, class) items; contrastive: (image_a, image_b, is_positive) pairs from the labels;
    unlabelled: (image, image id) items whose batches get two augmented views each.
    """
    image_config = TrainImageConfig(size=config.image_size, square=True)
    if mode == "arcface":
        dataset = ClassificationImages(images, image_config, seed=config.seed)
        if dataset.num_classes < 2:
            raise ValueError(f"ArcFace needs at least 2 classes, the training list has {dataset.num_classes}")
        return TrainingData(mode, dataset, images, dataset.num_classes)
    if mode == "contrastive":
        dataset = ImagePairs(images, image_config, negatives_per_positive=config.num_negatives, seed=config.seed)
        return TrainingData(mode, dataset, images)
    if mode == "unlabelled":
        if len(images) < 2:
            raise ValueError("unlabelled training needs at least 2 images")
        ids = LabelledImageList(images.paths, torch.arange(len(images)).numpy())  # each image its own id
        return TrainingData(mode, ClassificationImages(ids, image_config, seed=config.seed), ids)
    raise ValueError(f"unknown training mode {mode!r}; use one of {TrainConfig.MODES}")


class _TrainingModule(nn.Module):
    """Model + (ArcFace) loss head in one module, so DDP synchronises both (the loss is computed in
    forward, where DDP expects every parameter to be used)."""

    def __init__(self, model: GlamModel, loss_head: Optional[ArcFaceLoss]):
        super().__init__()
        self.model = model
        self.loss_head = loss_head

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Descriptors (B, D); with labels (ArcFace), the scalar loss."""
        descriptors = self.model(images)
        if labels is None:
            return descriptors
        return self.loss_head(descriptors.float(), labels)


def _epoch_indices(n: int, epoch: int, seed: int, info: DistributedInfo, batch_size: int) -> list[int]:
    """This rank's item order for an epoch: a seeded permutation, padded to full batches on every rank."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    per_rank = math.ceil(n / (info.world_size * batch_size)) * batch_size
    order = (order * math.ceil(per_rank * info.world_size / n + 1))[: per_rank * info.world_size]
    return order[info.rank::info.world_size]


def _lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class GlamTrainer:
    """One training run: model, loss, optimiser, schedule, checkpoints, optional DDP.

    Args:
        model_config: GlamConfig of a new model (ignored when `init_model` is given).
        train_config: TrainConfig.
        data: TrainingData (from `build_training_data`).
        out_dir: checkpoint.pt and glam.pt go here.
        init_model: a GlamModel file to start from (e.g. a previous run).
        info: DistributedInfo (default: from torchrun's environment via setup_distributed()).
    """

    def __init__(self, model_config: GlamConfig, train_config: TrainConfig, data: TrainingData,
                 out_dir: str | os.PathLike, *, init_model: str | os.PathLike | None = None,
                 info: Optional[DistributedInfo] = None, progress: bool = True):
        if data.mode != train_config.mode:
            raise ValueError(f"data built for mode {data.mode!r} but train_config.mode is {train_config.mode!r}")
        self.config = train_config
        self.data = data
        self.out_dir = Path(out_dir)
        self.info = info or setup_distributed()
        self.progress = progress and self.info.is_main
        seed_everything(train_config.seed + self.info.rank)
        model = GlamModel.load(init_model) if init_model is not None else GlamModel(model_config)
        loss_head = (ArcFaceLoss(model.output_dim, data.num_classes, train_config.arcface_scale,
                                 train_config.arcface_margin) if data.mode == "arcface" else None)
        self.module = _TrainingModule(model, loss_head).to(self.info.device)
        self.augment = (TwoViews(AugmentConfig(output_size=train_config.image_size)) if data.mode == "unlabelled"
                        else build_augmentation(AugmentConfig(output_size=train_config.image_size)))
        self.batches_per_epoch = math.ceil(len(data.dataset) / (self.info.world_size * train_config.batch_size))
        self.total_steps = self.batches_per_epoch * train_config.epochs
        self.optimizer = self._build_optimizer()
        warmup = max(1, round(train_config.warmup_epochs * self.batches_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: _lr_factor(step, self.total_steps, warmup))
        self.use_amp = train_config.amp and self.info.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.state = TrainState()
        self.wrapped: nn.Module = self.module

    @property
    def model(self) -> GlamModel:
        return self.module.model

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_NAME

    def _build_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        backbone = [p for p in self.model.backbone.parameters() if p.requires_grad]
        backbone_ids = {id(p) for p in backbone}
        rest = [p for p in self.module.parameters() if p.requires_grad and id(p) not in backbone_ids]
        groups = [{"params": rest, "lr": cfg.lr}]
        if backbone and cfg.backbone_lr_scale > 0:
            groups.append({"params": backbone, "lr": cfg.lr * cfg.backbone_lr_scale})
        elif backbone:
            for p in backbone:
                p.requires_grad_(False)
        if cfg.optimizer == "adam":
            return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    # ---------------------------------------------------------------------------------- state
    def resume(self) -> bool:
        """Load OUT/checkpoint.pt when it exists. Returns True when resumed."""
        if not self.checkpoint_path.is_file():
            return False
        self.state, _ = load_checkpoint(self.checkpoint_path, model=self.module, optimizer=self.optimizer,
                                        scheduler=self.scheduler, scaler=self.scaler if self.use_amp else None,
                                        map_location=self.info.device)
        logger.info("resumed from %s: epoch %d, step %d", self.checkpoint_path, self.state.epoch, self.state.step)
        return True

    def save_checkpoint(self) -> None:
        if self.info.is_main:
            save_checkpoint(self.checkpoint_path, model=self.module, state=self.state, optimizer=self.optimizer,
                            scheduler=self.scheduler, scaler=self.scaler if self.use_amp else None,
                            config={"model": self.model.config.to_dict(), "train": self.config.to_dict()})
        barrier()

    def initialise_whitening(self) -> None:
        """FC <- PCA-whitening of a seeded sample of the training images (same on every rank)."""
        count = min(self.config.whitening_images, len(self.data.images))
        if count < 2:
            return
        extraction = ExtractionConfig(max_size=self.config.image_size)
        self.model.fit_whitening(self.data.images.paths, max_images=count, extraction=extraction,
                                 progress=self.progress, seed=self.config.seed)

    # ---------------------------------------------------------------------------------- steps
    def loss(self, batch: Sequence[Any]) -> torch.Tensor:
        """One batch -> scalar loss (augmentation on the device)."""
        device = self.info.device
        mode = self.data.mode
        with torch.autocast(device.type, enabled=self.use_amp):
            if mode == "arcface":
                images, labels = batch[0].to(device, non_blocking=True), batch[1].to(device)
                return self.wrapped(self.augment(images), labels)
            if mode == "contrastive":
                first, second, is_positive = (t.to(device, non_blocking=True) for t in batch)
                descriptors = self.wrapped(self.augment(torch.cat([first, second]))).float()
                a, b = descriptors.chunk(2)
                return contrastive_loss(a, b, is_positive, self.config.contrastive_margin)
            images = batch[0].to(device, non_blocking=True)
            view_a, view_b = self.augment(images)
            descriptors = self.wrapped(torch.cat([view_a, view_b])).float()
            a, b = descriptors.chunk(2)
            return two_view_contrastive_loss(a, b, self.config.contrastive_margin)

    def _loader(self, epoch: int, skip_batches: int) -> DataLoader:
        indices = _epoch_indices(len(self.data.dataset), epoch, self.config.seed, self.info, self.config.batch_size)
        indices = indices[skip_batches * self.config.batch_size:]
        return DataLoader(self.data.dataset, batch_size=self.config.batch_size, sampler=indices,
                          num_workers=self.config.num_workers, drop_last=False,
                          pin_memory=self.info.device.type == "cuda",
                          persistent_workers=False)

    def fit(self, resume: bool = True) -> Path:
        """Train to `epochs` (resuming when a checkpoint exists) and write OUT/glam.pt. Returns its path."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        resumed = resume and self.resume()
        if not resumed and self.config.whitening_images > 0:
            self.initialise_whitening()
        self.wrapped = wrap_ddp(self.module, self.info)
        cfg = self.config
        while self.state.epoch < cfg.epochs:
            epoch = self.state.epoch
            done_in_epoch = self.state.step - epoch * self.batches_per_epoch
            if isinstance(self.data.dataset, ImagePairs):
                self.data.dataset.resample(epoch)
            self.wrapped.train()
            start, seen = time.perf_counter(), 0
            for batch in self._loader(epoch, done_in_epoch):
                if len(batch[0]) < 2:
                    continue  # a lone last item gives no in-batch negative / batch statistics
                loss = self.loss(batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss {loss.item()} at epoch {epoch}, step {self.state.step}")
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
                if cfg.grad_clip_norm > 0:
                    nn.utils.clip_grad_norm_(self.module.parameters(), cfg.grad_clip_norm)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.scheduler.step()
                self.state.step += 1
                seen += len(batch[0])
                mean_loss = float(all_reduce_mean(loss.detach()))
                self.state.extra["last_loss"] = mean_loss
                if self.progress and self.state.step % cfg.log_every == 0:
                    rate = seen * self.info.world_size / max(time.perf_counter() - start, 1e-9)
                    logger.info("epoch %d step %d loss %.4f lr %.2e %.1f img/s", epoch, self.state.step, mean_loss,
                                self.scheduler.get_last_lr()[0], rate)
                if cfg.checkpoint_every and self.state.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
            self.state.epoch = epoch + 1
            self.state.step = self.state.epoch * self.batches_per_epoch
            self.save_checkpoint()
        final = self.out_dir / MODEL_NAME
        if self.info.is_main:
            self.model.save(final)
        barrier()
        return final


def train(model_config: GlamConfig, train_config: TrainConfig, data: TrainingData, out_dir: str | os.PathLike, *,
          init_model: str | os.PathLike | None = None, resume: bool = True, progress: bool = True) -> Path:
    """Run (or resume) a training run; returns the path of the trained model file (OUT/glam.pt)."""
    trainer = GlamTrainer(model_config, train_config, data, out_dir, init_model=init_model, progress=progress)
    return trainer.fit(resume=resume)


# -------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    defaults, model_defaults = TrainConfig(), GlamConfig()
    p = argparse.ArgumentParser(prog="python -m glam.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=TrainConfig.MODES, default=defaults.mode)
    src = p.add_argument_group("training images (one source)")
    src.add_argument("--gldv2-csv", help="GLDv2-style csv (id,landmark_id or landmark_id,images)")
    src.add_argument("--images-root", help="folder of the csv's images")
    src.add_argument("--revisitop", help="a revisitop-layout folder (DIR/jpg + gnd_*.pkl): labels from query groups")
    src.add_argument("--folder", help="a folder of images (unlabelled mode; or --labels-from-subfolders)")
    src.add_argument("--labels-from-subfolders", action="store_true")
    p.add_argument("--out", required=True, help="output folder (checkpoint.pt, glam.pt)")
    p.add_argument("--init-model", help="start from this GLAM model file")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    m = p.add_argument_group("model")
    m.add_argument("--backbone", default=model_defaults.backbone.name)
    m.add_argument("--tap", default=model_defaults.backbone.tap, choices=("stride16", "stride32"))
    m.add_argument("--weights", default=None, help="backbone weights file ('random' for none)")
    m.add_argument("--train-layers", type=int, default=None, help="trainable last backbone stages (default all)")
    m.add_argument("--freeze-bn", action="store_true", help="keep backbone BatchNorms frozen (small batches)")
    m.add_argument("--output-dim", type=int, default=model_defaults.output_dim)
    for switch in ATTENTION_SWITCHES:
        m.add_argument(f"--no-{switch.replace('_', '-')}", action="store_true", help=f"switch {switch} attention off")
    t = p.add_argument_group("training")
    for name in ("epochs", "batch_size", "image_size", "lr", "backbone_lr_scale", "weight_decay", "arcface_scale",
                 "arcface_margin", "contrastive_margin", "num_negatives", "whitening_images", "num_workers", "seed",
                 "log_every", "checkpoint_every", "warmup_epochs", "grad_clip_norm"):
        value = getattr(defaults, name)
        t.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    t.add_argument("--optimizer", choices=("adam", "sgd"), default=defaults.optimizer)
    t.add_argument("--no-amp", action="store_true")
    return p


def _image_list(args: argparse.Namespace) -> LabelledImageList:
    if args.gldv2_csv:
        if not args.images_root:
            raise SystemExit("--gldv2-csv needs --images-root")
        return labelled_from_gldv2_csv(args.gldv2_csv, args.images_root)
    if args.revisitop:
        from imagedata.revisitop import load_revisitop

        return labelled_from_revisitop(load_revisitop(args.revisitop))
    if args.folder:
        return unlabelled_folder(args.folder, labels_from_subfolders=args.labels_from_subfolders)
    raise SystemExit("give training images: --gldv2-csv/--images-root, --revisitop or --folder")


def configs_from_args(args: argparse.Namespace) -> tuple[GlamConfig, TrainConfig]:
    """The GlamConfig and TrainConfig an argparse namespace of `_parser` describes."""
    backbone = BackboneConfig(name=args.backbone, tap=args.tap, weights=args.weights, train_layers=args.train_layers,
                              freeze_bn=args.freeze_bn)
    model_config = GlamConfig(backbone=backbone, output_dim=args.output_dim,
                              **{s: not getattr(args, f"no_{s}") for s in ATTENTION_SWITCHES})
    train_fields = {name: getattr(args, name) for name in TrainConfig.__dataclass_fields__ if hasattr(args, name)}
    train_config = replace(TrainConfig(), **train_fields, amp=not args.no_amp)
    return model_config, train_config


def main(argv: Optional[Sequence[str]] = None) -> Path:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model_config, train_config = configs_from_args(args)
    data = build_training_data(train_config.mode, _image_list(args), train_config)
    try:
        path = train(model_config, train_config, data, args.out, init_model=args.init_model,
                     resume=not args.no_resume)
        if is_main_process():
            logger.info("model written to %s", path)
    finally:
        cleanup_distributed()
    return path


if __name__ == "__main__":
    main()
