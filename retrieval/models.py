"""The models of one collection, kept together: MDA (local), GLAM (global), the codebook, the config.

A codebook is only meaningful with the model that produced the descriptors it was trained on, so
``build_codebook.py`` writes them as one directory (atomically), and every index built from it
carries a copy::

    MODELS_DIR/manifest.json   kind "retrieval_models": format version, checksums of the files below
    MODELS_DIR/config.yaml     the SystemConfig used
    MODELS_DIR/mda.pt          MDA model (MdaModel.save)
    MODELS_DIR/glam.pt         GLAM model (GlamModel.save)
    MODELS_DIR/codebook.npz    k-means codebook (Codebook.save); absent before the codebook is trained
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from asmk_index.persistence import (MANIFEST_NAME, IndexFormatError, atomic_directory,
                                    read_arrays, write_arrays)

from asmk_index.codebook import Codebook
from glam.config import ExtractionConfig as GlamExtractionConfig
from glam.extract import GlobalExtractor, extract_global_descriptor
from glam.model import GlamModel
from mda.config import ExtractionConfig as MdaExtractionConfig
from mda.extract import LocalFeatureExtractor, LocalFeatures, extract_local_features
from mda.model import MdaModel

from .config import SystemConfig, resolve_device

logger = logging.getLogger(__name__)

MODELS_KIND = "retrieval_models"
CONFIG_FILE, MDA_FILE, GLAM_FILE, CODEBOOK_FILE = "config.yaml", "mda.pt", "glam.pt", "codebook.npz"


class ModelBundle:
    """MDA + GLAM models, the codebook and the config of one collection; extraction helpers."""

    def __init__(self, config: SystemConfig, mda_model, glam_model, codebook=None):
        self.config = config
        self.mda = mda_model
        self.glam = glam_model
        self.codebook = codebook
        self._models_id: str | None = None
        self.device = resolve_device(config.extraction.device)
        for model in (self.mda, self.glam):
            model.to(self.device).eval()

    # ------------------------------------------------------------------ creation
    @classmethod
    def initialize(cls, config: SystemConfig, fit_images: Sequence[np.ndarray]) -> "ModelBundle":
        """Build untrained-head models and learn their PCA reduction/whitening from ``fit_images``."""
        if not fit_images:
            raise ValueError("no images to initialise the models from (all failed to load?)")
        mda_model = MdaModel(config.mda)
        glam_model = GlamModel(config.glam)
        bundle = cls(config, mda_model, glam_model)
        extraction = config.extraction
        logger.info("learning the MDA reduction and GLAM whitening from %d images", len(fit_images))
        bundle.mda.fit_reduction(list(fit_images), max_images=len(fit_images),
                                 features_per_image=extraction.top_n,
                                 scales=tuple(extraction.scales), max_size=extraction.max_size)
        bundle.glam.fit_whitening(list(fit_images), max_images=len(fit_images),
                                  extraction=bundle.glam_extraction_config())
        return bundle

    # ------------------------------------------------------------------ extraction
    def mda_extraction_config(self):
        extraction = self.config.extraction
        return MdaExtractionConfig(scales=tuple(extraction.scales), max_size=extraction.max_size,
                                   top_n=extraction.top_n)

    def glam_extraction_config(self):
        extraction = self.config.extraction
        return GlamExtractionConfig(scales=tuple(extraction.scales), max_size=extraction.max_size)

    def local_features(self, image: np.ndarray) -> LocalFeatures:
        """MDA local features of an (H, W, 3) uint8 image (already at most ``max_size``)."""
        return extract_local_features(self.mda, image, config=self.mda_extraction_config())

    def global_descriptor(self, image: np.ndarray) -> np.ndarray:
        """GLAM global descriptor (512,) float32 of an (H, W, 3) uint8 image."""
        return np.asarray(extract_global_descriptor(self.glam, image,
                                                    config=self.glam_extraction_config()),
                          dtype=np.float32).reshape(-1)

    def local_extractor(self):
        """Callable for ``imagedata.extraction.extract_to_file``: image tensor -> local features."""
        return LocalFeatureExtractor(self.mda, self.mda_extraction_config())

    def global_extractor(self):
        """Callable for ``imagedata.extraction.extract_to_file``: image tensor -> (1, D) global."""
        return GlobalExtractor(self.glam, self.glam_extraction_config())

    def feature_attributes(self, kind: str) -> dict:
        """What a feature file's content depends on (a resumed file must match it)."""
        extraction = self.config.to_dict()["extraction"]
        extraction.pop("device")  # where the models ran does not change the features
        return {"kind": kind, "models_id": self.models_id, "extraction": extraction}

    @property
    def global_dim(self) -> int:
        """Size of the GLAM global descriptor."""
        return int(self.glam.output_dim)

    @property
    def models_id(self) -> str:
        """sha256 of the MDA and GLAM weights: identifies the features these models produce."""
        if self._models_id is None:
            digest = hashlib.sha256()
            for model in (self.mda, self.glam):
                for name, tensor in sorted(model.state_dict().items()):
                    digest.update(name.encode())
                    digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
            self._models_id = digest.hexdigest()
        return self._models_id

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """Write the bundle atomically to ``directory`` (see the module docstring)."""
        directory = Path(directory)
        with atomic_directory(directory) as temporary:
            self.config.save(temporary / CONFIG_FILE)
            self.mda.save(temporary / MDA_FILE)
            self.glam.save(temporary / GLAM_FILE)
            if self.codebook is not None:
                self.codebook.save(temporary / CODEBOOK_FILE)
            _write_manifest(temporary)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, *, require_codebook: bool = True,
             device: str | None = None) -> "ModelBundle":
        """Read a bundle; checks version, kind and checksums; ``device`` overrides the config's."""
        directory = Path(directory)
        files = verify_models_directory(directory)
        if require_codebook and CODEBOOK_FILE not in files:
            raise IndexFormatError(f"{directory}: no {CODEBOOK_FILE}: train the codebook first "
                                   "(pipelines/build_codebook.py)")
        config = SystemConfig.load(directory / CONFIG_FILE)
        if device is not None:
            config.extraction.device = device
        target_device = resolve_device(config.extraction.device)
        mda_model = MdaModel.load(directory / MDA_FILE, map_location=target_device)
        glam_model = GlamModel.load(directory / GLAM_FILE, map_location=target_device)
        codebook = Codebook.load(directory / CODEBOOK_FILE) if CODEBOOK_FILE in files else None
        return cls(config, mda_model, glam_model, codebook)


