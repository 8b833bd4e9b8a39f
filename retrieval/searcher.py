"""The two-stage search engine: image(s) in, ranked results out.

>>> from retrieval import search, Searcher
>>> results = search("my_index", "query.jpg", k=10)            # one query -> SearchResults
>>> for hit in results: print(hit.rank, hit.name, hit.score, hit.global_score, hit.asmk_score)
>>> searcher = Searcher("my_index")                             # models loaded once, reused
>>> many = searcher.search(["a.jpg", pil_image, array], bbox=[None, (10, 10, 200, 150), None])

``mode="two_stage"``: stage 1, the GLAM global descriptor of the query (alpha-QE optional) gives a
shortlist from the global index; stage 2, the query's MDA local features score the shortlist with
ASMK*; stage 3, the top ``verify_top`` are spatially verified against the local features stored
with the index (visual word + Hamming distance correspondences, an affine RANSAC fit); a fusion
rule that does not depend on the scales of the scores ranks the shortlist (``search.fusion``).
``mode="global"`` ranks by the global descriptor only, ``mode="asmk"`` by ASMK* over the whole
collection.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from imagedata.images import ImageLoadError, crop_to_box, load_image, resize_max_side
from mda.extract import LocalFeatures

from .html import HtmlResult, write_results_page
from .extraction import local_geometry
from .index_store import RetrievalIndex, index_version

MODES = ("two_stage", "asmk", "global")


@dataclass
class SearchHit:
    """One result: its rank (1 = best), image name and id, final score and each stage's score.

    ``inliers``: spatial verification's inlier count (-1: not verified, 0: rejected).
    ``matches``: (m, 4) float32 (query x, y, result x, y) of the verified inlier correspondences
    (query coordinates in the query as searched, i.e. after the bbox crop and the max_size
    downscale; result ones in the indexed image as extracted); empty when not verified.
    """
    rank: int
    name: str
    image_id: int
    score: float
    global_score: float
    asmk_score: float
    inliers: int = -1
    path: str | None = None
    matches: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))

    def to_dict(self) -> dict:
        values = asdict(self)
        values["matches"] = np.round(self.matches, 1).tolist()
        return values


@dataclass
class QueryFeatures:
    """A prepared query: the image as searched (cropped, downscaled), its features, timings."""
    label: str
    image: np.ndarray
    local: LocalFeatures
    global_descriptor: np.ndarray
    extraction_seconds: float


@dataclass
class SearchResults:
    """Ranked hits of one query, the mode and the stage timings (seconds)."""
    query: str
    hits: list[SearchHit]
    mode: str
    k: int
    shortlist: int
    timings: dict[str, float] = field(default_factory=dict)
    query_image: np.ndarray | None = field(default=None, repr=False)

    def __iter__(self):
        return iter(self.hits)

    def __len__(self) -> int:
        return len(self.hits)

    def __getitem__(self, item):
        return self.hits[item]

    @property
    def names(self) -> list[str]:
        return [hit.name for hit in self.hits]

    def to_dict(self) -> dict:
        return {"query": self.query, "mode": self.mode, "k": self.k, "shortlist": self.shortlist,
                "timings": dict(self.timings), "results": [hit.to_dict() for hit in self.hits]}


def _is_single_query(queries: Any) -> bool:
    return not isinstance(queries, (list, tuple))


def _query_label(query: Any, position: int) -> str:
    if isinstance(query, (str, os.PathLike)):
        return str(query)
    return f"query {position + 1} ({type(query).__name__})"


def prepare_query_image(query: Any, *, max_size: int,
                        bbox: Sequence[float] | None = None) -> np.ndarray:
    """A query (path, PIL image or (H, W, 3) array) as searched: RGB uint8, cropped to ``bbox``
    (x0, y0, x1, y1 in the original image's pixels), longer side at most ``max_size``."""
    if isinstance(query, (str, os.PathLike)):
        image = load_image(query, max_size=None if bbox is not None else max_size)
    elif isinstance(query, Image.Image):
        image = np.asarray(query.convert("RGB"))
    elif isinstance(query, np.ndarray):
        image = query
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ValueError(f"query array must be (H, W, 3) RGB, got shape {image.shape}")
        image = image[:, :, :3]
        if image.dtype != np.uint8:
            if np.issubdtype(image.dtype, np.floating) and image.max(initial=0) <= 1.0:
                image = image * 255.0
            image = np.clip(image, 0, 255).astype(np.uint8)
    else:
        raise TypeError(f"unsupported query type {type(query).__name__}: give a path, a PIL image "
                        "or an (H, W, 3) array")
    image = crop_to_box(np.ascontiguousarray(image), bbox)
    return np.ascontiguousarray(resize_max_side(image, max_size))


class Searcher:
    """Loads an index directory (models, codebook, two-stage index) once; answers searches.

    ``index``: an index directory (``pipelines/index.py``) or a loaded :class:`RetrievalIndex`.
    ``device``: "cpu", "cuda" or None (the index's config: "auto" = cuda when present).
    """

    def __init__(self, index: str | os.PathLike | RetrievalIndex, *, device: str | None = None):
        self.index_directory = None if isinstance(index, RetrievalIndex) else Path(index)
        self.index = index if isinstance(index, RetrievalIndex) else RetrievalIndex.load(
            index, device=device)
        self.models = self.index.models
        self.config = self.models.config
        search = self.config.search  # the config's DBA of the indexed global descriptors
        self.index.two_stage.global_index.use_expansion(dba_neighbors=search.dba_neighbors,
                                                        dba_alpha=search.dba_alpha)
        self._lock = threading.Lock()  # torch modules and faiss indexes are shared per searcher

    def __len__(self) -> int:
        return len(self.index)

    # ------------------------------------------------------------------ queries
    def prepare(self, query: Any, *, bbox: Sequence[float] | None = None,
                label: str | None = None) -> QueryFeatures:
        """Load/crop/downscale a query and extract its local and global features."""
        image = prepare_query_image(query, max_size=self.config.extraction.max_size, bbox=bbox)
        start = time.perf_counter()
        with self._lock:
            features = self.models.extract_image(image)
        return QueryFeatures(label=label or _query_label(query, 0), image=image, local=features.local,
                             global_descriptor=features.global_descriptor,
                             extraction_seconds=time.perf_counter() - start)

    def search_features(self, query: QueryFeatures, *, k: int | None = None,
                        shortlist: int | None = None, mode: str | None = None,
                        with_matches: bool = False, fusion: str | None = None,
                        verify_top: int | None = None, query_expansion: int | None = None,
                        verified_expansion: int | None = None) -> SearchResults:
        """Rank the collection for a prepared query (see :meth:`search`)."""
        settings = self.config.search
        k = int(k if k is not None else settings.k)
        shortlist = int(shortlist if shortlist is not None else settings.shortlist)
        mode = mode or settings.mode
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if k < 1 or shortlist < 1:
            raise ValueError(f"k and shortlist must be >= 1, got k={k}, shortlist={shortlist}")
        verify_top = int(settings.verify_top if verify_top is None else verify_top)
        options = {}
        if mode == "two_stage":
            if with_matches:
                verify_top = max(verify_top, k)  # every hit shown gets its inliers drawn
            expansion = int(settings.verified_expansion if verified_expansion is None else verified_expansion)
            options = {"fusion": settings.ranking(fusion), "verify_top": verify_top,
                       "query_geometry": local_geometry(query.local), "verification": settings.verification,
                       "verified_expansion": expansion if verify_top else 0,
                       "verified_expansion_inliers": settings.verified_expansion_inliers,
                       "asmk_shortlist": settings.asmk_shortlist}
        start = time.perf_counter()
        with self._lock:
            raw = self.index.two_stage.search(
                query.global_descriptor, query.local.descriptors, k=k, shortlist=shortlist, mode=mode,
                query_expansion=settings.query_expansion if query_expansion is None else query_expansion,
                qe_alpha=settings.qe_alpha, **options)
            verifications = raw.verifications
            if with_matches and verifications is None and len(raw.ids):   # stage 3 for the hits only
                verifications = self.index.two_stage.verify(query.local.descriptors, local_geometry(query.local),
                                                            raw.ids, settings.verification)
        search_seconds = time.perf_counter() - start
        hits = []
        for position, image_id in enumerate(np.asarray(raw.ids).reshape(-1).tolist()):
            name = self.index.name_of(image_id)
            path = self.index.image_path(name)
            verification = None if verifications is None else verifications[position]
            inliers = -1 if verification is None else int(verification.inliers)
            hits.append(SearchHit(rank=position + 1, name=name, image_id=int(image_id),
                                  score=float(raw.scores[position]), global_score=float(raw.global_scores[position]),
                                  asmk_score=float(raw.asmk_scores[position]), inliers=inliers,
                                  path=None if path is None else str(path),
                                  matches=_inlier_lines(verification)))
        timings = {"extraction": query.extraction_seconds, "stage1": float(raw.stage1_seconds),
                   "stage2": float(raw.stage2_seconds), "stage3": float(raw.stage3_seconds),
                   "search": search_seconds}
        return SearchResults(query=query.label, hits=hits, mode=mode, k=k, shortlist=shortlist,
                             timings=timings, query_image=query.image)

    def search(self, queries: Any, *, k: int | None = None, shortlist: int | None = None,
               mode: str | None = None, bbox: Any = None, with_matches: bool = False,
               fusion: str | None = None, verify_top: int | None = None,
               query_expansion: int | None = None,
               verified_expansion: int | None = None) -> SearchResults | list[SearchResults]:
        """Search one query or a list of queries.

        queries: a path, a PIL image or an (H, W, 3) array, or a list of them.
        k: results per query (default config.search.k); shortlist: stage-1 size (default
        config.search.shortlist); mode: "two_stage" | "asmk" | "global"; fusion, verify_top,
        query_expansion, verified_expansion: override the config's (``search`` section; verified
        expansion is off when nothing is verified).
        bbox: (x0, y0, x1, y1) in the query's pixels (one query), or a list with one box or None
        per query.
        with_matches: spatially verify every hit (stage 3) so that ``hit.matches`` holds its inlier
        correspondences (for display).
        Returns :class:`SearchResults` for one query, a list of them for a list.
        """
        single = _is_single_query(queries)
        query_list = [queries] if single else list(queries)
        if single or bbox is None:
            boxes = [bbox] * len(query_list) if single else [None] * len(query_list)
        else:
            boxes = list(bbox)
            if len(boxes) != len(query_list):
                raise ValueError(f"{len(boxes)} boxes for {len(query_list)} queries")
        results = []
        for position, (query, box) in enumerate(zip(query_list, boxes)):
            prepared = self.prepare(query, bbox=box, label=_query_label(query, position))
            results.append(self.search_features(prepared, k=k, shortlist=shortlist, mode=mode,
                                                with_matches=with_matches, fusion=fusion,
                                                verify_top=verify_top, query_expansion=query_expansion,
                                                verified_expansion=verified_expansion))
        return results[0] if single else results

    # ------------------------------------------------------------------ display
    def indexed_image(self, name: str) -> np.ndarray | None:
        """An indexed image as it was extracted (None when its file is no longer there)."""
        path = self.index.image_path(name)
        if path is None:
            return None
        try:
            return load_image(path, max_size=self.config.extraction.max_size)
        except ImageLoadError:
            return None

    def write_html(self, path: str | os.PathLike, results: SearchResults | Sequence[SearchResults],
                   *, title: str = "Search results") -> Path:
        """A self-contained HTML page of the results (run the search ``with_matches=True`` to
        draw the matched features)."""
        result_list = [results] if isinstance(results, SearchResults) else list(results)
        pages = []
        for result in result_list:
            if result.query_image is None:
                raise ValueError(f"{result.query}: no query image kept with these results")
            rows = []
            for hit in result.hits:
                image = self.indexed_image(hit.name)
                if image is None:
                    image = np.full((64, 64, 3), 200, np.uint8)
                rows.append(HtmlResult(rank=hit.rank, name=hit.name, image=image, score=hit.score,
                                       global_score=hit.global_score, asmk_score=hit.asmk_score,
                                       inliers=hit.inliers, matches=hit.matches))
            pages.append((result.query, result.query_image, rows))
        note = (f"{len(self.index)} images indexed; mode {result_list[0].mode}, shortlist "
                f"{result_list[0].shortlist}. Lines join the local features that spatial verification "
                "kept as inliers of one affine transform (same visual word, close binary signatures, "
                "consistent geometry).")
        return write_results_page(path, pages, title=title, note=note)


def _inlier_lines(verification) -> np.ndarray:
    """(m, 4) float32 (query x, y, result x, y) of a verification's inliers (empty when none)."""
    if verification is None or not verification.inliers:
        return np.zeros((0, 4), np.float32)
    return np.column_stack([verification.query_xy, verification.db_xy]).astype(np.float32)


_SEARCHERS: dict[tuple[str, int, str | None], Searcher] = {}
_SEARCHERS_LOCK = threading.Lock()


def get_searcher(index: str | os.PathLike | RetrievalIndex | Searcher, *,
                 device: str | None = None) -> Searcher:
    """A cached :class:`Searcher` per index directory (models are loaded once per process; an
    index directory rewritten since, e.g. by ``--append``, is loaded again)."""
    if isinstance(index, Searcher):
        return index
    if isinstance(index, RetrievalIndex):
        return Searcher(index)
    directory = Path(index).resolve()
    key = (str(directory), index_version(directory), device)
    with _SEARCHERS_LOCK:
        if key not in _SEARCHERS:
            for stale in [other for other in _SEARCHERS if other[0] == key[0]]:
                del _SEARCHERS[stale]
            _SEARCHERS[key] = Searcher(index, device=device)
        return _SEARCHERS[key]


def clear_searcher_cache() -> None:
    """Forget cached searchers (e.g. after an index directory was rebuilt)."""
    with _SEARCHERS_LOCK:
        _SEARCHERS.clear()


def search(index: str | os.PathLike | RetrievalIndex | Searcher, queries: Any, *,
           device: str | None = None, **options) -> SearchResults | list[SearchResults]:
    """Search ``queries`` in ``index`` (see :meth:`Searcher.search` for the options: k,
    shortlist, mode, bbox, with_matches, fusion, verify_top, query_expansion,
    verified_expansion)."""
    return get_searcher(index, device=device).search(queries, **options)


__all__ = ["Searcher", "SearchResults", "SearchHit", "QueryFeatures", "search", "get_searcher",
           "clear_searcher_cache", "prepare_query_image", "MODES"]
