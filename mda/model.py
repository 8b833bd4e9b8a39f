"""The MDA network: backbone -> channel mapping -> N dynamic-attention heads, and the 1x1 reduction
to C_T-dim local descriptors.

Untrained it already behaves sensibly (DESIGN.md): the channel mapping starts as the identity, every
head's indicator starts as the constant ``1 / C_group`` (so each head's map is the mean of its
rectified channels, a feature-strength attention like HOW's), and the reduction is initialised by
PCA-whitening learned from the user's own images (:meth:`MdaModel.fit_reduction`).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from asmk_index.persistence import atomic_file

from . import functional as MF
from .config import ExtractionConfig, MdaConfig, to_dict

logger = logging.getLogger(__name__)

MODEL_FORMAT = "mda-model"
MODEL_FORMAT_VERSION = 1


class MultipleDynamicAttention(nn.Module):
    """The MDA head on a backbone map S (B, C_s, H, W).

    forward(S) -> (attention (B, N, H, W) non-negative, local (B, C_T, H, W) unnormalised).
    """

    def __init__(self, in_channels: int, config: MdaConfig):
        super().__init__()
        num_heads = config.num_heads
        group_channels = in_channels // num_heads
        if group_channels < 1:
            raise ValueError(f"MDA: {in_channels} backbone channels cannot be split into {num_heads} heads")
        self.in_channels = in_channels
        self.num_heads = num_heads
        self.group_channels = group_channels
        self.attention_activation = config.attention_activation
        self.rectify_groups = config.rectify_groups
        self.smoothing_kernel = config.smoothing_kernel

        self.channel_mapping: nn.Module
        if config.channel_mapping:
            self.channel_mapping = nn.Conv2d(in_channels, in_channels, kernel_size=1)
            with torch.no_grad():
                self.channel_mapping.weight.copy_(torch.eye(in_channels).view(in_channels, in_channels, 1, 1))
                self.channel_mapping.bias.zero_()
        else:
            self.channel_mapping = nn.Identity()

        width = num_heads * group_channels
        # One 1x1 conv per head on its pooled group (a grouped conv does all heads at once).
        self.indicator = nn.Conv2d(width, width, kernel_size=1, groups=num_heads)
        with torch.no_grad():
            nn.init.normal_(self.indicator.weight, std=config.indicator_init_std)
            self.indicator.bias.fill_(config.indicator_init / group_channels)

        self.reduction = nn.Conv2d(in_channels, config.descriptor_dim, kernel_size=1)
        # Marks whether the reduction was fitted (PCA-whitening) or trained; saved with the model.
        self.register_buffer("reduction_fitted", torch.zeros((), dtype=torch.bool))

    def groups(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C_s, H, W) -> the heads' channel groups F (B, N, C_g, H, W)."""
        mapped = self.channel_mapping(features)
        batch, _, height, width = mapped.shape
        groups = mapped[:, : self.num_heads * self.group_channels]
        groups = groups.reshape(batch, self.num_heads, self.group_channels, height, width)
        return F.relu(groups) if self.rectify_groups else groups

    def attention(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C_s, H, W) -> attention maps (B, N, H, W)."""
        groups = self.groups(features)
        batch = groups.shape[0]
        pooled = groups.mean(dim=(3, 4)).reshape(batch, -1, 1, 1)              # GAP per channel
        indicator = F.relu(self.indicator(pooled)).reshape(batch, self.num_heads, self.group_channels)
        return MF.dynamic_attention(groups, indicator, self.attention_activation)

    def pre_reduction(self, features: torch.Tensor) -> torch.Tensor:
        """The map the reduction T is applied to: S, smoothed by HOW's average pooling if set."""
        k = self.smoothing_kernel
        if k > 1:
            return F.avg_pool2d(features, k, stride=1, padding=k // 2, count_include_pad=False)
        return features

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if features.ndim != 4 or features.shape[1] != self.in_channels:
            raise ValueError(f"MDA head: expected (B, {self.in_channels}, H, W) features, got {tuple(features.shape)}")
        return self.attention(features), self.reduction(self.pre_reduction(features))

    @property
    def descriptor_dim(self) -> int:
        return int(self.reduction.out_channels)

    @torch.no_grad()
    def reduction_samples(self, backbone_maps: list[torch.Tensor], count: int, *,
                          border_cells: int = 0) -> torch.Tensor:
        """The ``count`` most attended pre-reduction features of one image, (M, C_s) float32 on
        the CPU, from its backbone maps at every pyramid scale (each (1, C_s, h, w)), away from
        the maps' edges as the extraction selects them (``border_cells``)."""
        maps = [self.attention(backbone_map)[0] for backbone_map in backbone_maps]
        features = [self.pre_reduction(backbone_map)[0] for backbone_map in backbone_maps]
        chosen = MF.select_top_locations(maps, count, border_cells=border_cells)
        samples = []
        for index in chosen.scale_index.unique().tolist():
            mask = chosen.scale_index == index
            samples.append(features[index][:, chosen.y[mask], chosen.x[mask]].T.float().cpu())
        return torch.cat(samples)

    @torch.no_grad()
    def fit_reduction(self, samples: torch.Tensor, *, whiten: bool = True) -> int:
        """Initialise the reduction T by PCA(-whitening) of pre-reduction features (M, C_s).

        When C_s is smaller than the descriptor size (EfficientNet-Lite0 stride16: 112 < 128) the
        C_s principal components fill the first rows and the remaining output dimensions start
        at zero (training may use them). Returns M.
        """
        from backbones.layers import init_linear_from_pca, learn_pca_whitening

        descriptor_dim = self.descriptor_dim
        components = min(descriptor_dim, self.in_channels)
        if samples.shape[0] <= components:
            raise ValueError(f"fit_reduction: {samples.shape[0]} feature vectors are too few to learn a "
                             f"{components}-d PCA; give more images or features_per_image")
        weight, bias = learn_pca_whitening(samples, components, whiten=whiten)
        if components < descriptor_dim:
            logger.info("fit_reduction: %d backbone channels < descriptor_dim %d; the last %d dims start at 0",
                        components, descriptor_dim, descriptor_dim - components)
            pad = descriptor_dim - components
            weight = torch.cat([weight, weight.new_zeros(pad, weight.shape[1])])
            bias = torch.cat([bias, bias.new_zeros(pad)])
        init_linear_from_pca(self.reduction, weight, bias)
        self.reduction_fitted.fill_(True)
        return int(samples.shape[0])


class MdaModel(nn.Module):
    """Backbone + MDA head.

    forward(images (B, 3, H, W) RGB in [0, 1]) -> (G (B, N, C_T) L2-normalised per head,
    attention (B, N, h, w)) for training; :meth:`local_features` for test-time extraction.
    """

    def __init__(self, config: MdaConfig | None = None, *, backbone: nn.Module | None = None):
        super().__init__()
        self.config = config if config is not None else MdaConfig()
        if backbone is None:
            from backbones.networks import build_backbone
            backbone = build_backbone(self.config.backbone)
        for attribute in ("out_channels", "stride"):
            if not hasattr(backbone, attribute):
                raise TypeError(f"MdaModel: the backbone must have .{attribute} (a backbones.networks.Backbone)")
        self.backbone = backbone
        self.head = MultipleDynamicAttention(int(backbone.out_channels), self.config)

    @property
    def stride(self) -> int:
        return int(self.backbone.stride)

    @property
    def descriptor_dim(self) -> int:
        return self.config.descriptor_dim

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def train(self, mode: bool = True) -> "MdaModel":
        """Train mode, but BatchNorm statistics of the backbone stay frozen (as HOW)."""
        super().train(mode)
        if mode:
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W) in [0, 1] -> (attention (B, N, h, w), local (B, C_T, h, w))."""
        return self.head(self.backbone(images))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attention, local = self.features(images)
        return MF.attention_pool(attention, local), attention

    def local_features(self, image: Any, *, config: ExtractionConfig | None = None):
        """Multi-scale top-n local features of one image; see :func:`mda.extract.extract_local_features`."""
        from .extract import extract_local_features
        return extract_local_features(self, image, config=config)

    # --- reduction initialisation -------------------------------------------------------------

    @torch.no_grad()
    def collect_reduction_samples(self, images: Iterable[Any], *, max_images: int = 1000,
                                  features_per_image: int = 1000, scales: tuple[float, ...] = (1.0,),
                                  max_size: int | None = 1024, progress: bool = False) -> torch.Tensor:
        """The (M, C_s) pre-reduction features that :meth:`fit_reduction` learns from: per image the
        ``features_per_image`` most attended locations over ``scales`` (as HOW). Unloadable images
        are skipped with a warning."""
        from .extract import iter_image_tensors, pyramid

        was_training = self.training
        self.eval()
        samples: list[torch.Tensor] = []
        used = 0
        try:
            for tensor in iter_image_tensors(images, max_size=max_size, skip_errors=True):
                if used >= max_images:
                    break
                used += 1
                tensor = tensor.to(self.device)
                backbone_maps = [self.backbone(resized)
                                 for _scale, resized in pyramid(tensor, scales, min_side=self.stride)]
                if backbone_maps:
                    samples.append(self.head.reduction_samples(backbone_maps, features_per_image))
                if progress and used % 50 == 0:
                    logger.info("collect_reduction_samples: %d images", used)
        finally:
            self.train(was_training)
        if not samples:
            raise ValueError("fit_reduction: no usable images (all failed to load or were too small)")
        return torch.cat(samples)

    @torch.no_grad()
    def fit_reduction(self, images: Iterable[Any], *, max_images: int = 1000, features_per_image: int = 1000,
                      scales: tuple[float, ...] = (1.0,), max_size: int | None = 1024, whiten: bool = True,
                      progress: bool = False) -> int:
        """Initialise the reduction T by PCA(-whitening) of the backbone features of ``images``.

        images: paths, PIL images, (H, W, 3) uint8 arrays, (3, H, W) / (B, 3, H, W) float tensors
        in [0, 1], or a DataLoader yielding such tensors (or (tensor, ...) tuples); see
        :meth:`collect_reduction_samples`; the PCA is :meth:`MultipleDynamicAttention.fit_reduction`.
        Returns the number of feature vectors used.
        """
        data = self.collect_reduction_samples(images, max_images=max_images, features_per_image=features_per_image,
                                              scales=scales, max_size=max_size, progress=progress)
        return self.head.fit_reduction(data, whiten=whiten)

    # --- persistence -------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write config + state dict to ``path`` atomically (temporary file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format": MODEL_FORMAT, "version": MODEL_FORMAT_VERSION,
                   "config": to_dict(self.config),
                   "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()}}
        with atomic_file(path) as temporary:
            torch.save(payload, temporary)

    @classmethod
    def load(cls, path: str | os.PathLike, *, map_location: str | torch.device = "cpu",
             backbone: nn.Module | None = None) -> "MdaModel":
        """Rebuild a model written by :meth:`save` (the backbone is built without loading weights:
        they come from the file). ``backbone`` overrides the backbone module (custom models)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"MDA model file not found: {path}")
        try:
            payload = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unpickling failure means a bad file
            raise ValueError(f"{path}: not a readable MDA model file ({error})") from error
        if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
            raise ValueError(f"{path}: not an MDA model file (format {payload.get('format') if isinstance(payload, dict) else None!r})")
        if payload.get("version") != MODEL_FORMAT_VERSION:
            raise ValueError(f"{path}: MDA model format version {payload.get('version')} is not supported "
                             f"(this code reads version {MODEL_FORMAT_VERSION}); re-save it with a matching version")
        config = MdaConfig.from_dict(payload["config"])
        if backbone is None:
            from backbones.networks import build_backbone
            # skip loading pretrained weights (they come from the file); silence the "random" notice
            backbone_logger = logging.getLogger("backbones.networks")
            level = backbone_logger.level
            backbone_logger.setLevel(logging.ERROR)
            try:
                backbone = build_backbone(config.backbone, weights="random")
            finally:
                backbone_logger.setLevel(level)
        model = cls(config, backbone=backbone)
        missing, unexpected = model.load_state_dict(payload["state_dict"], strict=False)
        if missing or unexpected:
            raise ValueError(f"{path}: state dict does not match the model built from its config "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        return model
