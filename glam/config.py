"""All GLAM settings in one place: model (`GlamConfig`) and extraction (`ExtractionConfig`)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Optional, Tuple

from backbones.networks import BackboneConfig

__all__ = ["GlamConfig", "ExtractionConfig", "ATTENTION_SWITCHES", "identity_fusion_logits"]

ATTENTION_SWITCHES = ("local_channel", "local_spatial", "global_channel", "global_spatial")


def identity_fusion_logits(identity_weight: float = 0.98) -> Tuple[float, float, float]:
    """Fusion logits (local, global, identity) whose softmax gives `identity_weight` to F and splits
    the rest equally between F_l and F_g (0.98 -> weights 0.01, 0.01, 0.98)."""
    if not 0.0 < identity_weight < 1.0:
        raise ValueError(f"identity_weight must be in (0, 1), got {identity_weight}")
    return (0.0, 0.0, math.log(2.0 * identity_weight / (1.0 - identity_weight)))


def _default_backbone() -> BackboneConfig:
    # Global descriptors pool the last map (stride 32: EfficientNet-Lite 1280 ch, ResNet layer4).
    return BackboneConfig(name="efficientnet_lite0", tap="stride32")


@dataclass
class GlamConfig:
    """GLAM model: backbone -> GLAM head -> GeM -> FC (PCA-whitening init) -> L2.

    backbone: which network / tap / weights (stride32 by default: the usual map for global pooling).
    local_channel, local_spatial, global_channel, global_spatial: the four attentions (paper ablation);
        all four off gives plain GeM on the backbone (`GlamConfig.gem_baseline`).
    conv1d_kernel_size: Conv1D size of the channel attentions; None = ECA's adaptive size from C.
    local_reduced_channels, local_dilations: C' and the dilated 3x3 convs of the local spatial attention.
    global_reduced_channels: C' of the global spatial attention's query/key/value.
    attention_scale: logit multiplier of the two global softmaxes (the seed has none: 1.0).
    fusion_init_logits: initial (local, global, identity) fusion logits; the default gives F weight
        0.98 so an untrained model behaves like GeM.
    output_dim: descriptor size (FC output).
    gem_p, gem_learn_p, gem_eps: GeM pooling.
    whitening_power: 0.5 = full PCA-whitening of the FC initialisation, 0 = PCA rotation only.
    whitening_shrinkage: added to every eigenvalue before whitening, as a fraction of the mean of
        the kept eigenvalues (the top min(output_dim, N - 1)); softens the whitening so that few
        fitting images (or weak components) are not blown up. 0 = plain whitening.
    """

    backbone: BackboneConfig = field(default_factory=_default_backbone)
    local_channel: bool = True
    local_spatial: bool = True
    global_channel: bool = True
    global_spatial: bool = True
    conv1d_kernel_size: Optional[int] = None
    local_reduced_channels: int = 256
    local_dilations: Tuple[int, ...] = (1, 2, 3)
    global_reduced_channels: int = 256
    attention_scale: float = 1.0
    fusion_init_logits: Tuple[float, float, float] = field(default_factory=identity_fusion_logits)
    output_dim: int = 512
    gem_p: float = 3.0
    gem_learn_p: bool = True
    gem_eps: float = 1e-6
    whitening_power: float = 0.5
    whitening_shrinkage: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.backbone, dict):
            self.backbone = BackboneConfig(**self.backbone)
        self.local_dilations = tuple(int(d) for d in self.local_dilations)
        self.fusion_init_logits = tuple(float(v) for v in self.fusion_init_logits)
        if len(self.fusion_init_logits) != 3:
            raise ValueError(f"fusion_init_logits needs 3 values (local, global, identity), got {self.fusion_init_logits}")
        if self.output_dim < 1:
            raise ValueError(f"output_dim must be positive, got {self.output_dim}")
        if self.conv1d_kernel_size is not None and (self.conv1d_kernel_size < 1 or self.conv1d_kernel_size % 2 == 0):
            raise ValueError(f"conv1d_kernel_size must be odd and positive (or None), got {self.conv1d_kernel_size}")

    @property
    def switches(self) -> dict:
        return {name: getattr(self, name) for name in ATTENTION_SWITCHES}

    def gem_baseline(self) -> "GlamConfig":
        """The same model with all four attentions off: backbone -> GeM -> FC -> L2."""
        return replace(self, **{name: False for name in ATTENTION_SWITCHES}, backbone=replace(self.backbone))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["local_dilations"] = list(self.local_dilations)
        out["fusion_init_logits"] = list(self.fusion_init_logits)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "GlamConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown GlamConfig fields {unknown}")
        return cls(**values)


@dataclass
class ExtractionConfig:
    """Multi-scale global extraction (cirtorch / GLAM protocol).

    scales: the image (already limited to max_size on its longer side) is resized by each factor;
        the per-scale L2-normalised descriptors are averaged, then L2-normalised again.
    max_size: longer image side before scaling.
    min_size: shorter side an image is upscaled to at least (tiny images).
    """

    scales: Tuple[float, ...] = (1.0, 1.0 / math.sqrt(2.0), 0.5)
    max_size: int = 1024
    min_size: int = 32

    def __post_init__(self) -> None:
        self.scales = tuple(float(s) for s in self.scales)
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ValueError(f"scales must be positive, got {self.scales}")
        if self.max_size < self.min_size:
            raise ValueError(f"max_size {self.max_size} < min_size {self.min_size}")

    def to_dict(self) -> dict[str, Any]:
        return {"scales": list(self.scales), "max_size": self.max_size, "min_size": self.min_size}
