"""The retrieval model: ONE backbone carrying both heads, as DELG carries its global and local heads.

::

    image level (B, 3, H, W) ─► backbone, one forward ─┬─ stride-16 map ─► MDA head ─► attention (B, N, h, w),
                                                        │                              local (B, C_T, h, w)
                                                        └─ stride-32 map ─► GLAM head ─► GeM ─► FC ─► L2 global (B, D)

(ResNet-50/101: layer3 / layer4.) The heads are the very modules :class:`mda.MdaModel` and
:class:`glam.GlamModel` use (:class:`mda.model.MultipleDynamicAttention`,
:class:`glam.model.GlamDescriptorHead`), so a model trained here and either model alone share code.

One model file holds the config and the weights of the backbone and both heads, with a format
version and the model's sha256 (:func:`model_hash`: config + every tensor), loaded with
``torch.load(weights_only=True)`` (no code is unpickled). The hash identifies the features the
model produces: codebooks record it, feature stores are keyed by it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from asmk_index.persistence import atomic_file
from backbones.networks import TAPS, Backbone, BackboneConfig, build_backbone
from glam.config import GlamConfig
from glam.model import GlamDescriptorHead
from mda import functional as MF
from mda.config import MdaConfig, to_dict
from mda.model import MultipleDynamicAttention

logger = logging.getLogger(__name__)

MODEL_FORMAT = "retrieval-model"
MODEL_FORMAT_VERSION = 1


@dataclass
class NetworkConfig:
    """The retrieval model: which backbone, which taps feed which head, the two heads' settings.

    backbone: name, weights, freeze_bn, train_layers (its ``tap`` is set to the deeper of the two
        taps: the backbone is built up to there).
    local_tap, global_tap: the maps of the MDA head and of the GLAM head (stride16 / stride32).
    mda, glam: the heads' settings (their ``backbone`` fields are derived from the ones above, so
        ``mda.MdaModel(config.mda)`` / ``glam.GlamModel(config.glam)`` build the same parts alone).
    """

    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(tap="stride32"))
    local_tap: str = "stride16"
    global_tap: str = "stride32"
    mda: MdaConfig = field(default_factory=MdaConfig)
    glam: GlamConfig = field(default_factory=GlamConfig)

    def __post_init__(self) -> None:
        if isinstance(self.backbone, Mapping):
            self.backbone = BackboneConfig(**self.backbone)
        if isinstance(self.mda, Mapping):
            self.mda = MdaConfig.from_dict(self.mda)
        if isinstance(self.glam, Mapping):
            self.glam = GlamConfig.from_dict(dict(self.glam))
        for name in ("local_tap", "global_tap"):
            if getattr(self, name) not in TAPS:
                raise ValueError(f"NetworkConfig.{name} must be one of {list(TAPS)}, got {getattr(self, name)!r}")
        deepest = max((self.local_tap, self.global_tap), key=TAPS.__getitem__)
        if self.backbone.tap != deepest:
            self.backbone = replace(self.backbone, tap=deepest)
        if self.mda.backbone != replace(self.backbone, tap=self.local_tap):
            self.mda = replace(self.mda, backbone=replace(self.backbone, tap=self.local_tap))
        if self.glam.backbone != replace(self.backbone, tap=self.global_tap):
            self.glam = replace(self.glam, backbone=replace(self.backbone, tap=self.global_tap))

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "NetworkConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"NetworkConfig: unknown key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**dict(values))


@dataclass
class LevelOutput:
    """What one pyramid level gives: MDA attention (B, N, h, w), local descriptor maps (B, C_T, h, w)
    (not normalised), the GLAM pooled descriptor before the FC (B, C) and the global descriptor
    (B, D) L2-normalised."""

    attention: torch.Tensor
    local: torch.Tensor
    pooled: torch.Tensor
    global_descriptor: torch.Tensor

    def head_descriptors(self) -> torch.Tensor:
        """The MDA heads' attention-pooled descriptors G (B, N, C_T), L2-normalised (training)."""
        return MF.attention_pool(self.attention, self.local)


