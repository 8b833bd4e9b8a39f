"""Building a collection's codebook directory and its index directory from image folders."""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from asmk_index.persistence import writer_lock
from imagedata.images import ImageLoadError, load_image

from .config import SystemConfig
from .extraction import FeatureStore, collect_images, default_store_root
from .index_store import RetrievalIndex, is_index_directory
from .models import ModelBundle

logger = logging.getLogger(__name__)


class SmallCollectionWarning(UserWarning):
    """The collection has too few descriptors for the codebook size asked; a smaller one is used."""


@dataclass
class CodebookReport:
    path: str
    requested_size: int
    size: int
    training_descriptors: int
    images: int
    model: str
    model_sha256: str
    extracted: int = 0
    reused: int = 0
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


def collection_features(store: FeatureStore, bundle: ModelBundle, paths: Sequence[Path],
                        names: Sequence[str], *, progress: bool):
    """Extract what ``store`` lacks of ``paths`` and read the features of every image that has them:
    ``(good names, CollectionFeatures, failures {name: reason}, StoreRun)``."""
    run = store.extract(paths, bundle.net, bundle.config.extraction, progress=progress)
    name_of_path = {str(path): name for path, name in zip(paths, names)}
    failures = {name_of_path.get(path, path): reason for path, reason in run.failures.items()}
    good = [(name, key) for name, key in zip(names, run.keys) if key is not None and name not in failures]
    features = store.read([key for _, key in good])
    return [name for name, _ in good], features, failures, run


def build_codebook(images: str | os.PathLike, output: str | os.PathLike, *,
                   size: int | None = None, config: SystemConfig | None = None,
                   model: str | os.PathLike | None = None,
                   feature_store: str | os.PathLike | None = None,
                   progress: bool = True) -> CodebookReport:
    """Set up the model for the collection ``images`` and train its codebook; write the codebook
    directory ``output``.

    The model: the trained model file ``model`` (or ``config.model``); without one, a new model of
    ``config.network`` with packaged ImageNet weights whose MDA reduction and GLAM whitening are
    learned from a sample of the images (``config.codebook.fit_images``). Then the local and
    global features of every image are extracted into the feature store (``feature_store``,
    default ``.<output name>.features`` beside ``output``, where index runs with this codebook
    find them again), the local descriptors are sampled (up to ``max_training_descriptors``) and
    clustered into ``size`` words (default ``config.codebook.size``), capped at descriptors /
    ``min_descriptors_per_word`` (the configured size scales with the collection that way; a
    ``size`` given here that is capped warns with a :class:`SmallCollectionWarning`).
    """
    config = config or SystemConfig()
    collected = collect_images(images)
    paths, names = collected.paths, collected.names
    settings = config.codebook
    model = model if model is not None else config.model
    if model is not None:
        bundle = ModelBundle.from_model_file(config, model)
    else:
        fit_images = sample_fit_images(paths, settings.fit_images, config.extraction.max_size, settings.seed)
        bundle = ModelBundle.initialize(config, fit_images, settings.seed)
        del fit_images
    store = bundle.feature_store(feature_store if feature_store is not None else default_store_root(output))
    good, features, failures, run = collection_features(store, bundle, paths, names, progress=progress)
    failures.update(collected.skipped)
    descriptors = features.local_descriptors
    collection_descriptors = descriptors.shape[0]    # the codebook's size follows the collection's
    rng = np.random.default_rng(settings.seed)
    if collection_descriptors > settings.max_training_descriptors:
        keep = np.sort(rng.choice(collection_descriptors, settings.max_training_descriptors,
                                  replace=False))
        descriptors = descriptors[keep]
    requested = int(size or settings.size)
    chosen = settings.size_for(collection_descriptors, requested)
    if chosen < requested and size is not None:    # a size asked for by name cannot be met
        message = (f"{collection_descriptors} descriptors from {len(good)} images are too "
                   f"few for {requested} visual words (want >= {settings.min_descriptors_per_word} "
                   f"per word); training {chosen} words instead")
        warnings.warn(message, SmallCollectionWarning, stacklevel=2)
        logger.warning(message)
    from asmk_index.codebook import Codebook
    logger.info("training a %d-word codebook on %d descriptors", chosen, descriptors.shape[0])
    bundle.codebook = Codebook.train(descriptors, chosen, seed=settings.seed)
    bundle.save(output)
    return CodebookReport(path=str(output), requested_size=requested, size=chosen,
                          training_descriptors=int(descriptors.shape[0]), images=len(good),
                          model=str(model) if model is not None else "new (ImageNet weights, fitted)",
                          model_sha256=bundle.model_hash, extracted=run.extracted,
                          reused=run.already_stored, failures=failures)


