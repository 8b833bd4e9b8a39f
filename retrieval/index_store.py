"""The index directory: the two-stage index of a collection plus everything needed to query it.

::

    INDEX_DIR/manifest.json     kind "retrieval_index": format version, counts, the codebook
                                directory it refers to (path and hashes), the image roots, checksums
    INDEX_DIR/image_ids.npy     (n,) int64 id of every indexed image (stable across append/remove)
    INDEX_DIR/image_names.npy   (n,) unicode name of every image (path relative to its image root)
    INDEX_DIR/image_roots.npy   (n,) int32 which of the manifest's image roots each image is under
    INDEX_DIR/next_id.npy       ()  int64 the id the next added image gets
    INDEX_DIR/two_stage/        asmk_index.TwoStageIndex (ASMK* inverted file + global index)
    INDEX_DIR/report.json       the last build/append/remove run: images added, removed, failed

The model and the codebook are not copied: the index refers to the codebook directory it was built
with (its path relative to the index and absolute) and records the hashes of its model and
codebook, which loading checks. The files above form one version of the index directory, published
whole under a writer lock (``asmk_index.persistence.publish_directory``: a crash leaves the old
index or the new one; a reader always loads one whole version), and loading verifies versions,
checksums and counts. Every image name is resolved under its root: a name that leaves it (``../``, an
absolute path) is refused at add and at load.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np

from asmk_index.persistence import (IndexFormatError, check_counts, current_version, load_current,
                                    publish_directory, read_arrays, read_manifest, require, write_arrays)

from .models import ModelBundle

logger = logging.getLogger(__name__)

INDEX_KIND = "retrieval_index"
TWO_STAGE_DIR, REPORT_FILE = "two_stage", "report.json"


def new_two_stage_index(bundle: ModelBundle):
    """An empty ``asmk_index.TwoStageIndex`` with the bundle's codebook and ASMK*/search settings."""
    from asmk_index.two_stage import TwoStageIndex
    asmk, search = bundle.config.asmk, bundle.config.search
    return TwoStageIndex.create(bundle.codebook, bundle.global_dim,
                                binary=asmk.binary, alpha=asmk.alpha,
                                similarity_threshold=asmk.similarity_threshold,
                                multiple_assignment=asmk.multiple_assignment,
                                query_multiple_assignment=min(asmk.query_multiple_assignment,
                                                              bundle.codebook.size),
                                use_idf=asmk.use_idf, method=search.global_method,
                                local_features=True, query_expansion=search.query_expansion,
                                qe_alpha=search.qe_alpha, dba_neighbors=search.dba_neighbors,
                                dba_alpha=search.dba_alpha)


def check_image_name(name: str) -> str:
    """``name`` if it is a relative path that stays under its root, else ValueError."""
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts:
        raise ValueError(f"image name {name!r} is not a relative path inside its image folder")
    return name