class RetrievalNet(nn.Module):
    """One backbone, the MDA head on ``local_tap`` and the GLAM head on ``global_tap``.

    ``forward(images (B, 3, H, W) RGB in [0, 1]) -> LevelOutput`` from one backbone forward.
    ``backbone``: an already built backbone (it must reach both taps) instead of building one.
    """

    def __init__(self, config: NetworkConfig | None = None, *, backbone: Backbone | None = None):
        super().__init__()
        self.config = config if config is not None else NetworkConfig()
        self.backbone = backbone if backbone is not None else build_backbone(self.config.backbone)
        channels = self.backbone.tap_channels
        for tap in (self.config.local_tap, self.config.global_tap):
            if tap not in channels:
                raise ValueError(f"the backbone ({self.backbone.config.name} up to {self.backbone.config.tap}) "
                                 f"has no {tap} map")
        self.local_head = MultipleDynamicAttention(channels[self.config.local_tap], self.config.mda)
        self.global_head = GlamDescriptorHead(channels[self.config.global_tap], self.config.glam)
        self.loaded_hash: str | None = None  # the verified hash of the file it was loaded from

    # ------------------------------------------------------------------ properties
    @property
    def local_stride(self) -> int:
        return TAPS[self.config.local_tap]

    @property
    def descriptor_dim(self) -> int:
        """Size of the local descriptors."""
        return self.local_head.descriptor_dim

    @property
    def global_dim(self) -> int:
        return self.global_head.output_dim

    @property
    def device(self) -> torch.device:
        return self.global_head.fc.weight.device

    @property
    def is_fitted(self) -> bool:
        """Whether the MDA reduction and the GLAM FC were fitted (PCA-whitening) or trained."""
        return bool(self.local_head.reduction_fitted) and bool(self.global_head.whitening_fitted)

    # ------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor) -> LevelOutput:
        return self.heads(self.backbone.forward_taps(images))

    def heads(self, taps: Mapping[str, torch.Tensor]) -> LevelOutput:
        """Both heads on the backbone maps ``{tap: (B, C, h, w)}`` (e.g. cached maps in training)."""
        attention, local = self.local_head(taps[self.config.local_tap])
        pooled = self.global_head.pooled(taps[self.config.global_tap])
        return LevelOutput(attention, local, pooled, self.global_head.project(pooled))

    def train(self, mode: bool = True) -> "RetrievalNet":
        """nn.Module.train; the backbone keeps its frozen stages / BatchNorms in eval mode."""
        super().train(mode)
        self.backbone.train(mode)
        return self

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def fit_to_images(self, images: Iterable[torch.Tensor], *, scales: tuple[float, ...],
                      features_per_image: int, border_cells: int = 0) -> int:
        """Learn the MDA reduction (PCA-whitening of the most attended pre-reduction features) and
        the GLAM FC (PCA-whitening of the pooled descriptors at every scale) from the user's own
        images, one backbone forward per image and scale (as HOW initialises its reduction).

        images: (1, 3, H, W) float tensors in [0, 1] (already at the extraction's max size).
        ``border_cells``: as the extraction's (the reduction learns from the cells it selects).
        Returns the number of images used.
        """
        from mda.extract import pyramid

        was_training = self.training
        self.eval()
        local_samples, pooled, used = [], [], 0
        try:
            for image in images:
                local_maps = []
                for _scale, resized in pyramid(image.to(self.device), scales):
                    taps = self.backbone.forward_taps(resized)
                    local_map = taps[self.config.local_tap]
                    if min(local_map.shape[-2:]) >= 1 and min(resized.shape[-2:]) >= self.local_stride:
                        local_maps.append(local_map)
                    pooled.append(self.global_head.pooled(taps[self.config.global_tap]).float().cpu())
                if local_maps:
                    local_samples.append(self.local_head.reduction_samples(local_maps, features_per_image,
                                                                               border_cells=border_cells))
                used += 1
        finally:
            self.train(was_training)
        if not local_samples:
            raise ValueError("no usable image to initialise the model from (all failed to load or were too small)")
        self.local_head.fit_reduction(torch.cat(local_samples))
        self.global_head.fit_whitening_from_descriptors(torch.cat(pooled))
        logger.info("model fitted to %d images", used)
        return used

    # ------------------------------------------------------------------ persistence
    def model_hash(self) -> str:
        """sha256 of the config and every tensor of the state dict (see :func:`model_hash`)."""
        return model_hash(self.config.to_dict(), self.state_dict())

    def save(self, path: str | os.PathLike) -> str:
        """Write the model file atomically; returns its hash."""
        state_dict = {name: tensor.detach().cpu().contiguous() for name, tensor in self.state_dict().items()}
        config = self.config.to_dict()
        digest = model_hash(config, state_dict)
        payload = {"format": MODEL_FORMAT, "version": MODEL_FORMAT_VERSION, "config": config,
                   "state_dict": state_dict, "sha256": digest}
        with atomic_file(path) as temporary:
            torch.save(payload, temporary)
        return digest

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RetrievalNet":
        """Read a model file written by :meth:`save` (on the CPU; move it with ``.to(device)``).

        Raises FileNotFoundError, or ValueError naming the file when it is not a model file, of
        another format version, or corrupt (its tensors do not give the stored hash).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - zip, unpickling or refused-type errors: a bad file
            raise ValueError(f"{path}: not a readable model file ({error})") from None
        if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
            raise ValueError(f"{path}: not a retrieval model file (written by RetrievalNet.save, e.g. by "
                             "pipelines/train.py or pipelines/build_codebook.py)")
        if payload.get("version") != MODEL_FORMAT_VERSION:
            raise ValueError(f"{path}: model format version {payload.get('version')} is not supported (this "
                             f"code reads version {MODEL_FORMAT_VERSION})")
        try:
            config = NetworkConfig.from_dict(payload["config"])
            state_dict = payload["state_dict"]
            stored_hash = str(payload["sha256"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: corrupt model file ({error})") from None
        if model_hash(payload["config"], state_dict) != stored_hash:
            raise ValueError(f"{path}: corrupt model file: its weights do not match the hash stored with them")
        model = cls(config, backbone=_unloaded_backbone(config.backbone))
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path}: the weights do not fit the model built from its config "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        model.loaded_hash = stored_hash
        return model.eval()


def _unloaded_backbone(config: BackboneConfig) -> Backbone:
    """The backbone of ``config`` without reading any weights (they come from a model file)."""
    backbone_logger = logging.getLogger("backbones.networks")
    previous, backbone_logger.disabled = backbone_logger.disabled, True
    try:
        return build_backbone(config, weights="random")
    finally:
        backbone_logger.disabled = previous


def model_hash(config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a model: its config (canonical JSON, without the backbone's weights source, since
    the weights are in the state dict, nor its training-only switches) and every tensor (name,
    dtype, shape, bytes) in name order."""
    config = json.loads(json.dumps(dict(config), sort_keys=True))
    for section in (config, config.get("mda", {}), config.get("glam", {})):
        if isinstance(section.get("backbone"), dict):
            for training_only in ("weights", "train_layers", "freeze_bn"):
                section["backbone"].pop(training_only, None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


__all__ = ["NetworkConfig", "RetrievalNet", "LevelOutput", "model_hash", "MODEL_FORMAT", "MODEL_FORMAT_VERSION"]
