"""The index directory: the two-stage index of a collection plus everything needed to query it.

::

    INDEX_DIR/manifest.json     kind "retrieval_index": format version, counts, image root, checksums
    INDEX_DIR/image_ids.npy     (n,) int64 id of every indexed image (stable across append/remove)
    INDEX_DIR/image_names.npy   (n,) unicode name of every image (path relative to the image root)
    INDEX_DIR/next_id.npy       ()  int64 the id the next added image gets
    INDEX_DIR/two_stage/        asmk_index.TwoStageIndex (ASMK* inverted file + global index)
    INDEX_DIR/models/           the codebook directory it was built with (models, codebook, config)
    INDEX_DIR/report.json       the last build/append/remove run: images added, removed, failed

The whole directory is written under a temporary name and renamed into place (a crash leaves the
old index or the new one), and loading verifies versions and checksums.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np

from asmk_index.persistence import (IndexFormatError, atomic_directory, read_arrays, require,
                                    write_arrays)

from .models import ModelBundle, copy_models_directory

logger = logging.getLogger(__name__)

INDEX_KIND = "retrieval_index"
TWO_STAGE_DIR, MODELS_DIR, REPORT_FILE = "two_stage", "models", "report.json"


def new_two_stage_index(bundle: ModelBundle):
    """An empty ``asmk_index.TwoStageIndex`` with the bundle's codebook and ASMK*/search settings."""
    from asmk_index.two_stage import TwoStageIndex
    asmk = bundle.config.asmk
    return TwoStageIndex.create(bundle.codebook, bundle.global_dim,
                                binary=asmk.binary, alpha=asmk.alpha,
                                similarity_threshold=asmk.similarity_threshold,
                                multiple_assignment=asmk.multiple_assignment,
                                query_multiple_assignment=min(asmk.query_multiple_assignment,
                                                              bundle.codebook.size),
                                use_idf=asmk.use_idf, method=bundle.config.search.global_method)


