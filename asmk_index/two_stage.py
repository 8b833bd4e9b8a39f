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

Options of "two_stage" (:meth:`TwoStageIndex.search`):

- ``fusion``: how the shortlist is ranked. ``None`` (default): ASMK* + ``global_weight`` x global
  (above). ``"asmk"``: ASMK*, ties by global; ``"global"``: the global order;
  ``"minmax"`` / ``"zscore"`` / ``"rrf"`` or a :class:`fusion.Fusion`: a fusion rule that does not
  depend on the scales of the scores (:mod:`fusion`), ties keep the global order.
- ``asmk_shortlist=m``: stage 1 also takes the ASMK* top m over the whole collection
  (:meth:`AsmkIndex.search`), and the images not already shortlisted join the shortlist with
  their global scores (:meth:`GlobalIndex.score`): objects the global descriptor misses (small in
  the photo, in clutter) still reach stages 2 and 3. 0 (default): the global shortlist alone.
- ``verify_top=R`` (stage 3, needs an index created with ``local_features=True`` and the query's
  ``query_geometry``): the top R of that ranking are spatially verified (:mod:`verification`)
  against their stored local features (:mod:`local_store`). Each verified image scores its
  inliers (their count, or their words' summed idf: ``VerificationConfig.inlier_weighting``). With
  a fusion rule that score joins the ranking as a third stage over the whole shortlist (an image
  not verified scores 0); otherwise the verified images (at least ``min_inliers`` inliers) of the
  top R come first, by inlier score (ties keep the stage-2 order), then every other image in the stage-2 order, and
  ``scores`` keep the stage-2 values. ``SearchResult.inliers`` and ``.verifications`` (inlier
  coordinates in both images, for drawing) come with each result.
- ``query_expansion`` / ``qe_alpha``: alpha-QE of the global query for stage 1 (also in "global"
  and "asmk" modes); DBA is an option of the global index (:class:`GlobalIndex`).
- ``verified_expansion=m`` (with stage 3; verified query expansion, after Chum et al.'s "Total
  Recall", ICCV 2007): of the top m of stage 3's ranking, the images with at least
  ``verified_expansion_inliers`` inliers are averaged with the original global query
  (:func:`global_index.expand_with`, their searched vectors, alpha 0), the whole shortlist's
  global scores are recomputed with that query and the shortlist is ranked again
  (:func:`rank_expanded`: the same ranking, the same ASMK* and inlier scores). Images that
  several views of the object confirm geometrically pull up views the local stages missed; when
  no image qualifies, the ranking stays as it is.

Local features for stage 3: an index created with ``local_features=True`` keeps, for every image
added with local descriptors, each descriptor's word, binary signature and ``local_geometry``
(x, y, scale); every :meth:`TwoStageIndex.add` with local descriptors must then pass
``local_geometry``. An index created without it refuses ``local_geometry`` and ``verify_top``.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .fusion import RULES as FUSION_RULES
from .fusion import Fusion
from .global_index import GlobalIndex, expand_with
from .local_store import LocalFeatureStore, binary_signatures, check_geometry
from .persistence import (IndexFormatError, check_counts, load_current, publish_directory,
                          read_arrays, require, write_arrays)
from .validation import check_descriptors, check_ids

TWO_STAGE_KIND = "two_stage_index"
GLOBAL_COMPONENT = "global"
ASMK_COMPONENT = "asmk"
LOCAL_COMPONENT = "local"
MODES = ("two_stage", "asmk", "global")
SINGLE_STAGE_RANKINGS = ("asmk", "global")     # fusion= values that rank by one stage
VERIFIED_EXPANSION_INLIERS = 20     # inliers an image needs to expand the query (verified QE)


def _asmk_class():
    from .asmk import AsmkIndex  # imported late: layer-internal, keeps this module light
    return AsmkIndex


@dataclass
class SearchResult:
    """Ranked results of one query, best first; all arrays have the same length.

    ``ids`` int64, ``scores`` the final ranking score (ASMK* for "two_stage"/"asmk", global for
    "global"; the fused value with a fusion rule), ``global_scores`` (those of the expanded query
    after a verified expansion), ``asmk_scores`` (NaN in "global" mode), seconds per stage.

    Stage 3 (``verify_top``): ``inliers`` (n,) int64, -1 where the image was not verified (beyond
    the top R), else its inlier count (0: rejected); ``verifications``: one
    :class:`verification.VerificationResult` (inlier pairs and their x, y in the query and in
    the image) or None per result. Without stage 3 both are None.
    """

    ids: np.ndarray
    scores: np.ndarray
    global_scores: np.ndarray
    asmk_scores: np.ndarray
    mode: str
    stage1_seconds: float = 0.0
    stage2_seconds: float = 0.0
    shortlist_size: int = field(default=0)
    inliers: np.ndarray | None = None
    verifications: list | None = None
    stage3_seconds: float = 0.0

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def total_seconds(self) -> float:
        return self.stage1_seconds + self.stage2_seconds + self.stage3_seconds


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _id_set_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return np.array_equal(np.sort(a), np.sort(b))


def _non_negative_int(value, name: str) -> int:
    if isinstance(value, bool) or int(value) != value or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


def _ranking_rule(fusion, global_weight: float):
    """The shortlist ranking: ``("legacy", global_weight)``, "asmk", "global" or a Fusion."""
    if fusion is None:
        return ("legacy", global_weight)
    if global_weight:
        raise ValueError("global_weight belongs to the default ranking (fusion=None); with a "
                         "fusion rule set its weights in fusion.Fusion")
    if isinstance(fusion, Fusion) or fusion in SINGLE_STAGE_RANKINGS:
        return fusion
    if fusion in FUSION_RULES:
        return Fusion(rule=fusion)
    raise ValueError(f"fusion must be None, one of {SINGLE_STAGE_RANKINGS + FUSION_RULES} or a "
                     f"fusion.Fusion, got {fusion!r}")


def rank_shortlist(ranking, global_scores: np.ndarray, asmk_scores: np.ndarray):
    """Stage 2: (ranking scores, order) of a shortlist (given in global order: ties keep it).

    ``ranking``: a :class:`fusion.Fusion`, "global", or the ASMK* rule with an optional global
    weight (see TwoStageIndex.search)."""
    if isinstance(ranking, Fusion):
        scores = ranking(global_scores, asmk_scores)
        return scores, np.argsort(-scores, kind="stable")
    if ranking == "global":         # the shortlist's order, unless its scores changed since
        return global_scores, np.argsort(-global_scores, kind="stable")
    weight = ranking[1] if isinstance(ranking, tuple) else 0.0
    scores = asmk_scores + weight * global_scores if weight else asmk_scores
    return scores, np.lexsort((-global_scores, -scores))


def rank_verified(ranking, global_scores: np.ndarray, asmk_scores: np.ndarray, scores: np.ndarray,
                  order: np.ndarray, inlier_scores: np.ndarray):
    """Stage 3's ranking: (scores, order) of the shortlist once its top images are verified.

    ``scores``, ``order``: stage 2's (:func:`rank_shortlist`); ``inlier_scores`` (n,): the score
    of every verified image (``VerificationResult.score``: the count or the inliers' summed idf
    weights), -1 where an image was not verified. With a :class:`fusion.Fusion` the inlier scores
    join as a third stage (0 where not verified); otherwise the verified images (a positive score)
    come first by inlier score, ties and the rest in the stage-2 order, and the scores stay
    stage 2's."""
    if isinstance(ranking, Fusion):
        scores = ranking(global_scores, asmk_scores, np.maximum(inlier_scores, 0))
        return scores, np.argsort(-scores, kind="stable")    # ties: global order
    rank = np.empty(order.size, np.int64)
    rank[order] = np.arange(order.size)
    verified = inlier_scores > 0
    return scores, np.lexsort((rank, -np.where(verified, inlier_scores, 0), ~verified))


def rank_expanded(ranking, query: np.ndarray, shortlist_vectors: np.ndarray, asmk_scores: np.ndarray,
                  inliers: np.ndarray, inlier_scores: np.ndarray, order: np.ndarray, neighbors: int,
                  min_inliers: int):
    """Verified query expansion (see the module docstring): ``(global_scores, scores, order)`` of
    the shortlist ranked again with the expanded global query, or None when none of the top
    ``neighbors`` of ``order`` has ``min_inliers`` inliers.

    ``query`` (Dg,): the L2-normalised global query before any expansion; ``shortlist_vectors``
    (n, Dg): the shortlist's searched vectors; ``inliers`` (n,): inlier counts (-1: not
    verified); ``inlier_scores``, ``order``: as :func:`rank_verified` takes and returns them."""
    top = order[:neighbors]
    chosen = top[inliers[top] >= min_inliers]
    if chosen.size == 0:
        return None
    expanded = expand_with(query, shortlist_vectors[chosen])
    global_scores = (shortlist_vectors @ expanded).astype(np.float64)
    scores, order = rank_shortlist(ranking, global_scores, asmk_scores)
    scores, order = rank_verified(ranking, global_scores, asmk_scores, scores, order, inlier_scores)
    return global_scores, scores, order


class TwoStageIndex:
    """A :class:`GlobalIndex` and an ASMK* index over the same images (see module docstring)."""

    def __init__(self, global_index: GlobalIndex, asmk_index,
                 local_store: LocalFeatureStore | None = None):
        asmk_ids = np.asarray(asmk_index.image_ids, np.int64)
        if asmk_ids.size and not global_index.contains(asmk_ids).all():
            missing = asmk_ids[~global_index.contains(asmk_ids)]
            raise ValueError(f"the ASMK* index holds {missing.size} image id(s) that the global "
                             f"index lacks, e.g. {missing[:5].tolist()}")
        if local_store is not None:
            if local_store.dim != asmk_index.codebook.dim:
                raise ValueError(f"the local feature store holds {local_store.dim}-d signatures, "
                                 f"the codebook is {asmk_index.codebook.dim}-d")
            if not _id_set_equal(local_store.image_ids, asmk_ids):
                raise ValueError("the local feature store and the ASMK* index hold different "
                                 f"images ({len(local_store)} vs {asmk_ids.size})")
        self.global_index = global_index
        self.asmk_index = asmk_index
        self.local_store = local_store

    @classmethod
    def create(cls, codebook, global_dim: int, *, binary: bool = True, alpha: float = 3.0,
               similarity_threshold: float = 0.0, multiple_assignment: int = 1,
               query_multiple_assignment: int = 5, use_idf: bool = False,
               method: str = "exact", nlist: int | None = None, nprobe: int = 16,
               normalize: bool = True, local_features: bool = False,
               **global_options) -> "TwoStageIndex":
        """Empty index: an ``AsmkIndex(codebook, ...)`` and a ``GlobalIndex(global_dim, ...)``
        (``global_options``: further :class:`GlobalIndex` keywords, e.g. ``hnsw_m``,
        ``query_expansion``, ``dba_neighbors``). ``local_features``: keep every image's local
        features (word, signature, x, y, scale) for stage 3; each add then needs
        ``local_geometry``."""
        asmk_index = _asmk_class()(
            codebook, binary=binary, alpha=alpha, similarity_threshold=similarity_threshold,
            multiple_assignment=multiple_assignment,
            query_multiple_assignment=query_multiple_assignment, use_idf=use_idf)
        global_index = GlobalIndex(global_dim, method=method, nlist=nlist, nprobe=nprobe,
                                   normalize=normalize, **global_options)
        store = LocalFeatureStore(codebook.dim) if local_features else None
        return cls(global_index, asmk_index, store)

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

    @property
    def has_local_features(self) -> bool:
        """Whether images' local features are kept (stage 3 available)."""
        return self.local_store is not None

    def memory_bytes(self) -> int:
        """Bytes in RAM (a memory-mapped local feature store counts its look-up table only)."""
        store = 0 if self.local_store is None else self.local_store.memory_bytes()
        return int(self.global_index.memory_bytes() + self.asmk_index.memory_bytes() + store)

    # ------------------------------------------------------------------ mutation
    def add(self, global_descriptors, image_ids, local_descriptors, local_image_ids,
            local_geometry=None) -> None:
        """Add images: ``global_descriptors`` (n, Dg) for ``image_ids`` (n,) and their local
        descriptors (N, D) with the image id of each (N,). Every local id must be one of
        ``image_ids``; an image may have no local descriptors. ``local_geometry`` (N, 3) float32
        x, y (original image pixels), scale of each local descriptor: required by an index with
        local features (``create(..., local_features=True)``), refused by one without.
        Descriptors are quantized once, for the ASMK* index and the store. Atomic: on any error
        every part is left as it was."""
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
        if self.local_store is None and local_geometry is not None:
            raise ValueError("local_geometry: this index keeps no local features (create it with "
                             "local_features=True to use spatial verification)")
        if self.local_store is not None:
            if local_geometry is None and local_ids.size:
                raise ValueError("local_geometry: this index keeps local features for spatial "
                                 "verification; pass (N, 3) x, y, scale of every local descriptor")
            local_geometry = check_geometry(
                np.empty((0, 3), np.float32) if local_geometry is None else local_geometry,
                local_ids.size)
        self.global_index.add(global_descriptors, ids)     # validates ids; unchanged on error
        if local_ids.size == 0:
            return
        added_asmk = False
        try:
            if self.local_store is None:
                self.asmk_index.add(local_descriptors, local_ids)
                return
            codebook = self.asmk_index.codebook
            words = codebook.quantize(local_descriptors, self.asmk_index.params.multiple_assignment)
            self.asmk_index.add(local_descriptors, local_ids, words=words)
            added_asmk = True
            self.local_store.add(local_ids, words[:, 0],
                                 binary_signatures(local_descriptors, words[:, 0],
                                                   codebook.centroids), local_geometry)
        except BaseException:
            if added_asmk:
                self.asmk_index.remove(np.unique(local_ids))
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
            if self.local_store is not None:
                self.local_store.remove(ids[in_asmk])
        self.global_index.remove(ids)

    # ------------------------------------------------------------------ search
    def search(self, global_query, local_query=None, k: int = 10, shortlist: int = 100,
               mode: str = "two_stage", global_weight: float = 0.0, *, fusion=None,
               verify_top: int = 0, query_geometry=None, verification=None,
               query_expansion: int | None = None, qe_alpha: float | None = None,
               verified_expansion: int = 0,
               verified_expansion_inliers: int = VERIFIED_EXPANSION_INLIERS,
               asmk_shortlist: int = 0) -> SearchResult:
        """Rank images for one query: ``global_query`` (Dg,), ``local_query`` (n, D) (may be None
        in "global" mode). ``shortlist`` (raised to ``k`` if smaller) images are re-scored in
        "two_stage" mode. Returns a :class:`SearchResult` of at most ``k`` images, best first.

        ``global_weight`` (two_stage mode, ``fusion=None``): the shortlist is ranked by
        ``asmk_score + global_weight * global_score``; 0 (the default) ranks by ASMK* alone, ties
        broken by the global score; ``scores`` then hold the fused values.

        ``fusion`` (two_stage): None, "asmk", "global", a rule name of :mod:`fusion` or a
        :class:`fusion.Fusion` (see the module docstring). ``verify_top`` (two_stage): spatially
        verify the top R of the ranked shortlist, with ``query_geometry`` (n, 2) or (n, 3) x, y
        [, scale] of the query's local descriptors (pixels) and ``verification`` a
        :class:`verification.VerificationConfig` (None: its defaults). ``query_expansion``,
        ``qe_alpha``: alpha-QE of the global query (None: the global index's options).
        ``verified_expansion``, ``verified_expansion_inliers`` (two_stage with ``verify_top``):
        verified query expansion (see the module docstring; 0: off). ``asmk_shortlist``
        (two_stage): the ASMK* top m join the global shortlist (see the module docstring)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        global_weight = float(global_weight)
        if not np.isfinite(global_weight) or global_weight < 0:
            raise ValueError(f"global_weight must be a finite number >= 0, got {global_weight!r}")
        k = _positive_int(k, "k")
        shortlist = max(_positive_int(shortlist, "shortlist"), k)
        verify_top = _non_negative_int(verify_top, "verify_top")
        ranking = _ranking_rule(fusion, global_weight)
        expansion = (_non_negative_int(verified_expansion, "verified_expansion"),
                     _positive_int(verified_expansion_inliers, "verified_expansion_inliers"))
        asmk_shortlist = _non_negative_int(asmk_shortlist, "asmk_shortlist")
        if mode != "two_stage" and (fusion is not None or verify_top or expansion[0] or asmk_shortlist):
            raise ValueError("fusion, verify_top, verified_expansion and asmk_shortlist are options "
                             f"of mode 'two_stage', not {mode!r}")
        if expansion[0] and not verify_top:
            raise ValueError("verified_expansion needs stage 3 (verify_top > 0): it expands the "
                             "query with the verified images")
        if expansion[0] and not self.global_index.params.normalize:
            raise ValueError("verified_expansion needs a global index with normalize=True (it "
                             "averages L2-normalised descriptors)")
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
        stage3 = None
        if verify_top:
            stage3 = self._stage3_query(local_query, query_geometry, verification)
        start = time.perf_counter()
        # the normalised query before alpha-QE, which verified expansion starts from
        original_query = self.global_index.expand_query(global_query, 0) if expansion[0] else None
        neighbors = (self.global_index.params.query_expansion if query_expansion is None
                     else query_expansion)
        if neighbors:
            global_query = self.global_index.expand_query(global_query, neighbors, qe_alpha)
        if mode == "global":
            return self._search_global(global_query, k, start)
        if mode == "asmk":
            return self._search_asmk(global_query, local_query, k, start)
        return self._search_two_stage(global_query, local_query, k, (shortlist, asmk_shortlist),
                                      ranking, start, verify_top, stage3,
                                      (original_query, *expansion))

    def _stage3_query(self, local_query, query_geometry, verification):
        """(query xy (n, 2), config) for stage 3 after checks, or a clear error."""
        from .verification import VerificationConfig   # OpenCV: imported on first use
        if self.local_store is None:
            raise ValueError("verify_top: this index keeps no local features (create it with "
                             "local_features=True and add images with local_geometry)")
        if query_geometry is None:
            raise ValueError("verify_top needs query_geometry: (n, 2) or (n, 3) x, y [, scale] "
                             "of the query's local descriptors")
        geometry = np.asarray(query_geometry)
        if geometry.ndim != 2 or geometry.shape[1] not in (2, 3):
            raise ValueError(f"query_geometry: expected (n, 2) or (n, 3), got {geometry.shape}")
        if geometry.shape[1] == 2:      # no scales: a zero column to pass the same checks
            geometry = np.column_stack([geometry, np.zeros(geometry.shape[0])])
        xy = check_geometry(geometry, local_query.shape[0], name="query_geometry")[:, :2]
        config = VerificationConfig() if verification is None else verification
        if not isinstance(config, VerificationConfig):
            raise TypeError(f"verification must be a VerificationConfig, got {type(config)}")
        return xy, config

    def _asmk_scores(self, local_query: np.ndarray, ids: np.ndarray,
                     words: np.ndarray | None) -> np.ndarray:
        """ASMK* scores of ``ids`` (0 for images without local descriptors or an empty query);
        ``words``: the query's words (``AsmkIndex.query_words``)."""
        scores = np.zeros(ids.shape[0], np.float64)
        if local_query.shape[0] == 0 or ids.size == 0:
            return scores
        in_asmk = np.asarray(self.asmk_index.contains(ids), bool)
        if in_asmk.any():
            scores[in_asmk] = self.asmk_index.score(local_query, ids[in_asmk], words=words)
        return scores

    def _search_two_stage(self, global_query, local_query, k, shortlists, ranking, start,
                          verify_top, stage3, expansion) -> SearchResult:
        """``shortlists``: (global shortlist, ASMK* shortlist); ``expansion``: (the normalised
        global query before alpha-QE, verified expansion's neighbours (0: off), its inlier
        threshold)."""
        shortlist, asmk_shortlist = shortlists
        candidates, global_scores = self.global_index.search(global_query, shortlist,
                                                             query_expansion=0)
        # the query is quantized once, for the ASMK* shortlist, stage 2 and stage 3
        words = self.asmk_index.query_words(local_query) if local_query.shape[0] else None
        added, added_asmk_scores = np.empty(0, np.int64), np.empty(0, np.float64)
        if asmk_shortlist and words is not None and len(self.asmk_index):
            local_ids, local_scores = self.asmk_index.search(local_query, asmk_shortlist, words=words)
            not_shortlisted = ~np.isin(local_ids, candidates)
            added = np.asarray(local_ids, np.int64)[not_shortlisted]
            added_asmk_scores = np.asarray(local_scores, np.float64)[not_shortlisted]
            global_scores = np.concatenate([
                global_scores, self.global_index.score(global_query, added, query_expansion=0)])
        middle = time.perf_counter()
        # the ASMK* search already scored the images it added
        asmk_scores = np.concatenate([self._asmk_scores(local_query, candidates, words), added_asmk_scores])
        candidates = np.concatenate([candidates, added])
        global_scores = global_scores.astype(np.float64)
        final_scores, order = rank_shortlist(ranking, global_scores, asmk_scores)
        end = time.perf_counter()
        inliers = verifications = None
        if verify_top:
            final_scores, order, inliers, verifications, inlier_scores = self._verify_and_rerank(
                stage3, candidates, global_scores, asmk_scores, final_scores, order, ranking,
                local_query, words, verify_top)
            original_query, neighbors, min_inliers = expansion
            if neighbors:
                expanded = rank_expanded(
                    ranking, original_query, self.global_index.get_vectors(candidates, searched=True),
                    asmk_scores, inliers, inlier_scores, order, neighbors, min_inliers)
                if expanded is not None:
                    global_scores, final_scores, order = expanded
        order = order[:k]
        done = time.perf_counter()
        return SearchResult(ids=candidates[order], scores=final_scores[order],
                            global_scores=global_scores[order], asmk_scores=asmk_scores[order],
                            mode="two_stage", stage1_seconds=middle - start,
                            stage2_seconds=end - middle, shortlist_size=int(candidates.size),
                            inliers=None if inliers is None else inliers[order],
                            verifications=None if verifications is None
                            else [verifications[i] for i in order],
                            stage3_seconds=done - end if verify_top else 0.0)

    def _verify_and_rerank(self, stage3, candidates, global_scores, asmk_scores, final_scores,
                           order, ranking, local_query, words, verify_top):
        """Stage 3 on the top ``verify_top`` of ``order``; returns (scores, order, inliers (n,)
        -1 where not verified, verifications (n,) list, inlier scores (n,) -1 where not verified)
        over the shortlist positions; the ranking uses the inlier scores. ``words``: the query's
        stage-2 words (nearest first), None for an empty query."""
        top = order[:verify_top]
        results = self._verify_ids(local_query, words, stage3, candidates[top])
        inliers = np.full(candidates.size, -1, np.int64)
        inliers[top] = 0
        inlier_scores = inliers.astype(np.float64)
        verifications: list = [None] * candidates.size
        for position, result in zip(top, results):
            if result is not None:
                inliers[position] = result.inliers
                inlier_scores[position] = result.score
                verifications[position] = result
        final_scores, order = rank_verified(ranking, global_scores, asmk_scores, final_scores, order,
                                            inlier_scores)
        return final_scores, order, inliers, verifications, inlier_scores

    def _verify_ids(self, local_query, words, stage3, image_ids) -> list:
        """Stage 3 of ``image_ids`` (one :class:`verification.VerificationResult` each, None for an
        image without local features); ``words``: the query's words, nearest first, or None."""
        from .verification import QueryFeatures, verify_images
        query_xy, config = stage3
        codebook = self.asmk_index.codebook
        assignment = min(config.query_assignment, codebook.size)
        if words is None or words.shape[1] < assignment:
            words = codebook.quantize(local_query, assignment)
        words = np.ascontiguousarray(words[:, :assignment])
        query = QueryFeatures.from_descriptors(local_query, words, codebook.centroids, query_xy)
        has_features = self.local_store.contains(image_ids)
        idf = None if config.inlier_weighting == "count" else self.asmk_index.inverse_document_frequency()
        results = iter(verify_images(query, [self.local_store.get(i) for i in image_ids[has_features]],
                                     config, idf))
        return [next(results) if known else None for known in has_features]

    def verify(self, local_query, query_geometry, image_ids, verification=None) -> list:
        """Stage 3 alone: spatially verify the query (local descriptors (n, D), their x, y [, scale]
        (n, 2 | 3)) against the given images' stored features; one
        :class:`verification.VerificationResult` per image (None: no local features stored)."""
        local_query = check_descriptors(local_query, dim=self.local_dim, name="local_query", allow_empty=True)
        image_ids = check_ids(image_ids, name="image_ids")
        stage3 = self._stage3_query(local_query, query_geometry, verification)
        return self._verify_ids(local_query, None, stage3, image_ids)

    def _search_asmk(self, global_query, local_query, k, start) -> SearchResult:
        if local_query.shape[0] == 0 or len(self.asmk_index) == 0:
            ids, asmk_scores = np.empty(0, np.int64), np.empty(0, np.float64)
        else:
            ids, asmk_scores = self.asmk_index.search(local_query, k)
            ids = np.asarray(ids, np.int64)
            asmk_scores = np.asarray(asmk_scores, np.float64)
        middle = time.perf_counter()
        global_scores = self.global_index.score(global_query, ids, query_expansion=0)
        end = time.perf_counter()
        return SearchResult(ids=ids, scores=asmk_scores, global_scores=global_scores,
                            asmk_scores=asmk_scores, mode="asmk", stage1_seconds=middle - start,
                            stage2_seconds=end - middle, shortlist_size=int(ids.size))

    def _search_global(self, global_query, k, start) -> SearchResult:
        ids, global_scores = self.global_index.search(global_query, k, query_expansion=0)
        end = time.perf_counter()
        return SearchResult(ids=ids, scores=global_scores, global_scores=global_scores,
                            asmk_scores=np.full(ids.shape[0], np.nan), mode="global",
                            stage1_seconds=end - start, stage2_seconds=0.0,
                            shortlist_size=int(ids.size))

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> None:
        """Publish ``directory`` (a new version under the writer lock, or plainly as a component
        of a directory being published) with sub-directories "global" and "asmk" (and "local",
        the local feature store, when kept) and a top manifest checksumming them and listing the
        image ids of each."""
        with publish_directory(directory) as temporary:
            self.global_index.save(temporary / GLOBAL_COMPONENT)
            self.asmk_index.save(temporary / ASMK_COMPONENT)
            components = {GLOBAL_COMPONENT: temporary / GLOBAL_COMPONENT,
                          ASMK_COMPONENT: temporary / ASMK_COMPONENT}
            image_ids = np.sort(self.global_index.image_ids)
            asmk_ids = np.sort(np.asarray(self.asmk_index.image_ids, np.int64))
            counts = {"images": int(image_ids.size), "asmk_images": int(asmk_ids.size)}
            if self.local_store is not None:
                self.local_store.save(temporary / LOCAL_COMPONENT)
                components[LOCAL_COMPONENT] = temporary / LOCAL_COMPONENT
                counts["local_images"] = len(self.local_store)
            write_arrays(temporary, kind=TWO_STAGE_KIND,
                         params={"global_dim": self.global_dim, "local_dim": self.local_dim},
                         counts=counts,
                         arrays={"image_ids": image_ids, "asmk_image_ids": asmk_ids},
                         components=components)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "TwoStageIndex":
        """Read a directory written by :meth:`save`; checksums, components and id sets are checked
        (:class:`IndexFormatError` on any mismatch); the current version is read whole, even
        while a writer replaces it. The local feature store, when present, is memory-mapped."""
        return load_current(directory, cls._load_version)

    @classmethod
    def _load_version(cls, directory: Path) -> "TwoStageIndex":
        manifest, arrays = read_arrays(directory, kind=TWO_STAGE_KIND)
        components = set(manifest.get("components", {}))
        require(components in ({GLOBAL_COMPONENT, ASMK_COMPONENT},
                               {GLOBAL_COMPONENT, ASMK_COMPONENT, LOCAL_COMPONENT}),
                directory, "corrupt two-stage index: components 'global' and 'asmk' (and "
                "optionally 'local') expected")
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
        counts = {"images": len(global_index), "asmk_images": int(asmk_ids.size)}
        local_store = None
        if LOCAL_COMPONENT in components:
            local_store = LocalFeatureStore.load(directory / LOCAL_COMPONENT, mmap=True)
            counts["local_images"] = len(local_store)
        check_counts(directory, manifest, counts)
        try:
            return cls(global_index, asmk_index, local_store)
        except ValueError as error:
            raise IndexFormatError(f"{directory}: {error}") from error
