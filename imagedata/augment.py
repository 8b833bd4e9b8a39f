"""Kornia augmentation pipelines on batches ``(B, 3, H, W)`` float in [0, 1] (CPU or GPU).

``build_augmentation(config)`` gives random resized crop -> horizontal flip -> colour jitter ->
small rotation -> small perspective; :class:`TwoViews` applies it twice to the same batch, giving
two differently augmented views of every image: a positive pair for the unlabelled-folder mode.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class AugmentConfig:
    """Parameters of the training augmentation (defaults: moderate, instance-retrieval friendly)."""

    output_size: int = 256                      # square output side
    crop_scale: tuple[float, float] = (0.35, 1.0)  # area fraction of the random resized crop
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.3
    hue: float = 0.05
    jitter_p: float = 0.8
    grayscale_p: float = 0.05
    rotation_degrees: float = 10.0
    rotation_p: float = 0.3
    perspective_scale: float = 0.2
    perspective_p: float = 0.3


def build_augmentation(config: AugmentConfig | None = None) -> nn.Module:
    """A kornia ``AugmentationSequential``: ``(B, 3, H, W)`` [0, 1] -> ``(B, 3, S, S)`` [0, 1], S = output_size."""
    import kornia.augmentation as K

    config = config or AugmentConfig()
    size = (config.output_size, config.output_size)
    return K.AugmentationSequential(
        K.RandomResizedCrop(size, scale=config.crop_scale, ratio=config.crop_ratio),
        K.RandomHorizontalFlip(p=config.flip_p),
        K.ColorJitter(config.brightness, config.contrast, config.saturation, config.hue, p=config.jitter_p),
        K.RandomGrayscale(p=config.grayscale_p),
        K.RandomRotation(degrees=config.rotation_degrees, p=config.rotation_p),
        K.RandomPerspective(distortion_scale=config.perspective_scale, p=config.perspective_p),
    )


class TwoViews(nn.Module):
    """Two independent augmentations of the same images: ``(B, 3, H, W)`` -> two ``(B, 3, S, S)``."""

    def __init__(self, config: AugmentConfig | None = None):
        super().__init__()
        self.augment = build_augmentation(config)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"TwoViews expects (B, 3, H, W), got {tuple(images.shape)}")
        return self.augment(images).clamp_(0, 1), self.augment(images).clamp_(0, 1)
