"""One extraction for both heads, and the feature store every run of one model shares.

Each image is decoded once (by a DataLoader worker) and downscaled to ``max_size``; then ONE forward
of the retrieval model per pyramid level gives the MDA attention and local maps and the GLAM
descriptor (:func:`extract_batch`); the local features are the top-n over all heads and levels
(:func:`mda.extract.local_features_from_levels`), the global descriptor the L2-normalised mean of
the levels' descriptors (GLAM's multi-scale protocol). Queries go through the same function.

Feature store: ``STORE/<model hash>-<settings hash>/features.h5`` holds, per image, its local
features (descriptors and :data:`mda.extract.LOCAL_FIELDS`) and its global descriptor (image field
``"global"``), committed image by image (``asmk_index.feature_file``). A record is keyed by the
image file's absolute path, size and modification time, so the features a codebook run extracted
are reused by an index run on the same photos with the same model and settings, whatever the
output directories are called, and a changed file is extracted again. A run after a crash or
Ctrl-C skips every image already stored; an image that cannot be read is recorded as a failure
(path and reason) and the run goes on.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock

from asmk_index.feature_file import CorruptFeatureFileError, FeatureFile
from imagedata.extraction import default_num_workers, extract_to_file, resolve_device
from imagedata.images import image_to_tensor, scan_images
from mda.extract import (LOCAL_FIELDS, LocalFeatures, PyramidLevel, level_factor,
                         local_features_from_levels, pyramid)

from .config import ExtractionConfig
from .network import RetrievalNet

logger = logging.getLogger(__name__)

FEATURES_FILE = "features.h5"
STORE_LOCK_FILE = ".lock"     # held by a run writing the store and by a reader (HDF5 locks writers' files)
GLOBAL_FIELD = "global"


@dataclass
class ImageFeatures:
    """Both kinds of features of one image: local (MDA, top-n) and global (GLAM, (D,) float32)."""
    local: LocalFeatures
    global_descriptor: np.ndarray

    def record(self) -> dict[str, np.ndarray]:
        """The feature-file record: local descriptors, per-feature fields, the global descriptor."""
        return {"descriptors": self.local.descriptors, **self.local.fields(),
                GLOBAL_FIELD: self.global_descriptor}


# ---------------------------------------------------------------------- one image / one batch
def mixed_precision_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision: mixed`` on ``device``: float16 on CUDA, bfloat16 on CPUs
    with native bfloat16 arithmetic (AVX512-BF16 or AMX), None (float32) elsewhere."""
    if device.type == "cuda":
        return torch.float16
    native = (getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
              or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    return torch.bfloat16 if native else None


@contextlib.contextmanager
def inference(device: torch.device, precision: str) -> Iterator[None]:
    """``torch.inference_mode`` plus, for ``precision == "mixed"``, autocast (see
    :func:`mixed_precision_dtype`)."""
    dtype = mixed_precision_dtype(device) if precision == "mixed" else None
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        yield


def prepare_network(net: RetrievalNet, config: ExtractionConfig) -> RetrievalNet:
    """The model on the config's device, in eval mode and in the configured memory format."""
    net = net.to(resolve_device(config.device)).eval()
    return net.to(memory_format=torch.channels_last if config.channels_last else torch.contiguous_format)


def extract_batch(net: RetrievalNet, images: torch.Tensor, config: ExtractionConfig) -> list[ImageFeatures]:
    """Features of equal-size images ``(B, 3, H, W)`` float in [0, 1] (already at most
    ``config.max_size``; local x, y are in their pixels), one forward per pyramid level.

    A level whose image is smaller than the local stride gives no local features (its global
    descriptor still counts); an image too small for every level is a ValueError.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected (B, 3, H, W) images, got shape {tuple(images.shape)}")
    device = net.device
    images = images.to(device)
    size = (int(images.shape[-2]), int(images.shape[-1]))
    stride = net.local_stride
    levels: list[list[PyramidLevel]] = [[] for _ in range(images.shape[0])]
    global_sum = None
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    with inference(device, config.precision):
        for scale, resized in pyramid(images, config.scales):
            output = net(resized.contiguous(memory_format=memory_format))
            descriptors = output.global_descriptor.float()
            global_sum = descriptors if global_sum is None else global_sum + descriptors
            if min(resized.shape[-2:]) < stride:
                continue
            factor = level_factor(size, resized)
            for position, image_levels in enumerate(levels):
                image_levels.append(PyramidLevel(output.attention[position].float(),
                                                 output.local[position].float(), scale, factor))
        if not levels[0]:
            raise ValueError(f"image of {size[1]}x{size[0]} pixels is too small for every scale "
                             f"{config.scales} (local stride {stride})")
        local_config = _local_selection_config(config)
        global_descriptors = F.normalize(global_sum, p=2, dim=1).cpu().numpy().astype(np.float32)
        return [ImageFeatures(local_features_from_levels(image_levels, stride=stride, config=local_config,
                                                         image_size=size), global_descriptors[position])
                for position, image_levels in enumerate(levels)]


def extract_image(net: RetrievalNet, image: np.ndarray, config: ExtractionConfig) -> ImageFeatures:
    """Features of one ``(H, W, 3)`` uint8 image already prepared as searched (cropped, at most
    ``max_size``): the query path, the same computation as the collection's."""
    return extract_batch(net, image_to_tensor(image).unsqueeze(0), config)[0]


def _local_selection_config(config: ExtractionConfig):
    from mda.config import ExtractionConfig as LocalSelection
    return LocalSelection(scales=tuple(config.scales), max_size=config.max_size, top_n=config.top_n,
                          border_cells=config.border_cells)


class BatchExtractor:
    """Callable for :func:`imagedata.extraction.extract_to_file`: (B, 3, H, W) -> B records."""

    def __init__(self, net: RetrievalNet, config: ExtractionConfig):
        self.net = net
        self.config = config

    def __call__(self, images: torch.Tensor) -> list[dict[str, np.ndarray]]:
        return [features.record() for features in extract_batch(self.net, images, self.config)]


# ---------------------------------------------------------------------- images of a folder
def image_names(root: str | os.PathLike, paths: Sequence[Path]) -> list[str]:
    """Names of images = their paths relative to ``root`` (posix), e.g. ``sub/photo.jpg``.
    Symbolic links are not resolved: a link inside ``root`` is named by where it is."""
    root = Path(os.path.abspath(root))
    return [Path(os.path.abspath(path)).relative_to(root).as_posix() for path in paths]


@dataclass
class CollectedImages:
    """The image files of a folder (symbolic links followed, not resolved), their names, and
    what was left out: ``skipped`` {name: reason} (formats this machine cannot decode, link loops,
    dangling links, folders that cannot be read)."""
    paths: list[Path]
    names: list[str]
    skipped: dict[str, str] = field(default_factory=dict)


def collect_images(folder: str | os.PathLike) -> CollectedImages:
    """All image files under ``folder`` and their names; a folder without images is an error."""
    scan = scan_images(folder)
    if not scan.paths:
        raise FileNotFoundError(f"no image files (jpg, png, ...) found in {folder}"
                                + (f"; skipped: {scan.skipped[0][0]}: {scan.skipped[0][1]}" if scan.skipped else ""))
    skipped = dict(zip(image_names(folder, [path for path, _ in scan.skipped]), [r for _, r in scan.skipped]))
    return CollectedImages(scan.paths, image_names(folder, scan.paths), skipped)


# ---------------------------------------------------------------------- the feature store
def record_key(path: str | os.PathLike) -> str:
    """A store record's key: the file's absolute path, size and modification time (ns)."""
    path = os.path.abspath(path)
    stat = os.stat(path)
    return f"{path}|{stat.st_size}|{stat.st_mtime_ns}"


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


@dataclass
class CollectionFeatures:
    """Features of n images read from a store: global (n, Dg); local (N, Dl) with the position of
    their image (N,) in 0..n-1 and their fields (each (N,))."""
    global_descriptors: np.ndarray
    local_descriptors: np.ndarray
    local_owner: np.ndarray
    local_fields: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def local_geometry(self) -> np.ndarray:
        """(N, 3) float32 x, y, scale of the local features."""
        return local_geometry(self.local_fields)


def local_geometry(fields) -> np.ndarray:
    """(N, 3) float32 x, y, scale of local features (a LocalFeatures or a dict of its fields)."""
    get = fields.get if isinstance(fields, dict) else lambda name: getattr(fields, name)
    return np.column_stack([get("x"), get("y"), get("scale")]).astype(np.float32)


@dataclass
class StoreRun:
    """One :meth:`FeatureStore.extract` run: keys of the images given (by position), failures
    (path -> reason), how many were extracted now and how many were already stored."""
    keys: list[str | None]
    failures: dict[str, str] = field(default_factory=dict)
    extracted: int = 0
    already_stored: int = 0


class FeatureStore:
    """The features one model (by hash) extracts with one set of settings, reused by every run.

    ``root``: the store folder (several models and settings side by side); the features live in
    ``root/<model hash[:16]>-<settings hash[:12]>/features.h5``.
    """

    def __init__(self, root: str | os.PathLike, model_hash: str, config: ExtractionConfig):
        self.root = Path(root)
        self.model_hash = model_hash
        self.settings = config.feature_settings()
        self.directory = self.root / f"{model_hash[:16]}-{settings_hash(self.settings)[:12]}"
        self.path = self.directory / FEATURES_FILE
        self.lock = FileLock(self.directory / STORE_LOCK_FILE)

    @property
    def attributes(self) -> dict:
        return {"model_sha256": self.model_hash, "extraction": self.settings}

    def extract(self, paths: Sequence[Path], net: RetrievalNet, config: ExtractionConfig, *,
                progress: bool = True, num_workers: int | None = None) -> StoreRun:
        """Extract every image of ``paths`` that the store lacks (see the module docstring)."""
        keys: list[str | None] = []
        failures: dict[str, str] = {}
        for path in paths:
            try:
                keys.append(record_key(path))
            except OSError as error:
                keys.append(None)
                failures[str(path)] = f"cannot read the file: {error.strerror or error}"
        todo = [(Path(path), key) for path, key in zip(paths, keys) if key is not None]
        unique = list(dict(((key, path) for path, key in todo)).items())
        run = StoreRun(keys=keys, failures=failures)
        if not unique:
            return run
        net = prepare_network(net, config)
        self.directory.mkdir(parents=True, exist_ok=True)
        with self.lock:  # another run on this store: wait for it
            self._discard_if_unreadable()
            report = extract_to_file(
                [path for _, path in unique], BatchExtractor(net, config), self.path, kind="local",
                dim=net.descriptor_dim, fields=LOCAL_FIELDS,
                image_fields={GLOBAL_FIELD: ("float32", (net.global_dim,))}, attributes=self.attributes,
                max_size=config.max_size, device=net.device, progress=progress,
                num_workers=default_num_workers() if num_workers is None else num_workers,
                report_path=self.directory / "failures.tsv", names=[key for key, _ in unique],
                batch_size=config.batch_size)
        run.failures.update(dict(report.failures))
        run.extracted, run.already_stored = report.extracted, report.skipped
        return run

    def _discard_if_unreadable(self) -> None:
        """Delete the features file when it cannot be read as a whole (its records are then
        extracted again); damaged single records are handled by the file's writer."""
        if not self.path.exists():
            return
        try:
            FeatureFile(self.path).close()
        except CorruptFeatureFileError as error:
            logger.warning("%s; deleting it and extracting the features again", error)
            self.path.unlink()

    def read(self, keys: Sequence[str]) -> CollectionFeatures:
        """The stored features of ``keys`` (every one must be stored). Waits while another run
        writes the store (HDF5 refuses to open a file that a writer holds)."""
        with self.lock, FeatureFile(self.path) as features:
            records = [features.get(key) for key in keys]
            dim = features.dim
        if not records:
            return CollectionFeatures(np.zeros((0, 0), np.float32), np.zeros((0, dim), np.float32),
                                      np.zeros(0, np.int64))
        local = [record["descriptors"] for record in records]
        return CollectionFeatures(
            global_descriptors=np.stack([record[GLOBAL_FIELD] for record in records]).astype(np.float32),
            local_descriptors=np.concatenate(local),
            local_owner=np.repeat(np.arange(len(records), dtype=np.int64), [len(d) for d in local]),
            local_fields={name: np.concatenate([record[name] for record in records]) for name in LOCAL_FIELDS})


def default_store_root(codebook_dir: str | os.PathLike) -> Path:
    """Where a codebook's collection features are kept unless asked otherwise:
    ``.<codebook name>.features`` beside the codebook directory (shared by the codebook run and
    every index run with that codebook)."""
    codebook_dir = Path(codebook_dir)
    return codebook_dir.parent / f".{codebook_dir.name}.features"


__all__ = ["ImageFeatures", "CollectionFeatures", "CollectedImages", "local_geometry", "FeatureStore", "StoreRun", "extract_batch",
           "extract_image", "prepare_network", "inference", "mixed_precision_dtype", "collect_images",
           "image_names", "record_key", "default_store_root", "GLOBAL_FIELD", "FEATURES_FILE"]
