"""Configuration of the MDA local-feature model and its multi-scale extraction.

All numbers of the method live here (one place); every reading of the paper that the seed leaves
open (its equations were lost, see ``shared/DESIGN.md``) is a field, so it can be switched.

* :class:`MdaConfig`: the network (backbone tap, number of heads, descriptor size, ...).
* :class:`ExtractionConfig`: test-time multi-scale pyramid and top-n selection (HOW's defaults:
  ``image_size 1024``, ``scales [2.0, 1.414, 1.0, 0.707, 0.5, 0.353, 0.25]``, ``features_num 1000``
  in ``gtolias/how`` ``examples/params/eccv20/_eval_how.yml``).

``to_dict`` / ``*.from_dict`` give plain dicts (stored inside model files and checkpoints);
:func:`save_yaml` / :func:`load_yaml` write and read them as YAML.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from backbones.networks import BackboneConfig

ATTENTION_ACTIVATIONS = ("relu", "softplus", "abs", "square")
DEFAULT_SCALES: tuple[float, ...] = (2.0, 1.414, 1.0, 0.707, 0.5, 0.353, 0.25)


@dataclass
class MdaConfig:
    """The MDA network.

    backbone: which CNN and which feature tap (stride 16 or 32) gives the map S.
    num_heads: N dynamic-attention heads; the mapped channels are split into N groups of
        floor(C_s / N) channels (the remainder is not used by any head, as in the paper).
    descriptor_dim: C_T, the size of the local descriptors L = T(S).
    attention_activation: keeps attention maps non-negative: ``relu`` | ``softplus`` | ``abs`` |
        ``square``.
    channel_mapping: the 1x1 conv that reorganises channels before grouping (initialised to the
        identity); off = groups of the raw backbone channels.
    rectify_groups: ReLU on the mapped channels before the heads. Our backbone taps are block
        outputs with signed values; rectified channels make ``sum_c g[c] F[c]`` a feature-strength
        (L1-norm-like) map, as HOW's attention on ReLU features. Off = the literal formula.
    indicator_init: the indicator conv starts with zero weights and this bias times 1/C_group, so
        g = indicator_init / C_group for every channel (the map starts as the channel mean).
    indicator_init_std: std of the small random weights added to break the heads' symmetry.
    smoothing_kernel: HOW's 3x3 average smoothing of S before the reduction T (0 or 1 = off).
    """

    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(tap="stride16"))
    num_heads: int = 4
    descriptor_dim: int = 128
    attention_activation: str = "relu"
    channel_mapping: bool = True
    rectify_groups: bool = True
    indicator_init: float = 1.0
    indicator_init_std: float = 1e-3
    smoothing_kernel: int = 3

    def __post_init__(self) -> None:
        if isinstance(self.backbone, Mapping):
            self.backbone = BackboneConfig(**self.backbone)
        if self.num_heads < 1:
            raise ValueError(f"MdaConfig.num_heads must be >= 1, got {self.num_heads}")
        if self.descriptor_dim < 1:
            raise ValueError(f"MdaConfig.descriptor_dim must be >= 1, got {self.descriptor_dim}")
        if self.attention_activation not in ATTENTION_ACTIVATIONS:
            raise ValueError(f"MdaConfig.attention_activation must be one of {ATTENTION_ACTIVATIONS}, "
                             f"got {self.attention_activation!r}")
        if self.smoothing_kernel < 0 or (self.smoothing_kernel > 1 and self.smoothing_kernel % 2 == 0):
            raise ValueError(f"MdaConfig.smoothing_kernel must be 0, 1 or odd, got {self.smoothing_kernel}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MdaConfig":
        return _from_dict(cls, data)


@dataclass
class ExtractionConfig:
    """Test-time local feature extraction.

    scales: image pyramid (relative to the image after the ``max_size`` downscale).
    max_size: the image's longer side is first downscaled to at most this (None = keep).
    top_n: number of local features kept per image over all heads and scales.
    unique_locations: a location (scale, y, x) is kept once, scored by its strongest head (the
        head recorded); False = rank every (head, location) value, so one location can be kept
        once per head (the paper's literal "rank all heads' attention values together").
    min_feature_side: a scale whose feature map would be smaller than this on a side is skipped.
    border_cells: feature-map cells closer than this to the map's edge are not selected (their
        receptive fields run into the zero padding, and such cells of unrelated images look alike).
    """

    scales: tuple[float, ...] = DEFAULT_SCALES
    max_size: int | None = 1024
    top_n: int = 1000
    unique_locations: bool = True
    min_feature_side: int = 1
    border_cells: int = 0

    def __post_init__(self) -> None:
        self.scales = tuple(float(s) for s in self.scales)
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ValueError(f"ExtractionConfig.scales must be positive numbers, got {self.scales}")
        if self.top_n < 1:
            raise ValueError(f"ExtractionConfig.top_n must be >= 1, got {self.top_n}")
        if self.border_cells < 0:
            raise ValueError(f"ExtractionConfig.border_cells must be >= 0, got {self.border_cells}")
        if self.max_size is not None and self.max_size < 1:
            raise ValueError(f"ExtractionConfig.max_size must be >= 1 or None, got {self.max_size}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ExtractionConfig":
        return _from_dict(cls, data)


def to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as a plain (YAML/torch.save friendly) dict; tuples become lists."""
    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        return value
    return plain(config)


def _from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    return cls(**dict(data))


def save_yaml(path: str | os.PathLike, **configs: Any) -> None:
    """Write configs as one YAML document, e.g. ``save_yaml(p, model=cfg, extraction=ext)``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump({k: to_dict(v) for k, v in configs.items()}, sort_keys=False))
    os.replace(tmp, path)


_SECTIONS = {"model": MdaConfig, "extraction": ExtractionConfig}


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML written by :func:`save_yaml`; sections ``model``, ``extraction``
    become their dataclasses (missing keys take the defaults), other sections stay dicts."""
    path = Path(path)
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        cls = _SECTIONS.get(key)
        try:
            out[key] = cls.from_dict(value or {}) if cls is not None else value
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: section {key!r}: {error}") from error
    return out
