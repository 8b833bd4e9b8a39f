"""A collection's codebook directory: the retrieval model, the k-means codebook and the config.

A codebook is only meaningful with the model whose descriptors it was trained on, so
``build_codebook.py`` writes them as one directory (published as a whole new version under a
writer lock: ``asmk_index.persistence``); an index refers to it by path and hashes and never holds
a second copy of the weights. A version holds::

    CODEBOOK/manifest.json   kind "retrieval_codebook": format version, the model's and the
                             codebook's hashes, checksums of the files below
    CODEBOOK/config.yaml     the SystemConfig used (extraction, ASMK*, search settings)
    CODEBOOK/model.pt        the retrieval model (RetrievalNet.save: backbone and both heads)
    CODEBOOK/codebook.npz    the k-means codebook
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from asmk_index.codebook import Codebook
from asmk_index.persistence import (MANIFEST_NAME, IndexFormatError, load_current, publish_directory,
                                    read_arrays, write_arrays)
from imagedata.images import image_to_tensor

from .config import SystemConfig
from .extraction import FeatureStore, ImageFeatures, extract_image, prepare_network
from .network import RetrievalNet

logger = logging.getLogger(__name__)

CODEBOOK_KIND = "retrieval_codebook"
CONFIG_FILE, MODEL_FILE, CODEBOOK_FILE = "config.yaml", "model.pt", "codebook.npz"


class ModelBundle:
    """The retrieval model, the codebook (None before it is trained) and the config of a collection."""

    def __init__(self, config: SystemConfig, net: RetrievalNet, codebook: Codebook | None = None, *,
                 model_hash: str | None = None):
        self.config = config
        self.net = prepare_network(net, config.extraction)
        self.codebook = codebook
        self.model_hash = model_hash or net.loaded_hash or net.model_hash()

    # ------------------------------------------------------------------ creation
    @classmethod
    def initialize(cls, config: SystemConfig, fit_images: Sequence[np.ndarray], seed: int = 0) -> "ModelBundle":
        """A new model of ``config.network`` (packaged ImageNet weights) whose MDA reduction and
        GLAM FC are PCA-whitenings learned from ``fit_images`` ((H, W, 3) uint8, at most max_size);
        ``seed``: see :func:`new_fitted_network`."""
        return cls(config, new_fitted_network(config, fit_images, seed))

    @classmethod
    def from_model_file(cls, config: SystemConfig, path: str | os.PathLike) -> "ModelBundle":
        """A trained model file (``pipelines/train.py``); its network config replaces the config's."""
        net = RetrievalNet.load(path)
        if net.config != config.network:
            logger.info("using the network settings stored in %s (they differ from the config's)", path)
        config = config.updated({})
        config.network = net.config
        config.model = os.fspath(path)
        if not net.is_fitted:
            logger.warning("%s: the MDA reduction or the GLAM FC was never fitted nor trained", path)
        return cls(config, net)

    # ------------------------------------------------------------------ features
    @property
    def global_dim(self) -> int:
        return self.net.global_dim

    def extract_image(self, image: np.ndarray) -> ImageFeatures:
        """Local and global features of an (H, W, 3) uint8 image already cropped and at most
        ``max_size`` (the query path)."""
        return extract_image(self.net, image, self.config.extraction)

    def feature_store(self, root: str | os.PathLike) -> FeatureStore:
        """The store of this model's features under ``root`` (keyed by its hash and settings)."""
        return FeatureStore(root, self.model_hash, self.config.extraction)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """Write the codebook directory atomically (see the module docstring)."""
        directory = Path(directory)
        with publish_directory(directory) as temporary:
            self.config.save(temporary / CONFIG_FILE)
            model_hash = self.net.save(temporary / MODEL_FILE)
            if model_hash != self.model_hash:
                raise RuntimeError("the model changed since its hash was taken; build the bundle again")
            params = {"model_sha256": self.model_hash}
            if self.codebook is not None:
                self.codebook.save(temporary / CODEBOOK_FILE)
                params["codebook_hash"] = self.codebook.hash
            names = sorted(path.name for path in temporary.iterdir()
                           if path.is_file() and path.name != MANIFEST_NAME)
            write_arrays(temporary, kind=CODEBOOK_KIND, params=params, counts={}, arrays={}, files=names)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, *, require_codebook: bool = True,
             device: str | None = None) -> "ModelBundle":
        """Read a codebook directory (its current version); checks version, kind, checksums and
        hashes. ``device`` overrides the config's."""
        return load_current(directory, lambda version: cls._load_version(version, require_codebook, device))

    @classmethod
    def _load_version(cls, directory: Path, require_codebook: bool, device: str | None) -> "ModelBundle":
        manifest = verify_codebook_directory(directory)
        files, params = manifest["files"], manifest["params"]
        if require_codebook and CODEBOOK_FILE not in files:
            raise IndexFormatError(f"{directory}: no {CODEBOOK_FILE}: train the codebook first "
                                   "(pipelines/build_codebook.py)")
        config = SystemConfig.load(directory / CONFIG_FILE)
        if device is not None:
            config.extraction.device = device
        try:
            net = RetrievalNet.load(directory / MODEL_FILE)
        except ValueError as error:
            raise IndexFormatError(str(error)) from None
        if net.loaded_hash != params["model_sha256"]:
            raise IndexFormatError(f"{directory / MODEL_FILE}: not the model the manifest lists (corrupt)")
        codebook = Codebook.load(directory / CODEBOOK_FILE) if CODEBOOK_FILE in files else None
        if codebook is not None and codebook.hash != params.get("codebook_hash"):
            raise IndexFormatError(f"{directory / CODEBOOK_FILE}: not the codebook the manifest lists (corrupt)")
        return cls(config, net, codebook, model_hash=net.loaded_hash)


