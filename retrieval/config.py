"""One place for every setting of the retrieval system, with YAML load/save (``--config FILE``).

:class:`SystemConfig` nests the model configs (``mda.MdaConfig``, ``glam.GlamConfig``), the
extraction settings shared by indexing and querying, the codebook and ASMK* parameters and the
search defaults. A YAML file only needs the keys it changes::

    extraction: {max_size: 512, scales: [1.0, 0.707]}
    codebook: {size: 4096}
    asmk: {alpha: 3.0}
    mda: {top_n: 500}
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import yaml

from asmk_index.asmk import AsmkParams

from glam.config import GlamConfig
from mda.config import MdaConfig


@dataclass
class ExtractionConfig:
    """How images are read and turned into features (the same for database images and queries).

    max_size: longest image side in pixels after loading (images are never upscaled).
    scales: image pyramid scales for the multi-scale extraction.
    top_n: local features kept per image (top attention over all scales).
    device: "auto" (cuda when present, else cpu), "cpu" or "cuda".
    """
    max_size: int = 512
    scales: tuple[float, ...] = (1.0, 0.7071, 0.5)
    top_n: int = 1000
    device: str = "auto"


@dataclass
class CodebookConfig:
    """k-means codebook training.

    size: visual words asked for (capped for small collections, see ``max_size_for``).
    min_descriptors_per_word: the cap: at most descriptors / this many words.
    max_training_descriptors: descriptors sampled from the collection for k-means.
    fit_images: images sampled to learn the MDA reduction PCA and the GLAM whitening.
    """
    size: int = 65536
    min_descriptors_per_word: int = 30
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


@dataclass
class SearchConfig:
    """Defaults of the two-stage search."""
    k: int = 10
    shortlist: int = 100
    mode: str = "two_stage"  # "two_stage" | "asmk" | "global"
    global_method: str = "exact"
    # Stage 2 ranks the shortlist by asmk_score + global_weight * global_score. 0 = ASMK* alone.
    # On ukbench-dev with the untrained MDA heads, ASMK* alone ranked the shortlist worse than
    # the global stage (mAP 83.7 vs 98.3); 0.1 gave 98.4 (0.05-0.2 within 0.05 of it).
    global_weight: float = 0.1


@dataclass
class SystemConfig:
    """Everything the system needs to build a codebook, index images and search them."""
    extraction: ExtractionConfig = field(default_factory=ExtractionConfig)
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    asmk: AsmkConfig = field(default_factory=AsmkConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    mda: MdaConfig = field(default_factory=MdaConfig)
    glam: GlamConfig = field(default_factory=GlamConfig)

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
        """Read a YAML file (partial: missing keys keep their defaults). ``None`` gives the defaults."""
        if path is None:
            return cls()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: not valid YAML ({error})") from error
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of sections at the top level")
        try:
            return cls.from_dict(values)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: {error}") from error


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


def resolve_device(name: str) -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is present, else ``"cpu"``; other names unchanged."""
    if name != "auto":
        return name
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


__all__ = ["SystemConfig", "ExtractionConfig", "CodebookConfig", "AsmkConfig", "SearchConfig",
           "resolve_device"]
