"""One place for every setting of the retrieval system, with YAML load/save (``--config FILE``).

:class:`SystemConfig` nests the network config (``retrieval.network.NetworkConfig``: backbone,
MDA and GLAM heads), the extraction settings shared by indexing and querying, the codebook and
ASMK* parameters and the search defaults; ``model`` names a trained model file to start from. A
YAML file only needs the keys it changes::

    model: runs/my_model/model.pt          # a trained model (pipelines/train.py); omit: ImageNet start
    extraction: {max_size: 512, scales: [1.0, 0.707]}
    codebook: {size: 4096}
    asmk: {alpha: 3.0}
    network: {mda: {num_heads: 4}, glam: {whitening_power: 0.0}}
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import yaml

from asmk_index.asmk import AsmkParams
from asmk_index.fusion import RULES as FUSION_RULES
from asmk_index.fusion import Fusion
from asmk_index.two_stage import MODES as SEARCH_MODES, VERIFIED_EXPANSION_INLIERS
from asmk_index.verification import VerificationConfig

from .network import NetworkConfig

PRECISIONS = ("float32", "mixed")
PRESET_DIRECTORY = Path(__file__).resolve().parent / "presets"
#: named configurations (YAML files of retrieval/presets/): "fast" for CPUs, "accurate" close to
#: the papers' settings; costs and figures in the README
PRESETS = {path.stem: path for path in sorted(PRESET_DIRECTORY.glob("*.yaml"))}


@dataclass
class ExtractionConfig:
    """How images are read and turned into features (the same for database images and queries).

    max_size: longest image side in pixels after loading (images are never upscaled).
    scales: image pyramid scales for the multi-scale extraction.
    top_n: local features kept per image (top attention over all scales).
    border_cells: local features are not taken from feature-map cells closer than this to the
        map's edge (at most a quarter of a small map's side): cells whose receptive field runs
        into the zero padding match across unrelated images.
    device: "auto" (cuda when present, else cpu), "cpu", "cuda" or "cuda:N".
    precision: "float32", or "mixed": bfloat16 autocast on CPUs with native bfloat16
        (AVX512-BF16 / AMX; float32 elsewhere), float16 autocast on CUDA.
    channels_last: run the network in channels-last memory format (faster convolutions on CPU
        and on GPU tensor cores; the same features up to float rounding).
    batch_size: up to this many equal-size images share each forward (one per pyramid level).
    """
    max_size: int = 512
    scales: tuple[float, ...] = (1.414, 1.0, 0.7071)
    top_n: int = 500
    border_cells: int = 2
    device: str = "auto"
    precision: str = "float32"
    channels_last: bool = True
    batch_size: int = 1

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"extraction.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.batch_size < 1 or self.top_n < 1 or self.max_size < 1:
            raise ValueError("extraction.batch_size, top_n and max_size must be >= 1")
        if not self.scales or any(scale <= 0 for scale in self.scales):
            raise ValueError(f"extraction.scales must be positive numbers, got {self.scales}")
        if self.border_cells < 0:
            raise ValueError(f"extraction.border_cells must be >= 0, got {self.border_cells}")

    def feature_settings(self) -> dict:
        """What the features depend on (not where or how fast they are computed): the key of a
        feature store together with the model's hash."""
        return {"max_size": self.max_size, "scales": [float(s) for s in self.scales],
                "top_n": self.top_n, "border_cells": self.border_cells, "precision": self.precision}