def new_fitted_network(config: SystemConfig, fit_images: Sequence[np.ndarray], seed: int = 0) -> RetrievalNet:
    """A new model of ``config.network`` (packaged ImageNet weights) whose MDA reduction and GLAM
    FC are PCA-whitenings learned from ``fit_images`` ((H, W, 3) uint8 at most ``max_size``), over
    the extraction's pyramid scales and from the cells it selects features from. The heads' random
    initial weights (the MDA indicators' symmetry-breaking noise, GLAM's attention layers) are drawn
    from ``seed`` without touching the global random state: the same photos give the same model."""
    if not fit_images:
        raise ValueError("no images to initialise the model from (all failed to load?)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = RetrievalNet(config.network)
    extraction = config.extraction
    logger.info("learning the MDA reduction and the GLAM whitening from %d images", len(fit_images))
    net.fit_to_images((image_to_tensor(image).unsqueeze(0) for image in fit_images),
                      scales=tuple(extraction.scales), features_per_image=extraction.top_n,
                      border_cells=extraction.border_cells)
    return net


def verify_codebook_directory(directory: str | os.PathLike) -> dict:
    """Check a codebook directory (version, kind, files' checksums); returns its manifest."""
    directory = Path(directory)
    if directory.exists() and not (directory / MANIFEST_NAME).is_file():
        raise IndexFormatError(f"{directory}: not a codebook directory written by "
                               "pipelines/build_codebook.py (no manifest.json)")
    manifest, _ = read_arrays(directory, kind=CODEBOOK_KIND)
    for name in (CONFIG_FILE, MODEL_FILE):
        if name not in manifest["files"]:
            raise IndexFormatError(f"{directory}: {name} missing from the manifest (corrupt)")
    if "model_sha256" not in manifest.get("params", {}):
        raise IndexFormatError(f"{directory}: the manifest records no model hash (corrupt)")
    return manifest


__all__ = ["ModelBundle", "new_fitted_network", "verify_codebook_directory", "CODEBOOK_KIND", "MODEL_FILE", "CODEBOOK_FILE",
           "CONFIG_FILE"]