class RetrievalIndex:
    """An indexed collection: the codebook directory's models, the two-stage index, and the name
    and image root behind every id."""

    def __init__(self, models: ModelBundle, codebook_dir: str | os.PathLike, two_stage=None, *,
                 names: Sequence[str] = (), ids: Sequence[int] = (), next_id: int = 0,
                 roots: Sequence[str] = (), root_index: Sequence[int] = ()):
        self.models = models
        self.codebook_dir = Path(codebook_dir)
        self.two_stage = two_stage if two_stage is not None else new_two_stage_index(models)
        self.names: list[str] = [check_image_name(name) for name in names]
        self.ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        self.roots: list[str] = [str(root) for root in roots]
        self.root_index = np.asarray(root_index, dtype=np.int32).reshape(-1)
        if not (len(self.names) == len(self.ids) == len(self.root_index)):
            raise ValueError(f"{len(self.names)} image names, {len(self.ids)} ids and "
                             f"{len(self.root_index)} root indices")
        if self.root_index.size and (self.root_index.min() < 0 or self.root_index.max() >= len(self.roots)):
            raise ValueError(f"image root indices outside the {len(self.roots)} roots listed")
        self.next_id = int(next_id)
        self._reindex()

    def _reindex(self) -> None:
        self._id_of = {name: int(i) for name, i in zip(self.names, self.ids)}
        self._position_of = {int(i): position for position, i in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self._id_of

    def name_of(self, image_id: int) -> str:
        return self.names[self._position_of[int(image_id)]]

    def id_of(self, name: str) -> int:
        return self._id_of[name]

    def image_path(self, name: str) -> Path | None:
        """Where the image file was when it was indexed (None for an image added without a root)."""
        position = self._position_of[self._id_of[name]]
        root = self.roots[int(self.root_index[position])]
        return None if not root else Path(root) / check_image_name(name)

    def root_number(self, root: str | os.PathLike | None) -> int:
        """The index of ``root`` in :attr:`roots` (added when new); None/"" = no root."""
        root = "" if root is None else os.path.abspath(root)
        if root not in self.roots:
            self.roots.append(root)
        return self.roots.index(root)

    # ------------------------------------------------------------------ changes
    def add(self, names: Sequence[str], global_descriptors: np.ndarray,
            local_descriptors: np.ndarray, local_owner: np.ndarray, local_geometry: np.ndarray, *,
            root: str | os.PathLike | None = None) -> np.ndarray:
        """Add images: ``global_descriptors`` (n, Dg), local (N, Dl) owned by ``local_owner`` (N,)
        positions into ``names`` (paths relative to the folder ``root``), with their x, y, scale
        ``local_geometry`` (N, 3) (kept for spatial verification). Returns the new ids. Names
        already indexed, or leaving their root, are an error."""
        names = [check_image_name(name) for name in names]
        duplicates = sorted(set(names) & set(self._id_of))
        if duplicates or len(set(names)) != len(names):
            raise ValueError(f"images already in the index (remove them first): {duplicates[:10]}")
        if not names:
            return np.zeros(0, np.int64)
        ids = np.arange(self.next_id, self.next_id + len(names), dtype=np.int64)
        root_number = self.root_number(root)
        self.two_stage.add(global_descriptors, ids, local_descriptors,
                           ids[np.asarray(local_owner, dtype=np.int64)], local_geometry=local_geometry)
        self.next_id += len(names)
        self.names.extend(names)
        self.ids = np.concatenate([self.ids, ids])
        self.root_index = np.concatenate([self.root_index, np.full(len(names), root_number, np.int32)])
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
            self.root_index = self.root_index[keep]
            self._reindex()
        return present, missing

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike, *, report: dict | None = None) -> Path:
        """Write the index directory atomically (see the module docstring)."""
        directory = Path(directory)
        codebook = os.path.abspath(self.codebook_dir)
        with publish_directory(directory) as temporary:
            self.two_stage.save(temporary / TWO_STAGE_DIR)
            if report is not None:
                (temporary / REPORT_FILE).write_text(json.dumps(report, indent=2), encoding="utf-8")
            names = np.asarray(self.names, dtype=str) if self.names else np.zeros(0, dtype="<U1")
            write_arrays(temporary, kind=INDEX_KIND,
                         params={"codebook_directory": os.path.relpath(codebook, os.path.abspath(directory)),
                                 "codebook_directory_absolute": codebook,
                                 "codebook_hash": self.models.codebook.hash,
                                 "model_sha256": self.models.model_hash,
                                 "image_roots": self.roots},
                         counts={"images": len(self.names)},
                         arrays={"image_ids": self.ids, "image_names": names,
                                 "image_roots": self.root_index,
                                 "next_id": np.asarray(self.next_id, dtype=np.int64)},
                         components={TWO_STAGE_DIR: temporary / TWO_STAGE_DIR})
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, *, device: str | None = None,
             models: ModelBundle | None = None) -> "RetrievalIndex":
        """Read an index directory (its current version) and the codebook directory it refers to
        (checks versions, kinds, checksums, hashes and counts). ``models``: the codebook
        directory's bundle already loaded (it must be the one the index refers to)."""
        directory = Path(directory)
        return load_current(directory, lambda version: cls._load_version(directory, version, device, models))

    @classmethod
    def _load_version(cls, directory: Path, version: Path, device: str | None,
                      models: ModelBundle | None) -> "RetrievalIndex":
        from asmk_index.two_stage import TwoStageIndex
        manifest, arrays = read_arrays(version, kind=INDEX_KIND)
        params = manifest.get("params", {})
        codebook_dir = find_codebook_directory(directory, params)
        if models is None:
            models = ModelBundle.load(codebook_dir, device=device)
        require(models.model_hash == params.get("model_sha256"), directory,
                f"the codebook directory {codebook_dir} now holds another model than the one this "
                "index was built with; rebuild the index (pipelines/index.py) or restore that codebook")
        require(models.codebook.hash == params.get("codebook_hash"), directory,
                f"the codebook in {codebook_dir} is not the one this index was built with; rebuild "
                "the index (pipelines/index.py) or restore that codebook")
        two_stage = TwoStageIndex.load(version / TWO_STAGE_DIR)
        names = [str(name) for name in arrays["image_names"].tolist()]
        check_counts(version, manifest, {"images": len(names)})
        try:
            index = cls(models, codebook_dir, two_stage, names=names, ids=arrays["image_ids"],
                        next_id=int(arrays["next_id"]), roots=params.get("image_roots", []),
                        root_index=arrays["image_roots"])
        except ValueError as error:
            raise IndexFormatError(f"{directory}: {error} (corrupt)") from None
        require(len(two_stage) == len(names), directory,
                f"the two-stage index holds {len(two_stage)} images but {len(names)} names are "
                "listed (corrupt)")
        return index

    @staticmethod
    def report(directory: str | os.PathLike) -> dict:
        """The last run's report.json of an index directory ({} when there is none)."""
        path = current_version(directory) / REPORT_FILE
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def find_codebook_directory(directory: Path, params: dict) -> Path:
    """The codebook directory an index refers to: its path relative to the index, else the
    absolute one; a clear error when neither is there."""
    relative, absolute = params.get("codebook_directory"), params.get("codebook_directory_absolute")
    if relative is None and absolute is None:
        raise IndexFormatError(f"{directory}: the manifest names no codebook directory (corrupt, or an "
                               "index of an older version: rebuild it with pipelines/index.py)")
    candidates = [Path(os.path.abspath(directory)) / relative] if relative else []
    candidates += [Path(absolute)] if absolute else []
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"{directory}: the codebook directory this index was built with is missing "
                            f"(looked at {', '.join(str(c) for c in candidates)}); an index refers to its "
                            "codebook directory instead of copying the model: move or restore it beside "
                            "the index")


def index_version(directory: str | os.PathLike) -> str:
    """What changes whenever the index directory is written again (its current version's path
    and manifest time); "" when there is no index."""
    try:
        version = current_version(directory)
        return f"{version}:{(version / 'manifest.json').stat().st_mtime_ns}"
    except (OSError, ValueError):
        return ""


def is_index_directory(path: str | os.PathLike) -> bool:
    try:
        return read_manifest(path).get("kind") == INDEX_KIND
    except (OSError, ValueError):
        return False


__all__ = ["RetrievalIndex", "new_two_stage_index", "is_index_directory", "index_version", "check_image_name",
           "find_codebook_directory", "INDEX_KIND", "IndexFormatError"]
