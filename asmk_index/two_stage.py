"""Two-stage index: a :class:`GlobalIndex` shortlist re-ranked by an ASMK* index (same image ids).

Every image is in the global index; an image with local descriptors is also in the ASMK* index.
An image added with zero local descriptors lives only in the global index: its ASMK* score is 0
(it can be shortlisted but ranks below every image sharing a visual word with the query, and
full ASMK* search never returns it).

Search modes (:meth:`TwoStageIndex.search`):

- ``"two_stage"``: stage 1 takes the global top-``shortlist``; stage 2 scores those images with
  ASMK* (:meth:`AsmkIndex.score`, which touches only them) and ranks them by ASMK* score, ties
  broken by global score. ``scores`` are the ASMK* scores.
- ``"asmk"``: full ASMK* search (stage 1); the results' global scores are then filled in with
  :meth:`GlobalIndex.score` (stage 2). ``scores`` are the ASMK* scores.
- ``"global"``: global search only; ``scores`` are the global scores, ``asmk_scores`` are NaN.

A query with zero local descriptors has ASMK* score 0 with every image ("two_stage" then keeps the
global order; "asmk" returns no results).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .global_index import GlobalIndex
from .persistence import (IndexFormatError, check_counts, load_current, publish_directory,
                          read_arrays, require, write_arrays)
from .validation import check_descriptors, check_ids

TWO_STAGE_KIND = "two_stage_index"
GLOBAL_COMPONENT = "global"
ASMK_COMPONENT = "asmk"
MODES = ("two_stage", "asmk", "global")


def _asmk_class():
    from .asmk import AsmkIndex  # imported late: layer-internal, keeps this module light
    return AsmkIndex


@dataclass
class SearchResult:
    """Ranked results of one query, best first; all arrays have the same length.

    ``ids`` int64, ``scores`` the final ranking score (ASMK* for "two_stage"/"asmk", global for
    "global"), ``global_scores``, ``asmk_scores`` (NaN in "global" mode), seconds per stage.
    """

    ids: np.ndarray
    scores: np.ndarray
    global_scores: np.ndarray
    asmk_scores: np.ndarray
    mode: str
    stage1_seconds: float = 0.0
    stage2_seconds: float = 0.0
    shortlist_size: int = field(default=0)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def total_seconds(self) -> float:
        return self.stage1_seconds + self.stage2_seconds


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _id_set_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return np.array_equal(np.sort(a), np.sort(b))


class TwoStageIndex:
    """A :class:`GlobalIndex` and an ASMK* index over the same images (see module docstring)."""

    def __init__(self, global_index: GlobalIndex, asmk_index):
        asmk_ids = np.asarray(asmk_index.image_ids, np.int64)
        if asmk_ids.size and not global_index.contains(asmk_ids).all():
            missing = asmk_ids[~global_index.contains(asmk_ids)]
            raise ValueError(f"the ASMK* index holds {missing.size} image id(s) that the global "
                             f"index lacks, e.g. {missing[:5].tolist()}")
        self.global_index = global_index
        self.asmk_index = asmk_index

    @classmethod
    def create(cls, codebook, global_dim: int, *, binary: bool = True, alpha: float = 3.0,
               similarity_threshold: float = 0.0, multiple_assignment: int = 1,
               query_multiple_assignment: int = 5, use_idf: bool = False,
               method: str = "exact", nlist: int | None = None, nprobe: int = 16,
               normalize: bool = True, **global_options) -> "TwoStageIndex":
        """Empty index: an ``AsmkIndex(codebook, ...)`` and a ``GlobalIndex(global_dim, ...)``
        (``global_options``: further :class:`GlobalIndex` keywords, e.g. ``hnsw_m``)."""
        asmk_index = _asmk_class()(
            codebook, binary=binary, alpha=alpha, similarity_threshold=similarity_threshold,
            multiple_assignment=multiple_assignment,
            query_multiple_assignment=query_multiple_assignment, use_idf=use_idf)
        global_index = GlobalIndex(global_dim, method=method, nlist=nlist, nprobe=nprobe,
                                   normalize=normalize, **global_options)
        return cls(global_index, asmk_index)

    # ------------------------------------------------------------------ properties
    @property
    def image_ids(self) -> np.ndarray:
        """All image ids (those of the global index), (n,) int64."""
        return self.global_index.image_ids

    @property
    def global_dim(self) -> int:
        return self.global_index.dim

    @property
    def local_dim(self) -> int | None:
        codebook = getattr(self.asmk_index, "codebook", None)
        return None if codebook is None else int(codebook.dim)

    def __len__(self) -> int:
        return len(self.global_index)

    def contains(self, image_ids) -> np.ndarray:
        return self.global_index.contains(image_ids)

    def memory_bytes(self) -> int:
        return int(self.global_index.memory_bytes() + self.asmk_index.memory_bytes())

    # ------------------------------------------------------------------ mutation
    def add(self, global_descriptors, image_ids, local_descriptors, local_image_ids) -> None:
        """Add images: ``global_descriptors`` (n, Dg) for ``image_ids`` (n,) and their local
        descriptors (N, D) with the image id of each (N,). Every local id must be one of
        ``image_ids``; an image may have no local descriptors. Atomic: on any error both indexes
        are left as they were."""
        global_descriptors = check_descriptors(global_descriptors, dim=self.global_dim,
                                               name="global_descriptors")
        ids = check_ids(image_ids, length=global_descriptors.shape[0])
        local_descriptors = check_descriptors(local_descriptors, dim=self.local_dim,
                                              name="local_descriptors", allow_empty=True)
        local_ids = check_ids(local_image_ids, length=local_descriptors.shape[0],
                              name="local_image_ids")
        foreign = ~np.isin(local_ids, ids)
        if foreign.any():
            raise ValueError(f"local_image_ids: {int(foreign.sum())} local descriptor(s) belong to "
                             f"images not being added, e.g. id {int(local_ids[foreign][0])}")
        self.global_index.add(global_descriptors, ids)     # validates ids; unchanged on error
        if local_ids.size == 0:
            return
        try:
            self.asmk_index.add(local_descriptors, local_ids)
        except BaseException:
            self.global_index.remove(ids)
            raise

    def remove(self, image_ids) -> None:
        """Remove images from both indexes (unknown ids: ``KeyError``, nothing removed)."""
        ids = check_ids(image_ids)
        unique = np.unique(ids)
        if unique.size != ids.size:
            raise ValueError("image_ids: duplicate ids in one remove")
        known = self.global_index.contains(ids)
        if not known.all():
            raise KeyError(f"image_ids: {int((~known).sum())} unknown image id(s), e.g. "
                           f"{ids[~known][:5].tolist()}")
        if ids.size == 0:
            return
        in_asmk = np.asarray(self.asmk_index.contains(ids), bool)
        if in_asmk.any():
            self.asmk_index.remove(ids[in_asmk])
        self.global_index.remove(ids)

    # ------------------------------------------------------------------ search
    def search(self, global_query, local_query=None, k: int = 10, shortlist: int = 100,
               mode: str = "two_stage", global_weight: float = 0.0) -> SearchResult:
        """Rank images for one query: ``global_query`` (Dg,), ``local_query`` (n, D) (may be None
        in "global" mode). ``shortlist`` (raised to ``k`` if smaller) images are re-scored in
        "two_stage" mode. Returns a :class:`SearchResult` of at most ``k`` images, best first.

        ``global_weight`` (two_stage mode): the shortlist is ranked by
        ``asmk_score + global_weight * global_score``; 0 (the default) ranks by ASMK* alone, ties
        broken by the global score. A small weight keeps the first stage's evidence when the local
        features are weak (e.g. untrained MDA heads); ``scores`` then hold the fused values."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        global_weight = float(global_weight)
        if not np.isfinite(global_weight) or global_weight < 0:
            raise ValueError(f"global_weight must be a finite number >= 0, got {global_weight!r}")
        k = _positive_int(k, "k")
        shortlist = max(_positive_int(shortlist, "shortlist"), k)
        global_query = np.asarray(global_query)
        if global_query.ndim != 1:
            raise ValueError(f"global_query: expected one (Dg,) vector, got shape "
                             f"{global_query.shape}")
        check_descriptors(global_query[None], dim=self.global_dim, name="global_query")
        if local_query is None:
            if mode != "global":
                raise ValueError(f"mode {mode!r} needs local query descriptors")
        else:
            local_query = check_descriptors(local_query, dim=self.local_dim, name="local_query",
                                            allow_empty=True)
        if mode == "global":
            return self._search_global(global_query, k)
        if mode == "asmk":
            return self._search_asmk(global_query, local_query, k)
        return self._search_two_stage(global_query, local_query, k, shortlist, global_weight)

    def _asmk_scores(self, local_query: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """ASMK* scores of ``ids`` (0 for images without local descriptors or an empty query)."""
        scores = np.zeros(ids.shape[0], np.float64)
        if local_query.shape[0] == 0 or ids.size == 0:
            return scores
        in_asmk = np.asarray(self.asmk_index.contains(ids), bool)
        if in_asmk.any():
            scores[in_asmk] = self.asmk_index.score(local_query, ids[in_asmk])
        return scores

    def _search_two_stage(self, global_query, local_query, k, shortlist,
                          global_weight) -> SearchResult:
        start = time.perf_counter()
        candidates, global_scores = self.global_index.search(global_query, shortlist)
        middle = time.perf_counter()
        asmk_scores = self._asmk_scores(local_query, candidates)
        global_scores = global_scores.astype(np.float64)
        final_scores = asmk_scores + global_weight * global_scores if global_weight else asmk_scores
        order = np.lexsort((-global_scores, -final_scores))[:k]
        end = time.perf_counter()
        return SearchResult(ids=candidates[order], scores=final_scores[order],
                            global_scores=global_scores[order], asmk_scores=asmk_scores[order],
                            mode="two_stage", stage1_seconds=middle - start,
                            stage2_seconds=end - middle, shortlist_size=int(candidates.size))

    def _search_asmk(self, global_query, local_query, k) -> SearchResult:
        start = time.perf_counter()
        if local_query.shape[0] == 0 or len(self.asmk_index) == 0:
            ids, asmk_scores = np.empty(0, np.int64), np.empty(0, np.float64)
        else:
            ids, asmk_scores = self.asmk_index.search(local_query, k)
            ids = np.asarray(ids, np.int64)
            asmk_scores = np.asarray(asmk_scores, np.float64)
        middle = time.perf_counter()
        global_scores = self.global_index.score(global_query, ids)
        end = time.perf_counter()
        return SearchResult(ids=ids, scores=asmk_scores, global_scores=global_scores,
                            asmk_scores=asmk_scores, mode="asmk", stage1_seconds=middle - start,
                            stage2_seconds=end - middle, shortlist_size=int(ids.size))

    def _search_global(self, global_query, k) -> SearchResult:
        start = time.perf_counter()
        ids, global_scores = self.global_index.search(global_query, k)
        end = time.perf_counter()
        return SearchResult(ids=ids, scores=global_scores, global_scores=global_scores,
                            asmk_scores=np.full(ids.shape[0], np.nan), mode="global",
                            stage1_seconds=end - start, stage2_seconds=0.0,
                            shortlist_size=int(ids.size))

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> None:
        """Publish ``directory`` (a new version under the writer lock, or plainly as a component
        of a directory being published) with sub-directories "global" and "asmk" and a top
        manifest checksumming both and listing the image ids of each."""
        with publish_directory(directory) as temporary:
            self.global_index.save(temporary / GLOBAL_COMPONENT)
            self.asmk_index.save(temporary / ASMK_COMPONENT)
            image_ids = np.sort(self.global_index.image_ids)
            asmk_ids = np.sort(np.asarray(self.asmk_index.image_ids, np.int64))
            write_arrays(temporary, kind=TWO_STAGE_KIND,
                         params={"global_dim": self.global_dim, "local_dim": self.local_dim},
                         counts={"images": int(image_ids.size),
                                 "asmk_images": int(asmk_ids.size)},
                         arrays={"image_ids": image_ids, "asmk_image_ids": asmk_ids},
                         components={GLOBAL_COMPONENT: temporary / GLOBAL_COMPONENT,
                                     ASMK_COMPONENT: temporary / ASMK_COMPONENT})

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "TwoStageIndex":
        """Read a directory written by :meth:`save`; checksums, components and id sets are checked
        (:class:`IndexFormatError` on any mismatch); the current version is read whole, even
        while a writer replaces it."""
        return load_current(directory, cls._load_version)

    @classmethod
    def _load_version(cls, directory: Path) -> "TwoStageIndex":
        manifest, arrays = read_arrays(directory, kind=TWO_STAGE_KIND)
        require(set(manifest.get("components", {})) == {GLOBAL_COMPONENT, ASMK_COMPONENT},
                directory, "corrupt two-stage index: components 'global' and 'asmk' expected")
        require({"image_ids", "asmk_image_ids"} <= set(arrays), directory,
                "corrupt two-stage index: image id lists missing")
        global_index = GlobalIndex.load(directory / GLOBAL_COMPONENT)
        asmk_index = _asmk_class().load(directory / ASMK_COMPONENT)
        asmk_ids = np.asarray(asmk_index.image_ids, np.int64)
        require(_id_set_equal(global_index.image_ids, arrays["image_ids"]), directory,
                "image id mismatch: the global index does not hold the images the manifest lists")
        require(_id_set_equal(asmk_ids, arrays["asmk_image_ids"]), directory,
                "image id mismatch: the ASMK* index does not hold the images the manifest lists")
        require(bool(np.isin(asmk_ids, global_index.image_ids).all()), directory,
                "image id mismatch: the ASMK* index holds images the global index lacks")
        check_counts(directory, manifest, {"images": len(global_index),
                                           "asmk_images": int(asmk_ids.size)})
        try:
            return cls(global_index, asmk_index)
        except ValueError as error:
            raise IndexFormatError(f"{directory}: {error}") from error