class RetrievalIndex:
    """An indexed collection: models, two-stage index and the image names behind the ids."""

    def __init__(self, models: ModelBundle, models_dir: str | os.PathLike, two_stage=None, *,
                 names: Sequence[str] = (), ids: Sequence[int] = (), next_id: int = 0,
                 image_root: str | None = None):
        self.models = models
        self.models_dir = Path(models_dir)
        self.two_stage = two_stage if two_stage is not None else new_two_stage_index(models)
        self.names: list[str] = list(names)
        self.ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        require(len(self.names) == len(self.ids), self.models_dir,
                f"{len(self.names)} image names for {len(self.ids)} ids")
        self.next_id = int(next_id)
        self.image_root = image_root
        self._reindex()

    def _reindex(self) -> None:
        self._id_of = {name: int(i) for name, i in zip(self.names, self.ids)}
        self._name_of = {int(i): name for name, i in zip(self.names, self.ids)}

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self._id_of

    def name_of(self, image_id: int) -> str:
        return self._name_of[int(image_id)]

    def id_of(self, name: str) -> int:
        return self._id_of[name]

    def image_path(self, name: str) -> Path | None:
        """Where the image file was when it was indexed (None if the root is unknown)."""
        return None if self.image_root is None else Path(self.image_root) / name

    # ------------------------------------------------------------------ changes
    def add(self, names: Sequence[str], global_descriptors: np.ndarray,
            local_descriptors: np.ndarray, local_owner: np.ndarray) -> np.ndarray:
        """Add images: ``global_descriptors`` (n, Dg), local (N, Dl) owned by ``local_owner`` (N,)
        positions into ``names``. Returns the new ids. Names already indexed are an error."""
        names = list(names)
        duplicates = sorted(set(names) & set(self._id_of))
        if duplicates or len(set(names)) != len(names):
            raise ValueError(f"images already in the index (remove them first): {duplicates[:10]}")
        if not names:
            return np.zeros(0, np.int64)
        ids = np.arange(self.next_id, self.next_id + len(names), dtype=np.int64)
        self.two_stage.add(global_descriptors, ids, local_descriptors,
                           ids[np.asarray(local_owner, dtype=np.int64)])
        self.next_id += len(names)
        self.names.extend(names)
        self.ids = np.concatenate([self.ids, ids])
        self._reindex()
        return ids

    def remove(self, names: Sequence[str]) -> tuple[list[str], list[str]]:
        """Take images out by name (with or without extension); returns (removed, not found)."""
        by_stem: dict[str, list[str]] = {}
        if any(name not in self._id_of for name in names):  # names given without extension
            for known in self.names:
                by_stem.setdefault(str(PurePosixPath(known).with_suffix("")), []).append(known)
        resolved = {name: name if name in self._id_of else
                    (by_stem[name][0] if len(by_stem.get(name, ())) == 1 else None)
                    for name in dict.fromkeys(names)}
        present = list(dict.fromkeys(known for known in resolved.values() if known is not None))
        missing = [name for name, known in resolved.items() if known is None]
        if present:
            remove_ids = np.array([self._id_of[name] for name in present], dtype=np.int64)
            self.two_stage.remove(remove_ids)
            keep = ~np.isin(self.ids, remove_ids)
            self.names = [name for name, kept in zip(self.names, keep) if kept]
            self.ids = self.ids[keep]
            self._reindex()
        return present, missing

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike, *, report: dict | None = None) -> Path:
        """Write the index directory atomically (see the module docstring)."""
        directory = Path(directory)
        with atomic_directory(directory) as temporary:
            copy_models_directory(self.models_dir, temporary / MODELS_DIR)
            self.two_stage.save(temporary / TWO_STAGE_DIR)
            if report is not None:
                (temporary / REPORT_FILE).write_text(json.dumps(report, indent=2), encoding="utf-8")
            names = np.asarray(self.names, dtype=str) if self.names else np.zeros(0, dtype="<U1")
            write_arrays(temporary, kind=INDEX_KIND,
                         params={"image_root": self.image_root,
                                 "codebook_hash": self.models.codebook.hash,
                                 "models_id": self.models.models_id},
                         counts={"images": len(self.names)},
                         arrays={"image_ids": self.ids, "image_names": names,
                                 "next_id": np.asarray(self.next_id, dtype=np.int64)},
                         components={TWO_STAGE_DIR: temporary / TWO_STAGE_DIR,
                                     MODELS_DIR: temporary / MODELS_DIR})
        self.models_dir = directory / MODELS_DIR
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, *, device: str | None = None) -> "RetrievalIndex":
        """Read an index directory (checks version, kind, checksums, consistency)."""
        from asmk_index.two_stage import TwoStageIndex
        directory = Path(directory)
        manifest, arrays = read_arrays(directory, kind=INDEX_KIND)
        models = ModelBundle.load(directory / MODELS_DIR, device=device)
        two_stage = TwoStageIndex.load(directory / TWO_STAGE_DIR)
        params = manifest.get("params", {})
        require(models.codebook.hash == params.get("codebook_hash"), directory,
                "the codebook in models/ is not the one the index was built with (corrupt)")
        names = [str(name) for name in arrays["image_names"].tolist()]
        index = cls(models, directory / MODELS_DIR, two_stage, names=names,
                    ids=arrays["image_ids"], next_id=int(arrays["next_id"]),
                    image_root=params.get("image_root"))
        require(len(two_stage) == len(names), directory,
                f"the two-stage index holds {len(two_stage)} images but {len(names)} names are "
                "listed (corrupt)")
        return index

    def report(self, directory: str | os.PathLike) -> dict:
        path = Path(directory) / REPORT_FILE
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def is_index_directory(path: str | os.PathLike) -> bool:
    try:
        manifest = json.loads((Path(path) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return manifest.get("kind") == INDEX_KIND


__all__ = ["RetrievalIndex", "new_two_stage_index", "is_index_directory", "INDEX_KIND",
           "IndexFormatError"]
