"""Resumable extraction of a folder's local (MDA) and global (GLAM) features into feature files.

Each image is read once (``imagedata.load_image`` at ``max_size``) and both extractors run on it;
the descriptors go to ``WORK/local.h5`` and ``WORK/global.h5`` (``asmk_index.feature_file``), which
commit image by image. A rerun after a crash or Ctrl-C skips every image already stored, so no
image is extracted twice. An image that cannot be read is recorded as a failure (name and reason)
and the run goes on.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from asmk_index.feature_file import FeatureFile, FeatureFileWriter
from imagedata.images import ImageLoadError, list_images, load_image

from .models import LocalFeatureSet, ModelBundle

logger = logging.getLogger(__name__)

LOCAL_FILE, GLOBAL_FILE = "local.h5", "global.h5"


@dataclass
class ExtractionReport:
    """What one extraction run did: images extracted now, already there, and failures."""
    extracted: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
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


def _progress(iterable, total: int, description: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=description, unit="img", dynamic_ncols=True)


def extract_collection(paths: Sequence[Path], names: Sequence[str], bundle: ModelBundle,
                       work_dir: str | os.PathLike, *, global_features: bool = True,
                       progress: bool = True,
                       on_image: Callable[[str], None] | None = None) -> ExtractionReport:
    """Extract every image not yet in ``work_dir``'s feature files (see the module docstring).

    ``global_features=False`` extracts only the local features (codebook training).
    ``on_image(name)`` is called before each image is extracted (progress hooks, tests).
    """
    if len(paths) != len(names):
        raise ValueError(f"{len(paths)} paths for {len(names)} names")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    report = ExtractionReport()
    max_size = bundle.config.extraction.max_size
    with contextlib.ExitStack() as stack:
        local_writer = stack.enter_context(FeatureFileWriter(
            work_dir / LOCAL_FILE, kind="local", dim=int(bundle.mda.descriptor_dim),
            fields=LocalFeatureSet.FIELDS, attributes=bundle.feature_attributes("local")))
        global_writer = stack.enter_context(FeatureFileWriter(
            work_dir / GLOBAL_FILE, kind="global", dim=bundle.global_dim,
            attributes=bundle.feature_attributes("global"))) if global_features else None
        writers = [w for w in (local_writer, global_writer) if w is not None]
        todo = []
        for path, name in zip(paths, names):
            if all(name in writer.done for writer in writers):
                report.reused.append(name)
            else:
                todo.append((path, name))
        if report.reused:
            logger.info("resuming: %d image(s) already extracted in %s, %d to go",
                        len(report.reused), work_dir, len(todo))
        for path, name in _progress(todo, len(todo), "extracting", progress):
            if on_image is not None:
                on_image(name)
            try:
                image = load_image(path, max_size=max_size)
            except ImageLoadError as error:
                logger.warning("skipping %s", error)
                report.failures[name] = str(error)
                for writer in writers:
                    writer.add_failure(name, str(error))
                continue
            if name not in local_writer.done:
                features = bundle.local_features(image)
                local_writer.add(name, features.descriptors, **features.fields())
            if global_writer is not None and name not in global_writer.done:
                global_writer.add(name, bundle.global_descriptor(image)[None, :])
            report.extracted.append(name)
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
