"""Resumable extraction of a folder's local (MDA) and global (GLAM) features into feature files.

The shared loop ``imagedata.extraction.extract_to_file`` runs once per feature kind: the MDA
local features go to ``WORK/local.h5`` and the GLAM global descriptors to ``WORK/global.h5``
(``asmk_index.feature_file``), committed image by image. A rerun after a crash or Ctrl-C skips
every image already stored, so no image is extracted twice; an image that cannot be read is
recorded as a failure (name and reason) and the run goes on. Image names are paths relative to
the folder, with their extension (``sub/photo.jpg``), so an index can find its files again.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from asmk_index.feature_file import FeatureFile
from imagedata.extraction import default_num_workers, extract_to_file
from imagedata.images import list_images
from mda.extract import LOCAL_FIELDS

from .models import ModelBundle

logger = logging.getLogger(__name__)

LOCAL_FILE, GLOBAL_FILE = "local.h5", "global.h5"


@dataclass
class ExtractionReport:
    """Images whose features are in the work directory (now or from an earlier run), failures."""
    extracted: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)


def image_names(root: str | os.PathLike, paths: Sequence[Path]) -> list[str]:
    """Names of images = their paths relative to ``root`` (posix), e.g. ``sub/photo.jpg``."""
    root = Path(root).resolve()
    return [Path(path).resolve().relative_to(root).as_posix() for path in paths]


def collect_images(folder: str | os.PathLike) -> tuple[list[Path], list[str]]:
    """All image files under ``folder`` and their names; a folder without images is an error."""
    paths = list_images(folder)
    if not paths:
        raise FileNotFoundError(f"no image files (jpg, png, ...) found in {folder}")
    return paths, image_names(folder, paths)


def discard_stale_feature_file(path: Path, attributes: dict) -> None:
    """Delete a cached feature file made by other models or settings (it cannot be resumed)."""
    if not path.is_file():
        return
    try:
        with FeatureFile(path) as existing:
            stored = existing.attributes
    except (ValueError, OSError) as error:
        logger.warning("discarding unreadable feature cache %s (%s)", path, error)
        path.unlink()
        return
    if json.loads(json.dumps(stored, sort_keys=True)) != json.loads(
            json.dumps(attributes, sort_keys=True, default=list)):
        logger.warning("discarding feature cache %s: made by other models or extraction "
                       "settings", path)
        path.unlink()


def extract_collection(paths: Sequence[Path], names: Sequence[str], bundle: ModelBundle,
                       work_dir: str | os.PathLike, *, global_features: bool = True,
                       progress: bool = True, num_workers: int | None = None) -> ExtractionReport:
    """Extract every image not yet in ``work_dir``'s feature files (see the module docstring).

    ``global_features=False`` extracts only the local features (codebook training).
    ``num_workers``: image-loading processes (default: CPUs - 1, at most 8).
    """
    if len(paths) != len(names):
        raise ValueError(f"{len(paths)} paths for {len(names)} names")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    paths, names = [Path(p) for p in paths], list(names)
    name_of_path = {str(path): name for path, name in zip(paths, names)}
    report = ExtractionReport()
    workers = default_num_workers() if num_workers is None else num_workers
    jobs = [(LOCAL_FILE, "local", bundle.local_extractor(), int(bundle.mda.descriptor_dim),
             LOCAL_FIELDS)]
    if global_features:
        jobs.append((GLOBAL_FILE, "global", bundle.global_extractor(), bundle.global_dim, None))
    if not paths:
        return report
    extracted: set[str] = set()
    for filename, kind, extractor, dim, fields in jobs:
        discard_stale_feature_file(work_dir / filename, bundle.feature_attributes(kind))
        run = extract_to_file(paths, extractor, work_dir / filename, kind=kind, dim=dim,
                              fields=fields, attributes=bundle.feature_attributes(kind),
                              max_size=bundle.config.extraction.max_size, num_workers=workers,
                              device=bundle.device, progress=progress,
                              report_path=work_dir / "failures.tsv", names=names)
        for path, reason in run.failures:
            report.failures.setdefault(name_of_path.get(path, path), reason)
    with FeatureFile(work_dir / LOCAL_FILE) as local_file:
        stored = set(local_file.names)
    if global_features:
        with FeatureFile(work_dir / GLOBAL_FILE) as global_file:
            stored &= set(global_file.names)
    for name in names:
        if name in stored:
            extracted.add(name)
        elif name not in report.failures:
            report.failures[name] = "not extracted (see the log)"
    report.extracted = [name for name in names if name in extracted]
    return report


def read_local_features(work_dir: str | os.PathLike, names: Sequence[str]
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Local descriptors of ``names`` from ``work_dir``: (N, D) float32 and the owner (N,) position."""
    with FeatureFile(Path(work_dir) / LOCAL_FILE) as features:
        descriptors, owners = [], []
        for position, name in enumerate(names):
            record = features.get(name)
            descriptors.append(record["descriptors"])
            owners.append(np.full(record["descriptors"].shape[0], position, np.int64))
        dim = features.dim
    if not descriptors:
        return np.zeros((0, dim), np.float32), np.zeros(0, np.int64)
    return np.concatenate(descriptors), np.concatenate(owners)


def read_global_descriptors(work_dir: str | os.PathLike, names: Sequence[str]) -> np.ndarray:
    """Global descriptors (len(names), D) float32 of ``names`` from ``work_dir``."""
    with FeatureFile(Path(work_dir) / GLOBAL_FILE) as features:
        rows = [features.get(name)["descriptors"].reshape(-1) for name in names]
        dim = features.dim
    return np.stack(rows).astype(np.float32) if rows else np.zeros((0, dim), np.float32)


__all__ = ["ExtractionReport", "extract_collection", "collect_images", "image_names",
           "read_local_features", "read_global_descriptors", "LOCAL_FILE", "GLOBAL_FILE"]