@dataclass
class IndexReport:
    """One index run: images in the index, added, already indexed, removed, failed (name: why),
    and how many were extracted now or found in the feature store."""
    path: str
    images: int
    added: list[str] = field(default_factory=list)
    already_indexed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    extracted: int = 0
    reused: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def build_index(output: str | os.PathLike, *, images: str | os.PathLike | None = None,
                codebook: str | os.PathLike | None = None, append: bool = False,
                remove: Sequence[str] = (), feature_store: str | os.PathLike | None = None,
                device: str | None = None, progress: bool = True,
                lock_timeout: float | None = None) -> IndexReport:
    """Create, extend or shrink the index directory ``output``.

    New index: ``images`` and ``codebook`` (a codebook directory) are needed; every image not yet
    in the feature store (``feature_store``, default the codebook's: see :func:`build_codebook`)
    is extracted, resumably; bad files are skipped and listed in the report. ``append=True`` (or
    only ``remove``): the existing index is loaded and the images of ``images`` not yet in it are
    added (from any folder: each image keeps its own root), then ``remove`` names are taken out;
    nothing is rebuilt. The index refers to the codebook directory (no copy of the model).

    Extraction runs first, without holding the index; then, under the index's writer lock (another
    writer is waited for, or refused after ``lock_timeout`` seconds, naming it), the index is
    loaded again, changed and published with ``report.json`` as one new version, so two runs at
    once keep each other's images.
    """
    output = Path(output)
    updating = append or (images is None and remove)
    if updating:
        if not is_index_directory(output):
            raise FileNotFoundError(f"no index at {output} to append to / remove from; build it "
                                    "first with --images and --codebook")
        snapshot = RetrievalIndex.load(output, device=device)
        models, codebook_dir = snapshot.models, snapshot.codebook_dir
        if codebook is not None:
            given = ModelBundle.load(codebook, device="cpu")
            if given.codebook.hash != models.codebook.hash or given.model_hash != models.model_hash:
                raise ValueError(f"{codebook} is not the codebook {output} was built with; build "
                                 "a new index instead of appending")
        indexed = set(snapshot.names)
    else:
        if images is None or codebook is None:
            raise ValueError("a new index needs both the images folder and the codebook")
        models, codebook_dir, indexed = ModelBundle.load(codebook, device=device), Path(codebook), set()
    report = IndexReport(path=str(output), images=0)
    new_names, features = [], None
    if images is not None:
        collected = collect_images(images)
        paths, names = collected.paths, collected.names
        todo = [(path, name) for path, name in zip(paths, names) if name not in indexed]
        store = models.feature_store(feature_store if feature_store is not None
                                     else default_store_root(codebook_dir))
        new_names, features, report.failures, run = collection_features(
            store, models, [p for p, _ in todo], [n for _, n in todo], progress=progress)
        report.extracted, report.reused = run.extracted, run.already_stored
        report.failures.update(collected.skipped)
        if report.failures:
            logger.warning("%d image(s) could not be indexed: %s", len(report.failures),
                           ", ".join(sorted(report.failures)[:20]))
    with writer_lock(output, timeout=lock_timeout):
        index = (RetrievalIndex.load(output, models=models) if updating
                 else RetrievalIndex(models, codebook_dir))
        if images is not None:
            report.already_indexed = [name for name in names if name in index]
            keep = [position for position, name in enumerate(new_names) if name not in index]
            if keep:
                chosen = np.isin(features.local_owner, keep)
                renumber = np.full(len(new_names), -1, np.int64)
                renumber[keep] = np.arange(len(keep))
                index.add([new_names[position] for position in keep], features.global_descriptors[keep],
                          features.local_descriptors[chosen], renumber[features.local_owner[chosen]],
                          features.local_geometry[chosen], root=images)
            report.added = [new_names[position] for position in keep]
        if remove:
            report.removed, report.not_found = index.remove(remove)
            if report.not_found:
                logger.warning("not in the index, nothing removed: %s", ", ".join(report.not_found))
        report.images = len(index)
        index.save(output, report=report.to_dict())
    return report


__all__ = ["build_codebook", "build_index", "collection_features", "CodebookReport", "IndexReport",
           "SmallCollectionWarning", "sample_fit_images"]
