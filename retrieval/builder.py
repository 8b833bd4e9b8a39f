"""Building a collection's codebook directory and its index directory from image folders."""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from asmk_index.feature_file import FeatureFile
from imagedata.images import ImageLoadError, load_image

from .config import SystemConfig
from .extraction import (collect_images, extract_collection, read_global_descriptors,
                         read_local_features)
from .index_store import RetrievalIndex, is_index_directory
from .models import ModelBundle

logger = logging.getLogger(__name__)


class SmallCollectionWarning(UserWarning):
    """The collection has too few descriptors for the codebook size asked; a smaller one is used."""


def default_work_dir(output: str | os.PathLike) -> Path:
    """Where extracted features are cached (resumable): ``.<name>.work`` beside ``output``."""
    output = Path(output)
    return output.parent / f".{output.name}.work"


@dataclass
class CodebookReport:
    path: str
    requested_size: int
    size: int
    training_descriptors: int
    images: int
    failures: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def sample_fit_images(paths: Sequence[Path], count: int, max_size: int, seed: int
                      ) -> list[np.ndarray]:
    """Up to ``count`` randomly chosen images (loaded at ``max_size``) to initialise the models."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(paths))
    images = []
    for position in order:
        if len(images) >= count:
            break
        try:
            images.append(load_image(paths[position], max_size=max_size))
        except ImageLoadError as error:
            logger.warning("not using for initialisation: %s", error)
    return images


def build_codebook(images: str | os.PathLike, output: str | os.PathLike, *,
                   size: int | None = None, config: SystemConfig | None = None,
                   features: str | os.PathLike | None = None,
                   work_dir: str | os.PathLike | None = None,
                   progress: bool = True) -> CodebookReport:
    """Initialise the models on ``images`` and train the codebook; write the codebook directory.

    The MDA reduction (PCA) and the GLAM whitening are learned from a sample of the images
    (``config.codebook.fit_images``); then the local descriptors of every image (or those of the
    local feature file ``features``, which must come from these models) are sampled (up to
    ``config.codebook.max_training_descriptors``) and clustered into ``size`` words (default
    ``config.codebook.size``), capped at descriptors / ``min_descriptors_per_word`` with a
    :class:`SmallCollectionWarning`.
    """
    config = config or SystemConfig()
    paths, names = collect_images(images)
    settings = config.codebook
    fit_images = sample_fit_images(paths, settings.fit_images, config.extraction.max_size,
                                   settings.seed)
    bundle = ModelBundle.initialize(config, fit_images)
    del fit_images
    failures: dict[str, str] = {}
    if features is not None:
        with FeatureFile(features) as feature_file:
            if feature_file.kind != "local":
                raise ValueError(f"{features}: a {feature_file.kind} feature file; the codebook "
                                 "needs local descriptors")
            stored_id = feature_file.attributes.get("models_id")
            if stored_id != bundle.models_id:
                raise ValueError(f"{features}: extracted with other models than the ones "
                                 f"initialised now ({stored_id} != {bundle.models_id}); omit "
                                 "--features to extract with these models")
            descriptors, _ = feature_file.all_descriptors()
            failures = dict(feature_file.failures)
            n_images = len(feature_file)
    else:
        work_dir = Path(work_dir) if work_dir is not None else default_work_dir(output)
        report = extract_collection(paths, names, bundle, work_dir, progress=progress,
                                    global_features=False)
        failures = report.failures
        good = [name for name in names if name not in failures]
        descriptors, _ = read_local_features(work_dir, good)
        n_images = len(good)
    rng = np.random.default_rng(settings.seed)
    if descriptors.shape[0] > settings.max_training_descriptors:
        keep = np.sort(rng.choice(descriptors.shape[0], settings.max_training_descriptors,
                                  replace=False))
        descriptors = descriptors[keep]
    requested = int(size or settings.size)
    chosen = settings.size_for(descriptors.shape[0], requested)
    if chosen < requested:
        message = (f"{descriptors.shape[0]} training descriptors from {n_images} images are too "
                   f"few for {requested} visual words (want >= {settings.min_descriptors_per_word} "
                   f"per word); training {chosen} words instead")
        warnings.warn(message, SmallCollectionWarning, stacklevel=2)
        logger.warning(message)
    from asmk_index.codebook import Codebook
    logger.info("training a %d-word codebook on %d descriptors", chosen, descriptors.shape[0])
    bundle.codebook = Codebook.train(descriptors, chosen, seed=settings.seed)
    bundle.save(output)
    return CodebookReport(path=str(output), requested_size=requested, size=chosen,
                          training_descriptors=int(descriptors.shape[0]), images=n_images,
                          failures=failures)


@dataclass
class IndexReport:
    """One index run: images in the index, added, already indexed, removed, failed (name: why)."""
    path: str
    images: int
    added: list[str] = field(default_factory=list)
    already_indexed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def build_index(output: str | os.PathLike, *, images: str | os.PathLike | None = None,
                codebook: str | os.PathLike | None = None, append: bool = False,
                remove: Sequence[str] = (), work_dir: str | os.PathLike | None = None,
                device: str | None = None, progress: bool = True,
                on_image: Callable[[str], None] | None = None) -> IndexReport:
    """Create, extend or shrink the index directory ``output``.

    New index: ``images`` and ``codebook`` (a codebook directory) are needed; every image is
    extracted (resumable through ``work_dir``, default ``.<output name>.work`` beside it), bad
    files are skipped and listed in the report. ``append=True`` (or only ``remove``): the existing
    index is loaded and the images of ``images`` not yet in it are added, then ``remove`` names
    are taken out; nothing is rebuilt. The result is written atomically with ``report.json``.
    """
    output = Path(output)
    updating = append or (images is None and remove)
    if updating:
        if not is_index_directory(output):
            raise FileNotFoundError(f"no index at {output} to append to / remove from; build it "
                                    "first with --images and --codebook")
        index = RetrievalIndex.load(output, device=device)
        if codebook is not None:
            given = ModelBundle.load(codebook, device="cpu")
            if given.codebook.hash != index.models.codebook.hash:
                raise ValueError(f"{codebook} is not the codebook {output} was built with; build "
                                 "a new index instead of appending")
    else:
        if images is None or codebook is None:
            raise ValueError("a new index needs both the images folder and the codebook")
        models = ModelBundle.load(codebook, device=device)
        index = RetrievalIndex(models, codebook, image_root=str(Path(images).resolve()))
    report = IndexReport(path=str(output), images=0)
    if images is not None:
        root = str(Path(images).resolve())
        if index.image_root not in (None, root):
            logger.warning("images come from %s, the index's earlier ones from %s: names are "
                           "paths relative to each root", root, index.image_root)
        index.image_root = index.image_root or root
        paths, names = collect_images(images)
        report.already_indexed = [name for name in names if name in index]
        todo = [(path, name) for path, name in zip(paths, names) if name not in index]
        work = Path(work_dir) if work_dir is not None else default_work_dir(output)
        extraction = extract_collection([p for p, _ in todo], [n for _, n in todo],
                                        index.models, work, progress=progress)
        report.failures = extraction.failures
        good = [name for _, name in todo if name not in extraction.failures]
        if good:
            local, owner = read_local_features(work, good)
            index.add(good, read_global_descriptors(work, good), local, owner)
        report.added = good
        if report.failures:
            logger.warning("%d image(s) could not be indexed: %s", len(report.failures),
                           ", ".join(sorted(report.failures)[:20]))
    if remove:
        report.removed, report.not_found = index.remove(remove)
        if report.not_found:
            logger.warning("not in the index, nothing removed: %s", ", ".join(report.not_found))
    report.images = len(index)
    index.save(output, report=report.to_dict())
    return report


__all__ = ["build_codebook", "build_index", "CodebookReport", "IndexReport",
           "SmallCollectionWarning", "default_work_dir", "sample_fit_images"]