@dataclass
class CodebookConfig:
    """k-means codebook training.

    size: the most visual words (what a large collection gets).
    min_descriptors_per_word: the codebook of a smaller collection gets descriptors / this many
        words: its size grows with the collection up to ``size`` (``size_for``).
    max_training_descriptors: descriptors sampled from the collection for k-means.
    fit_images: images sampled to learn the MDA reduction PCA and the GLAM whitening.
    seed: the sample of those images, the heads' random initial weights (so the same photos give
        the same model) and k-means.
    """
    size: int = 65536
    min_descriptors_per_word: int = 1000
    max_training_descriptors: int = 2_000_000
    fit_images: int = 200
    seed: int = 0

    def size_for(self, n_descriptors: int, requested: int | None = None) -> int:
        """Words to train for ``n_descriptors`` training descriptors (``requested`` or ``size``, capped)."""
        requested = int(requested or self.size)
        cap = max(2, n_descriptors // self.min_descriptors_per_word)
        return max(2, min(requested, cap))


# ASMK* parameters: the engine's own dataclass, one definition for the index and the config.
AsmkConfig = AsmkParams


FUSIONS = FUSION_RULES + ("asmk", "global")
# the search's inlier threshold: the fusion weighs inlier counts, so it only drops fits too small to
# mean anything (VerificationConfig's own default is the stricter threshold of a yes / no answer)
FUSED_MIN_INLIERS = 5


@dataclass
class SearchConfig:
    """Defaults of the search (each can also be given per search).

    mode: "two_stage" (stage 1 global shortlist, stage 2 ASMK*, stage 3 spatial verification,
        fused), "asmk" (ASMK* over the whole collection) or "global" (global descriptors only).
    shortlist: images stage 1 hands to stages 2 and 3.
    asmk_shortlist: the ASMK* top m over the whole collection that join the shortlist (images
        the global descriptor misses; 0: the global shortlist alone).
    fusion: how the stages rank the shortlist: "adaptive", "minmax", "zscore" or "rrf" (rules that do not
        depend on the scales of the scores, :mod:`asmk_index.fusion`, with the three weights), or
        "asmk" / "global" (one stage decides; verified images first when stage 3 runs).
    global_weight, asmk_weight, inlier_weight: the fusion rule's weights of the global
        similarity, the ASMK* score and the inlier score of the verified images (their inliers
        weighed by ``verification.inlier_weighting``).
    verify_top: R, the top R of the fused shortlist are spatially verified (0: no stage 3).
    verification: stage 3's matching and robust fit (:class:`asmk_index.verification.VerificationConfig`).
    query_expansion, qe_alpha: alpha-QE of the global query over its top results (0: off).
    dba_neighbors, dba_alpha: alpha-DBA of the indexed global descriptors (0: off); computed
        once per loaded index (an exact all-pairs search of the global descriptors).
    verified_expansion, verified_expansion_inliers: verified query expansion (with stage 3):
        the images among the top ``verified_expansion`` of the verified ranking with at least
        ``verified_expansion_inliers`` inliers are averaged with the global query, and the
        shortlist is ranked again with its new global scores (0: off;
        :mod:`asmk_index.two_stage`).
    """
    k: int = 10
    shortlist: int = 300
    asmk_shortlist: int = 150
    mode: str = "two_stage"
    global_method: str = "exact"
    fusion: str = "minmax"
    global_weight: float = 1.0
    asmk_weight: float = 4.0
    inlier_weight: float = 4.0
    verify_top: int = 100
    verification: VerificationConfig = field(
        default_factory=lambda: VerificationConfig(min_inliers=FUSED_MIN_INLIERS))
    query_expansion: int = 2
    qe_alpha: float = 3.0
    dba_neighbors: int = 2
    dba_alpha: float = 3.0
    verified_expansion: int = 20
    verified_expansion_inliers: int = VERIFIED_EXPANSION_INLIERS

    def __post_init__(self) -> None:
        if self.mode not in SEARCH_MODES:
            raise ValueError(f"search.mode must be one of {SEARCH_MODES}, got {self.mode!r}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"search.fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if (min(self.k, self.shortlist, self.verified_expansion_inliers) < 1
                or min(self.verify_top, self.query_expansion, self.dba_neighbors, self.verified_expansion,
                       self.asmk_shortlist) < 0):
            raise ValueError("search.k, shortlist and verified_expansion_inliers must be >= 1; verify_top, "
                             "query_expansion, dba_neighbors, verified_expansion and asmk_shortlist >= 0")

    def ranking(self, fusion: str | None = None) -> str | Fusion:
        """The ``fusion`` argument of ``TwoStageIndex.search`` for a fusion name (default: the
        config's): a :class:`Fusion` rule with the configured weights, or "asmk" / "global"."""
        fusion = self.fusion if fusion is None else fusion
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        if fusion in FUSION_RULES:
            return Fusion(rule=fusion, global_weight=self.global_weight, asmk_weight=self.asmk_weight,
                          inlier_weight=self.inlier_weight)
        return fusion


GLOBAL_LOSSES = ("auto", "arcface", "contrastive", "none")
LOCAL_LOSSES = ("contrastive", "none")


@dataclass
class TrainConfig:
    """Training the retrieval model (``pipelines/train.py``, :mod:`retrieval.training`).

    Every batch holds ``batch_size // 2`` pairs of images of one class (labelled data: two photos
    of the class, or one photo twice; unlabelled data: one photo twice), each image augmented.

    global_loss: "arcface" (labelled), "contrastive" (pairs + hardest in-batch negatives; the
        two-view loss on unlabelled data), "auto" (arcface when labelled, else contrastive) or
        "none" (the GLAM head is not trained).
    local_loss: "contrastive" (per MDA head, on the attention-pooled descriptors, with hardest
        in-batch negatives) plus ``diversity_weight`` x the Hellinger diversity penalty, or "none".
    global_weight, local_weight: weights of the two heads' losses in the total.
    trainable_stages: backbone stages trained, counted from the top (None: all; 0: frozen).
    cache_backbone: with a frozen backbone, compute its maps once (``views_per_image`` augmented
        views per image) and train the heads on them.
    fit_images: a new model first learns its reduction / whitening from this many training images.
    amp: float16 autocast on CUDA.
    """
    global_loss: str = "auto"
    local_loss: str = "contrastive"
    global_weight: float = 1.0
    local_weight: float = 1.0
    diversity_weight: float = 1.0
    arcface_scale: float = 30.0
    arcface_margin: float = 0.15
    global_margin: float = 0.7
    local_margin: float = 0.8
    trainable_stages: int | None = 0
    cache_backbone: bool = True
    views_per_image: int = 4
    epochs: int = 10
    batch_size: int = 32
    image_size: int = 256
    optimizer: str = "adam"
    lr: float = 1e-4
    backbone_lr_scale: float = 0.1
    weight_decay: float = 1e-6
    momentum: float = 0.9
    warmup_epochs: float = 0.5
    grad_clip_norm: float = 10.0
    fit_images: int = 200
    amp: bool = True
    num_workers: int = 2
    seed: int = 0
    log_every: int = 20
    checkpoint_every: int = 0

    def __post_init__(self) -> None:
        if self.global_loss not in GLOBAL_LOSSES:
            raise ValueError(f"train.global_loss must be one of {GLOBAL_LOSSES}, got {self.global_loss!r}")
        if self.local_loss not in LOCAL_LOSSES:
            raise ValueError(f"train.local_loss must be one of {LOCAL_LOSSES}, got {self.local_loss!r}")
        if self.global_loss == "none" and self.local_loss == "none":
            raise ValueError("train: global_loss and local_loss are both 'none': nothing to train")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"train.optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.batch_size < 4 or self.batch_size % 2:
            raise ValueError(f"train.batch_size must be even and >= 4 (pairs with in-batch negatives), "
                             f"got {self.batch_size}")
        if self.trainable_stages is not None and self.trainable_stages < 0:
            raise ValueError(f"train.trainable_stages must be >= 0 or null, got {self.trainable_stages}")
        if self.views_per_image < 1 or self.epochs < 1:
            raise ValueError("train.views_per_image and train.epochs must be >= 1")


@dataclass
class SystemConfig:
    """Everything the system needs to build a codebook, index images and search them.

    The defaults are the "fast" preset (``presets/fast.yaml``, a test keeps the two equal): the
    extraction, codebook, ASMK* and search settings were chosen on the development photos only
    (``benchmarks/defaults.py``: ukbench-dev and grocery-dev, every other object's queries).

    model: a trained model file (``pipelines/train.py``) to start from; None = a new model of
        ``network`` with packaged ImageNet weights, its reduction and whitening learned from the
        collection (PCA-whitening).
    """
    model: str | None = None
    extraction: ExtractionConfig = field(default_factory=ExtractionConfig)
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    asmk: AsmkConfig = field(default_factory=AsmkConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    # ----------------------------------------------------------------- dict / YAML
    def to_dict(self) -> dict:
        return _to_plain(self)

    @classmethod
    def from_dict(cls, values: Mapping | None) -> "SystemConfig":
        """Build a config from (possibly partial) nested dicts; unknown keys are an error."""
        return _update(cls(), dict(values or {}), "config")

    def updated(self, values: Mapping) -> "SystemConfig":
        """A copy with the (partial, nested) ``values`` applied."""
        return _update(dataclasses.replace(self), dict(values), "config")

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike | None) -> "SystemConfig":
        """Read a YAML file (partial: missing keys keep their defaults), or a preset by name
        (:data:`PRESETS`, e.g. "fast"). ``None`` gives the defaults. A file may start from a preset
        with a top-level ``preset: NAME`` and change only some of its keys."""
        if path is None:
            return cls()
        if str(path) in PRESETS and not Path(path).exists():
            path = PRESETS[str(path)]
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path} (a YAML file, or a preset: "
                                    f"{', '.join(PRESETS)})")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: not valid YAML ({error})") from error
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of sections at the top level")
        base = values.pop("preset", None)
        if base is not None and base not in PRESETS:
            raise ValueError(f"{path}: unknown preset {base!r}; presets: {', '.join(PRESETS)}")
        try:
            config = (cls.load(base) if base is not None else cls()).updated(values)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: {error}") from error
        if config.model is not None:  # a model file named in a config is relative to the config
            config.model = os.path.join(os.path.dirname(os.path.abspath(path)), os.path.expanduser(config.model))
        return config


def _to_plain(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _to_plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def _coerce(current, new, where: str):
    """Convert a YAML value to the type of the current value (tuples stay tuples)."""
    if dataclasses.is_dataclass(current):
        if not isinstance(new, Mapping):
            raise ValueError(f"{where}: expected a mapping, got {new!r}")
        return _update(dataclasses.replace(current), dict(new), where)
    if isinstance(current, tuple) and isinstance(new, (list, tuple)):
        return tuple(new)
    if isinstance(current, bool) and not isinstance(new, bool):
        raise ValueError(f"{where}: expected true/false, got {new!r}")
    if isinstance(current, int) and not isinstance(current, bool) and isinstance(new, float):
        if new != int(new):
            raise ValueError(f"{where}: expected an integer, got {new!r}")
        return int(new)
    if isinstance(current, float) and isinstance(new, int) and not isinstance(new, bool):
        return float(new)
    return new


def _update(obj, values: dict, where: str):
    names = {f.name for f in dataclasses.fields(obj)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    changes = {name: _coerce(getattr(obj, name), value, f"{where}.{name}")
               for name, value in values.items()}
    return dataclasses.replace(obj, **changes)


__all__ = ["SystemConfig", "ExtractionConfig", "CodebookConfig", "AsmkConfig", "SearchConfig", "TrainConfig",
           "PRECISIONS", "FUSIONS", "PRESETS"]