def _write_manifest(directory: Path) -> list[str]:
    names = sorted(path.name for path in directory.iterdir()
                   if path.is_file() and path.name != MANIFEST_NAME)
    write_arrays(directory, kind=MODELS_KIND, params={}, counts={}, arrays={}, files=names)
    return names


def verify_models_directory(directory: str | os.PathLike) -> dict[str, str]:
    """Check a models directory (version, kind, files' checksums); returns ``{file: sha256}``."""
    directory = Path(directory)
    if directory.exists() and not (directory / MANIFEST_NAME).is_file():
        raise IndexFormatError(f"{directory}: not a codebook directory written by "
                               "pipelines/build_codebook.py (no manifest.json)")
    manifest, _ = read_arrays(directory, kind=MODELS_KIND)
    files = manifest["files"]
    for name in (CONFIG_FILE, MDA_FILE, GLAM_FILE):
        if name not in files:
            raise IndexFormatError(f"{directory}: {name} missing from the manifest (corrupt)")
    return {name: entry["sha256"] for name, entry in files.items()}


def copy_models_directory(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copy a verified models directory into ``target`` (a folder inside an index being written)."""
    verify_models_directory(source)
    shutil.copytree(source, target)


__all__ = ["ModelBundle", "verify_models_directory", "copy_models_directory",
           "MODELS_KIND"]
