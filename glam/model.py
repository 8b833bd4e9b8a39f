"""GlamModel: backbone -> GLAM head -> GeM -> FC (PCA-whitening init) -> L2 global descriptor."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional, Union

import torch
from torch import nn

from asmk_index.persistence import atomic_file
from backbones.layers import GeM, init_linear_from_pca, l2n, learn_pca_whitening
from backbones.networks import Backbone, BackboneConfig, build_backbone
from glam.config import ExtractionConfig, GlamConfig
from glam.modules import GlamHead

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["GlamModel", "GlamDescriptorHead", "MODEL_FORMAT", "MODEL_VERSION"]

MODEL_FORMAT = "glam-global-descriptor"
MODEL_VERSION = 2  # 2: the head parts live under descriptor_head.*


class GlamDescriptorHead(nn.Module):
    """Backbone map -> global descriptor: GLAM attention F_gl -> GeM -> FC (PCA-whitening init) -> L2.

    (B, C, h, w) -> (B, D). Shared by :class:`GlamModel` and the one-backbone retrieval model.
    Untrained it behaves like GeM: the fusion gives the identity path weight 0.98, and
    :meth:`fit_whitening_from_descriptors` sets the FC to a PCA-whitening learned from pooled
    descriptors of the user's images.
    """

    def __init__(self, channels: int, config: GlamConfig):
        super().__init__()
        if config.output_dim > channels:
            raise ValueError(
                f"output_dim {config.output_dim} exceeds the backbone's {channels} channels "
                f"({config.backbone.name} {config.backbone.tap}); use output_dim <= {channels}")
        self.config = config
        self.attention = GlamHead(
            channels,
            **config.switches,
            kernel_size=config.conv1d_kernel_size,
            local_reduced_channels=config.local_reduced_channels,
            dilations=config.local_dilations,
            global_reduced_channels=config.global_reduced_channels,
            attention_scale=config.attention_scale,
            fusion_init_logits=config.fusion_init_logits,
        )
        self.pool = GeM(config.gem_p, learn_p=config.gem_learn_p, eps=config.gem_eps)
        self.fc = nn.Linear(channels, config.output_dim)
        with torch.no_grad():  # before whitening: a distance-preserving random projection
            nn.init.orthogonal_(self.fc.weight)
            self.fc.bias.zero_()
        self.register_buffer("whitening_fitted", torch.tensor(False))

    @property
    def output_dim(self) -> int:
        return self.config.output_dim

    def pooled(self, feature_map: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) backbone map -> GeM of F_gl (B, C), before the FC."""
        return self.pool(self.attention(feature_map))

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, C) pooled -> (B, D) FC + L2."""
        return l2n(self.fc(pooled))

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.project(self.pooled(feature_map))

    @torch.no_grad()
    def fit_whitening_from_descriptors(self, pooled: Union[torch.Tensor, "np.ndarray"]) -> None:
        """Set the FC to the PCA-whitening of pooled (pre-FC) descriptors (N, C).

        Each kept eigenvalue gets whitening_shrinkage x (mean of the kept eigenvalues) added before
        the division (so a handful of images cannot collapse onto a simplex); whitening_power 0.5
        whitens, 0 only rotates.
        """
        features = torch.as_tensor(pooled).detach().cpu().double()
        if features.dim() != 2 or features.shape[1] != self.fc.in_features:
            raise ValueError(f"pooled descriptors must be (N, {self.fc.in_features}), got {tuple(features.shape)}")
        if features.shape[0] < 2:
            raise ValueError("fit_whitening needs at least 2 descriptors (images x scales)")
        if features.shape[0] < self.output_dim:
            logger.warning("fit_whitening: %d descriptors for %d output dims; components beyond the "
                           "data's rank are regularised by whitening_shrinkage", features.shape[0], self.output_dim)
        # Regulariser: whitening_shrinkage x the mean of the eigenvalues the FC keeps (at most N - 1
        # carry variance), so with few images the whitening softens instead of collapsing them.
        centred = features - features.mean(dim=0)
        eigenvalues = torch.linalg.svdvals(centred).square() / features.shape[0]  # descending
        kept = min(self.output_dim, features.shape[0] - 1)
        reference = float(eigenvalues[:kept].mean())
        power = self.config.whitening_power
        weight, bias = learn_pca_whitening(
            features, self.output_dim, whiten=power > 0, power=power,
            eps=max(self.config.whitening_shrinkage * reference, 1e-12),
        )
        init_linear_from_pca(self.fc, weight, bias)
        self.whitening_fitted.fill_(True)


class GlamModel(nn.Module):
    """Global descriptor network: (B, 3, H, W) RGB in [0, 1] -> (B, output_dim) L2-normalised.

    backbone (B, C, h, w) -> :class:`GlamDescriptorHead` (GLAM F_gl -> GeM -> FC -> L2). With all
    four attentions off (`GlamConfig().gem_baseline()`) it *is* backbone + GeM + FC + L2.

    Args:
        config: GlamConfig (default: EfficientNet-Lite0 stride32, all attentions on, 512-d).
        backbone: an already built backbone to use instead of building `config.backbone`.
    """

    def __init__(self, config: Optional[GlamConfig] = None, *, backbone: Optional[Backbone] = None):
        super().__init__()
        self.config = config = config or GlamConfig()
        self.backbone = backbone if backbone is not None else build_backbone(config.backbone)
        self.descriptor_head = GlamDescriptorHead(self.backbone.out_channels, config)

    # the descriptor head's parts, by their usual names
    head = property(lambda self: self.descriptor_head.attention)
    pool = property(lambda self: self.descriptor_head.pool)
    fc = property(lambda self: self.descriptor_head.fc)
    whitening_fitted = property(lambda self: self.descriptor_head.whitening_fitted)

    @classmethod
    def gem_baseline_of(cls, model: "GlamModel") -> "GlamModel":
        """Plain GeM on the *same* backbone instance (all attentions off, same GeM p and FC init)."""
        baseline = cls(model.config.gem_baseline(), backbone=model.backbone)
        baseline.pool.load_state_dict(model.pool.state_dict())
        baseline.fc.load_state_dict(model.fc.state_dict())
        baseline.whitening_fitted.copy_(model.whitening_fitted)
        return baseline.train(model.training)

    # ---------------------------------------------------------------------------------- forward
    @property
    def device(self) -> torch.device:
        return self.fc.weight.device

    @property
    def output_dim(self) -> int:
        return self.config.output_dim

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> fused GLAM map F_gl (B, C, h, w)."""
        return self.head(self.backbone(images))

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> GeM of F_gl (B, C), before the FC."""
        return self.descriptor_head.pooled(self.backbone(images))

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, C) pooled -> (B, D) FC + L2."""
        return self.descriptor_head.project(pooled)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.descriptor_head(self.backbone(images))

    # ---------------------------------------------------------------------------------- whitening
    @torch.no_grad()
    def fit_whitening(
        self,
        images: Union[str, os.PathLike, Iterable[Any]],
        *,
        max_images: int = 1000,
        extraction: Optional[ExtractionConfig] = None,
        device: Union[str, torch.device, None] = None,
        progress: bool = False,
        seed: int = 0,
    ) -> int:
        """Set the FC to a PCA-whitening of GeM descriptors from (a sample of) the user's images.

        Every image contributes its pooled (pre-FC) descriptor at each extraction scale, so the FC
        is fitted to the vectors it will see at extraction time.

        Args:
            images: a folder, a list of image paths / PIL images / uint8 arrays / (3, H, W) tensors,
                or an iterable (e.g. a DataLoader) of such items or of (B, 3, H, W) batches.
            max_images: sample at most this many (a random, seeded subset of a list / folder).
            extraction: scales and max size (default ExtractionConfig()).
        Returns:
            the number of images used. Unreadable images are skipped with a warning.
        """
        from glam.extract import iter_pooled_descriptors

        extraction = extraction or ExtractionConfig()
        was_training = self.training
        self.eval()
        if device is not None:
            self.to(device)
        try:
            vectors, used = [], 0
            for pooled in iter_pooled_descriptors(self, images, extraction, max_images=max_images,
                                                  progress=progress, seed=seed):
                vectors.append(pooled.cpu())
                used += 1
        finally:
            self.train(was_training)
        if not vectors:
            raise ValueError("fit_whitening: no readable image among the inputs")
        self.fit_whitening_from_descriptors(torch.cat(vectors))
        logger.info("fit_whitening: %d images", used)
        return used

    def fit_whitening_from_descriptors(self, pooled: Union[torch.Tensor, "np.ndarray"]) -> None:
        """See :meth:`GlamDescriptorHead.fit_whitening_from_descriptors`."""
        self.descriptor_head.fit_whitening_from_descriptors(pooled)

    # ---------------------------------------------------------------------------------- persistence
    def checkpoint(self) -> dict[str, Any]:
        """The dict `save` writes: format, version, config, state_dict."""
        return {"format": MODEL_FORMAT, "version": MODEL_VERSION, "config": self.config.to_dict(),
                "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()}}

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write config + weights atomically (temporary file in the same folder, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as temporary:
            torch.save(self.checkpoint(), temporary)
        return path

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any], source: str = "checkpoint") -> "GlamModel":
        """Rebuild a model from `checkpoint()`'s dict (the backbone's weights come from it too)."""
        if not isinstance(checkpoint, dict) or checkpoint.get("format") != MODEL_FORMAT:
            raise ValueError(f"{source} is not a GLAM model file (format {MODEL_FORMAT!r} expected)")
        if checkpoint.get("version") != MODEL_VERSION:
            raise ValueError(f"{source} has GLAM model format version {checkpoint.get('version')}, this code "
                             f"reads version {MODEL_VERSION}; re-export the model with this version")
        config = GlamConfig.from_dict(dict(checkpoint["config"]))
        # the stored state_dict holds the backbone's weights: build it without loading any file
        stored_backbone = config.backbone
        config.backbone = BackboneConfig(**{**stored_backbone.to_dict(), "weights": "random"})
        backbone_logger = logging.getLogger("backbones.networks")  # silence its 'random init' warning
        previous, backbone_logger.disabled = backbone_logger.disabled, True
        try:
            model = cls(config)
        finally:
            backbone_logger.disabled = previous
        model.config.backbone = stored_backbone
        missing, unexpected = model.load_state_dict(checkpoint["state_dict"], strict=False)
        if missing or unexpected:
            raise ValueError(f"{source}: weights do not fit the stored config (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]})")
        return model

    @classmethod
    def load(cls, path: Union[str, os.PathLike], map_location: Union[str, torch.device, None] = "cpu") -> "GlamModel":
        """Load a model written by `save`. Raises FileNotFoundError / ValueError with the file's name."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"GLAM model file not found: {path}")
        try:
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as error:
            raise ValueError(f"cannot read GLAM model file {path}: {error}") from None
        model = cls.from_checkpoint(checkpoint, str(path))
        return model.eval()

