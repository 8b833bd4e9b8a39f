"""Global-descriptor index: faiss inner-product search over (L2-normalised) image descriptors.

The index keeps its own float32 vectors and int64 image ids, so the exact score of any image
(:meth:`GlobalIndex.score`) is always available, removal is exact, and save/load is simple.
Search methods:

- ``"exact"`` (default): brute-force inner product. On CPU it runs faiss' ``knn`` kernel (the one
  ``IndexFlatIP`` uses) directly on the stored array, so the vectors are held once; when faiss sees
  a GPU, an ``IndexFlatIP`` on all GPUs (``faiss.index_cpu_to_all_gpus``) holds a copy there.
- ``"ivf"``: ``IndexIVFFlat`` (inner product) for large collections. It needs training: it is
  trained automatically (k-means on the stored vectors) by the first :meth:`add` that brings the
  index to ``train_size`` vectors (default ``39 * nlist``, or 10,000 when ``nlist`` is None, when
  ``nlist`` becomes ``min(4 * sqrt(n), n / 39)``), or explicitly with :meth:`train`. Until then
  searches are exact (same results as ``"exact"``). ``nprobe`` lists are visited per query.
- ``"hnsw"``: ``IndexHNSWFlat`` (inner product, ``hnsw_m`` links, ``ef_search``). HNSW cannot
  delete; after :meth:`remove` the graph is rebuilt from the stored vectors at the next search.

The approximate methods hold a second copy of the vectors inside faiss (see :meth:`memory_bytes`).

Query expansion and database-side augmentation (both off by default; they need ``normalize``):

- alpha-QE (Radenovic et al., TPAMI 2019), ``query_expansion=n``: the query is replaced by
  ``q + sum_i s_i ** qe_alpha * x_i`` over its top-``n`` results ``x_i`` with similarity
  ``s_i > 0`` (the others weigh 0), L2-normalised, and searched again
  (:meth:`GlobalIndex.expand_query`); ``qe_alpha=0`` is average query expansion.
  :func:`expand_with` expands a query with chosen vectors instead of its nearest neighbours (the
  two-stage search's verified query expansion: the images spatial verification confirmed).
- alpha-DBA, ``dba_neighbors=n``: every database vector is replaced, for searching and scoring,
  by ``sum_j s_j ** dba_alpha * x_j`` over its top-``n + 1`` neighbours with ``s_j > 0`` (itself
  first, weight 1), L2-normalised. The original vectors are kept (:attr:`GlobalIndex.vectors`, saved);
  the augmented ones (:attr:`GlobalIndex.search_vectors`) are recomputed from them, lazily, after
  every add or remove: an exact n x n neighbour search (faiss ``knn``), O(n^2 dim).

:meth:`GlobalIndex.use_expansion` changes either option on an existing index.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import faiss
import numpy as np

from .persistence import (IndexFormatError, check_counts, load_current, read_arrays, require,
                          save_directory)
from .validation import check_descriptors, check_ids

GLOBAL_INDEX_KIND = "global_index"
METHODS = ("exact", "ivf", "hnsw")
MIN_POINTS_PER_CENTROID = 39        # faiss' k-means warns below this many points per list
MAX_POINTS_PER_CENTROID = 256       # training sample cap per list (faiss' default)
AUTO_NLIST_TRAIN_SIZE = 10_000      # with nlist=None: train once this many vectors are present
GPU_MAX_K = 2048                    # faiss GPU brute force returns at most this many neighbours
_INITIAL_CAPACITY = 1024


@dataclass(frozen=True)
class GlobalIndexParams:
    """Everything that defines a :class:`GlobalIndex` (stored in its manifest)."""
    dim: int
    method: str = "exact"
    nlist: int | None = None
    nprobe: int = 16
    normalize: bool = True
    train_size: int | None = None
    hnsw_m: int = 32
    ef_search: int = 64
    ef_construction: int = 40
    seed: int = 0
    query_expansion: int = 0        # alpha-QE neighbours (0: off)
    qe_alpha: float = 3.0
    dba_neighbors: int = 0          # alpha-DBA neighbours (0: off)
    dba_alpha: float = 3.0

    def __post_init__(self):
        if int(self.dim) != self.dim or self.dim <= 0:
            raise ValueError(f"dim must be a positive integer, got {self.dim!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("nlist", "train_size"):
            value = getattr(self, name)
            if value is not None and (int(value) != value or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        for name in ("nprobe", "hnsw_m", "ef_search", "ef_construction"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("query_expansion", "dba_neighbors"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        for name in ("qe_alpha", "dba_alpha"):
            if not np.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got "
                                 f"{getattr(self, name)!r}")
        if (self.query_expansion or self.dba_neighbors) and not self.normalize:
            raise ValueError("query_expansion and dba_neighbors need normalize=True (their "
                             "weights are cosine similarities)")

    @property
    def auto_train_size(self) -> int:
        if self.train_size is not None:
            return self.train_size
        if self.nlist is not None:
            return MIN_POINTS_PER_CENTROID * self.nlist
        return AUTO_NLIST_TRAIN_SIZE


def l2_normalize(vectors: np.ndarray, name: str) -> np.ndarray:
    """Rows divided by their L2 norm; a zero row raises ``ValueError``."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if vectors.shape[0] and not np.all(norms > 0):
        raise ValueError(f"{name}: {int(np.sum(norms == 0))} zero vector(s) cannot be "
                         f"L2-normalised (first: row {int(np.flatnonzero(norms[:, 0] == 0)[0])})")
    return np.ascontiguousarray(vectors / np.maximum(norms, np.finfo(np.float32).tiny), np.float32)


def _weighted_sum_rows(stacked: np.ndarray, similarities: np.ndarray, alpha: float) -> np.ndarray:
    """``normalize(sum_j w_j * v_j)`` per row with ``w_j = s_j ** alpha`` for ``s_j > 0`` and 0
    otherwise: ``stacked`` (q, m, dim), ``similarities`` (q, m) -> (q, dim) float32."""
    similarities = similarities.astype(np.float64)
    positive = similarities > 0
    weights = np.where(positive, np.power(np.where(positive, similarities, 1.0), alpha), 0.0)
    summed = np.einsum("qm,qmd->qd", weights, stacked.astype(np.float64))
    norms = np.linalg.norm(summed, axis=1, keepdims=True)
    return np.ascontiguousarray(summed / np.maximum(norms, np.finfo(np.float64).tiny), np.float32)


def expand_with(query: np.ndarray, vectors: np.ndarray, alpha: float = 0.0) -> np.ndarray:
    """alpha-QE of one L2-normalised ``query`` (dim,) with chosen ``vectors`` (m, dim) (e.g. the
    searched vectors of verified results): ``normalize(q + sum_i s_i ** alpha * x_i)`` with
    ``s_i = q . x_i``, weight 0 where ``s_i <= 0``; ``alpha`` 0: average query expansion over the
    vectors the query is positively similar to. (dim,) float32."""
    query = np.asarray(query, np.float32).reshape(-1)
    vectors = np.asarray(vectors, np.float32).reshape(-1, query.size)
    if not np.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    stacked = np.concatenate([query[None], vectors])[None]
    similarities = np.concatenate([[1.0], vectors @ query])[None]
    return _weighted_sum_rows(stacked, similarities, alpha)[0]


def _weighted_sum(vectors: np.ndarray, rows: np.ndarray, similarities: np.ndarray,
                  alpha: float) -> np.ndarray:
    """:func:`_weighted_sum_rows` of ``vectors[rows]`` (rows (q, m), -1 = none found)."""
    found = rows >= 0
    return _weighted_sum_rows(vectors[np.where(found, rows, 0)],
                              np.where(found, similarities, 0.0), alpha)


def _check_distinct(ids: np.ndarray, operation: str) -> None:
    unique, counts = np.unique(ids, return_counts=True)
    if np.any(counts > 1):
        raise ValueError(f"image_ids: duplicate ids in one {operation}, e.g. "
                         f"{unique[counts > 1][:5].tolist()}")


def _gpu_available() -> bool:
    try:
        return faiss.get_num_gpus() > 0 and hasattr(faiss, "index_cpu_to_all_gpus")
    except Exception:  # a faiss build without GPU support
        return False


class GlobalIndex:
    """Inner-product search over global descriptors keyed by int64 image ids.

    ``add(descriptors (n, dim), image_ids (n,))``, ``remove(image_ids)``,
    ``search(query (dim,) | (q, dim), k) -> (ids, scores)`` best first, ``score(query, ids)``.
    Bad input raises ``ValueError`` (``KeyError`` for unknown ids) and leaves the index unchanged.
    """

    def __init__(self, dim: int, *, method: str = "exact", nlist: int | None = None,
                 nprobe: int = 16, normalize: bool = True, train_size: int | None = None,
                 hnsw_m: int = 32, ef_search: int = 64, ef_construction: int = 40,
                 seed: int = 0, query_expansion: int = 0, qe_alpha: float = 3.0,
                 dba_neighbors: int = 0, dba_alpha: float = 3.0, use_gpu: bool | None = None):
        self.params = GlobalIndexParams(
            dim=int(dim), method=method, nlist=nlist, nprobe=int(nprobe), normalize=bool(normalize),
            train_size=train_size, hnsw_m=int(hnsw_m), ef_search=int(ef_search),
            ef_construction=int(ef_construction), seed=int(seed),
            query_expansion=query_expansion, qe_alpha=float(qe_alpha),
            dba_neighbors=dba_neighbors, dba_alpha=float(dba_alpha))
        self._dba: np.ndarray | None = None          # DBA vectors, None: stale (recomputed lazily)
        self.use_gpu = _gpu_available() if use_gpu is None else bool(use_gpu and _gpu_available())
        self._buffer = np.empty((0, self.dim), np.float32)
        self._ids = np.empty(0, np.int64)
        self._size = 0
        self._sorted_ids = np.empty(0, np.int64)     # for id -> row look-ups
        self._sorted_rows = np.empty(0, np.int64)
        self._trained_nlist: int | None = None       # ivf: lists of the trained index
        self._faiss = None                           # None: not built (or stale: rebuilt lazily)

    # ------------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        return self.params.dim

    @property
    def method(self) -> str:
        return self.params.method

    @property
    def is_trained(self) -> bool:
        """False only for an ``"ivf"`` index not trained yet (its searches are exact meanwhile)."""
        return self.method != "ivf" or self._trained_nlist is not None

    @property
    def vectors(self) -> np.ndarray:
        """Stored (normalised) descriptors (n, dim) float32, rows aligned with :attr:`image_ids`."""
        return self._buffer[:self._size]

    @property
    def search_vectors(self) -> np.ndarray:
        """The vectors searched and scored (n, dim) float32: :attr:`vectors`, or their alpha-DBA
        augmentation when ``dba_neighbors`` > 0 (recomputed here after a change)."""
        if not self.params.dba_neighbors:
            return self.vectors
        if self._dba is None:
            self._dba = self._augment_database()
        return self._dba

    @property
    def image_ids(self) -> np.ndarray:
        """Image ids in insertion order (a copy), (n,) int64."""
        return self._ids[:self._size].copy()

    def __len__(self) -> int:
        return self._size

    def memory_bytes(self) -> int:
        """Bytes held: vector and id buffers (with spare capacity), look-up tables, and faiss'
        own copy if any (estimated for ivf/hnsw: vectors, ids / graph links; GPU memory for exact
        search on a GPU)."""
        total = (self._buffer.nbytes + self._ids.nbytes + self._sorted_ids.nbytes
                 + self._sorted_rows.nbytes + (0 if self._dba is None else self._dba.nbytes))
        if self.method == "ivf" and self._faiss is not None:
            total += self._size * (self.dim * 4 + 8) + self._trained_nlist * self.dim * 4
        elif self.method == "hnsw" and self._faiss is not None:
            total += self._size * (self.dim * 4 + self.params.hnsw_m * 2 * 4)
        elif self.method == "exact" and self._faiss is not None:  # GPU copy
            total += self._size * self.dim * 4
        return int(total)

    # ------------------------------------------------------------------ id look-ups
    def _rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Row of each id (-1 where absent)."""
        if self._size == 0:
            return np.full(ids.shape, -1, np.int64)
        position = np.searchsorted(self._sorted_ids, ids)
        position = np.minimum(position, self._size - 1)
        found = self._sorted_ids[position] == ids
        return np.where(found, self._sorted_rows[position], -1)

    def _reindex(self) -> None:
        order = np.argsort(self._ids[:self._size], kind="stable")
        self._sorted_ids = self._ids[:self._size][order]
        self._sorted_rows = order.astype(np.int64)

    def contains(self, image_ids) -> np.ndarray:
        """Boolean mask: which of ``image_ids`` are in the index."""
        return self._rows_of(check_ids(image_ids)) >= 0

    def _known_rows(self, image_ids, name: str) -> np.ndarray:
        ids = check_ids(image_ids, name=name)
        rows = self._rows_of(ids)
        if np.any(rows < 0):
            missing = ids[rows < 0]
            raise KeyError(f"{name}: {missing.size} unknown image id(s), e.g. "
                           f"{missing[:5].tolist()}")
        return rows

    # ------------------------------------------------------------------ input checks
    def _prepare(self, descriptors, name: str) -> np.ndarray:
        vectors = check_descriptors(descriptors, dim=self.dim, name=name, allow_empty=True)
        return l2_normalize(vectors, name) if self.params.normalize else vectors

    def _prepare_queries(self, query) -> tuple[np.ndarray, bool]:
        """``((q, dim) float32, single)`` where ``single`` says the query was one (dim,) vector."""
        array = np.asarray(query)
        single = array.ndim == 1
        queries = self._prepare(array[None] if single else array, "query")
        if queries.shape[0] == 0 and single:
            raise ValueError("query: empty")
        return queries, single

    # ------------------------------------------------------------------ mutation
    def add(self, descriptors, image_ids) -> None:
        """Add ``descriptors`` (n, dim) for new, distinct ``image_ids`` (n,)."""
        vectors = self._prepare(descriptors, "descriptors")
        ids = check_ids(image_ids, length=vectors.shape[0])
        _check_distinct(ids, "add")
        present = self._rows_of(ids) >= 0
        if np.any(present):
            raise ValueError(f"image_ids: {int(present.sum())} id(s) already in the index, e.g. "
                             f"{ids[present][:5].tolist()}")
        if ids.size == 0:
            return
        old_size = self._size
        self._ensure_capacity(old_size + ids.size)
        self._buffer[old_size:old_size + ids.size] = vectors
        self._ids[old_size:old_size + ids.size] = ids
        self._size += ids.size
        self._dba = None
        try:
            self._reindex()
            if not self.is_trained:
                if self._size >= self.params.auto_train_size:
                    self.train()
            elif self.params.dba_neighbors:
                self._faiss = None                  # every augmented vector may change
            elif self._faiss is not None:
                self._faiss_add(vectors, ids)
        except BaseException:  # undo: faiss' state is unknown, rebuild it at the next search
            self._size = old_size
            self._reindex()
            self._faiss = None
            self._dba = None
            raise

    def _ensure_capacity(self, size: int) -> None:
        if size <= self._buffer.shape[0]:
            return
        capacity = max(size, 2 * self._buffer.shape[0], _INITIAL_CAPACITY)
        buffer = np.empty((capacity, self.dim), np.float32)
        buffer[:self._size] = self._buffer[:self._size]
        ids = np.empty(capacity, np.int64)
        ids[:self._size] = self._ids[:self._size]
        self._buffer, self._ids = buffer, ids

    def remove(self, image_ids) -> None:
        """Remove ``image_ids`` (all present, no duplicates; else the index is left unchanged)."""
        ids = check_ids(image_ids)
        _check_distinct(ids, "remove")
        rows = self._known_rows(ids, "image_ids")
        if rows.size == 0:
            return
        keep = np.ones(self._size, bool)
        keep[rows] = False
        kept = int(keep.sum())
        self._buffer[:kept] = self._buffer[:self._size][keep]
        self._ids[:kept] = self._ids[:self._size][keep]
        self._size = kept
        self._reindex()
        self._dba = None
        if self.method == "ivf" and self._faiss is not None and not self.params.dba_neighbors:
            self._faiss.remove_ids(ids)             # ivf labels are image ids
        else:
            self._faiss = None                      # positions shifted: rebuilt at the next search

    # ------------------------------------------------------------------ faiss structures
    def train(self, sample=None) -> None:
        """Train the ``"ivf"`` coarse quantizer on ``sample`` (default: the stored vectors) and
        (re)build the inverted lists from every stored vector. No-op for the other methods."""
        if self.method != "ivf":
            return
        training = self.search_vectors if sample is None else self._prepare(sample, "sample")
        n = training.shape[0]
        nlist = self.params.nlist
        if nlist is None:
            nlist = max(1, min(int(4 * math.sqrt(n)), n // MIN_POINTS_PER_CENTROID))
        if n < nlist:
            raise ValueError(f"ivf training needs at least nlist={nlist} vectors (and "
                             f"{MIN_POINTS_PER_CENTROID * nlist} for good lists), got {n}; "
                             "add more images or use method='exact'")
        cap = MAX_POINTS_PER_CENTROID * nlist
        if n > cap:
            rng = np.random.default_rng(self.params.seed)
            training = training[np.sort(rng.choice(n, cap, replace=False))]
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = self.params.seed
        index.cp.min_points_per_centroid = 1           # we checked the sample size ourselves
        index.cp.max_points_per_centroid = MAX_POINTS_PER_CENTROID
        index.train(np.ascontiguousarray(training))
        template = faiss.serialize_index(index)            # trained, empty
        filled = faiss.deserialize_index(template)
        filled.nprobe = self.params.nprobe
        if self._size:
            filled.add_with_ids(self.search_vectors, self._ids[:self._size])
        self._trained_nlist, self._ivf_template, self._faiss = nlist, template, filled

    def _new_faiss(self):
        """An empty faiss index for this method (``None`` for exact search on CPU)."""
        params = self.params
        if params.method == "exact":
            if not self.use_gpu:
                return None
            try:
                return faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(self.dim))
            except Exception:  # GPU present but unusable: fall back to the CPU kernel
                self.use_gpu = False
                return None
        if params.method == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = params.ef_construction
            index.hnsw.efSearch = params.ef_search
            return index
        index = faiss.deserialize_index(self._ivf_template)
        index.nprobe = params.nprobe
        return index

    def _faiss_add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        if self.method == "ivf":
            self._faiss.add_with_ids(vectors, ids)
        else:                                    # labels are row positions
            self._faiss.add(vectors)

    def _rebuild_faiss(self) -> None:
        self._faiss = self._new_faiss()
        if self._faiss is not None and self._size:
            self._faiss_add(self.search_vectors, self._ids[:self._size])

    def _current_faiss(self):
        """The faiss index to search, or ``None`` for exact CPU search."""
        if not self.is_trained:
            return None
        if self._faiss is None:
            self._rebuild_faiss()
        return self._faiss

    # ------------------------------------------------------------------ expansion
    def use_expansion(self, *, query_expansion: int | None = None, qe_alpha: float | None = None,
                      dba_neighbors: int | None = None, dba_alpha: float | None = None) -> None:
        """Change the query-expansion / DBA options (None: keep); a DBA change rebuilds the
        searched vectors (lazily) and the faiss structures from the originals."""
        changes = {name: value for name, value in (
            ("query_expansion", query_expansion), ("qe_alpha", qe_alpha),
            ("dba_neighbors", dba_neighbors), ("dba_alpha", dba_alpha)) if value is not None}
        params = replace(self.params, **changes)    # validates
        dba_changed = (params.dba_neighbors, params.dba_alpha) != (self.params.dba_neighbors,
                                                                   self.params.dba_alpha)
        self.params = params
        if dba_changed:
            self._dba = None
            self._faiss = None
            if self.method == "ivf" and self._trained_nlist is not None:
                self.train()                        # re-trained on the searched vectors

    def _augment_database(self) -> np.ndarray:
        """alpha-DBA of every stored vector (see module docstring), (n, dim) float32."""
        vectors = self.vectors
        neighbours = min(self.params.dba_neighbors + 1, self._size)
        if neighbours == 0:
            return vectors.copy()
        similarities, rows = faiss.knn(vectors, vectors, neighbours,
                                       metric=faiss.METRIC_INNER_PRODUCT)
        return _weighted_sum(vectors, rows, similarities, self.params.dba_alpha)

    def expand_query(self, query, neighbors: int | None = None,
                     alpha: float | None = None) -> np.ndarray:
        """alpha-QE of ``query`` (dim,) or (q, dim) over its top-``neighbors`` results (default:
        the index's ``query_expansion``, ``qe_alpha``), same shape, L2-normalised. With 0
        neighbours (or an empty index) the normalised query itself."""
        neighbors = self.params.query_expansion if neighbors is None else int(neighbors)
        alpha = self.params.qe_alpha if alpha is None else float(alpha)
        replace(self.params, query_expansion=neighbors, qe_alpha=alpha)   # validates
        queries, single = self._prepare_queries(query)
        if neighbors and self._size and queries.shape[0]:
            ids, scores = self._search_prepared(queries, min(neighbors, self._size))
            found = ids >= 0
            rows = np.where(found, self._rows_of(np.where(found, ids, 0)), 0)
            weights = np.where(found, scores, 0.0)
            database = self.search_vectors
            stacked = np.concatenate([queries[:, None], database[rows]], axis=1)
            weights = np.concatenate([np.ones((queries.shape[0], 1), np.float32), weights], 1)
            queries = _weighted_sum_rows(stacked, weights, alpha)
        return queries[0] if single else queries

    # ------------------------------------------------------------------ queries
    def search(self, query, k: int, *, query_expansion: int | None = None,
               qe_alpha: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` images by inner product, best first.

        ``query`` (dim,) -> ``ids`` (k',) int64 and ``scores`` (k',) float32 with
        ``k' = min(k, len(self))`` (approximate methods may find fewer). ``query`` (q, dim) ->
        (q, k') arrays, rows padded with id -1 and score -inf where fewer were found.
        ``query_expansion``, ``qe_alpha``: alpha-QE for this call (None: the index's options);
        the scores are then those of the expanded query.
        """
        if int(k) != k or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        queries, single = self._prepare_queries(query)
        neighbors = self.params.query_expansion if query_expansion is None else query_expansion
        if neighbors:
            queries = self.expand_query(queries, neighbors, qe_alpha)
        ids, scores = self._search_prepared(queries, int(k))
        if single:
            valid = ids[0] >= 0
            return ids[0][valid], scores[0][valid]
        return ids, scores

    def _search_prepared(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` of prepared queries (q, dim): (q, k') ids (-1 padded) and scores."""
        k = min(int(k), self._size)
        if k == 0 or queries.shape[0] == 0:
            ids, scores = np.empty((queries.shape[0], k), np.int64), np.empty(
                (queries.shape[0], k), np.float32)
        else:
            index = self._current_faiss()
            if index is None or (self.method == "exact" and k > GPU_MAX_K):
                scores, labels = faiss.knn(queries, self.search_vectors, k,
                                           metric=faiss.METRIC_INNER_PRODUCT)
                labels_are_ids = False
            else:
                scores, labels = index.search(queries, k)
                labels_are_ids = self.method == "ivf"
            found = labels >= 0
            ids = np.full(labels.shape, -1, np.int64)
            ids[found] = labels[found] if labels_are_ids else self._ids[labels[found]]
            scores = np.where(found, scores, -np.inf).astype(np.float32)
        return ids, scores

    def score(self, query, image_ids, *, query_expansion: int | None = None,
              qe_alpha: float | None = None) -> np.ndarray:
        """Exact inner products of ``query`` (dim,) or (q, dim) with stored images ``image_ids``
        (m,): (m,) or (q, m) float32 (with the searched vectors: DBA-augmented when on; the query
        expanded as :meth:`search` does). Unknown ids raise ``KeyError``."""
        queries, single = self._prepare_queries(query)
        rows = self._known_rows(image_ids, "image_ids")
        neighbors = self.params.query_expansion if query_expansion is None else query_expansion
        if neighbors:
            queries = self.expand_query(queries, neighbors, qe_alpha)
        scores = queries @ self.search_vectors[rows].T
        return scores[0] if single else scores

    def get_vectors(self, image_ids, *, searched: bool = False) -> np.ndarray:
        """Stored (normalised) descriptors of ``image_ids``, (m, dim) float32; ``searched``: the
        vectors searched and scored instead (:attr:`search_vectors`, alpha-DBA when on)."""
        rows = self._known_rows(image_ids, "image_ids")
        return (self.search_vectors if searched else self.vectors)[rows].copy()

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> None:
        """Publish the index to ``directory`` (manifest + checksummed arrays; a new version under
        the writer lock, or plainly as a component of a directory being published)."""
        arrays = {"vectors": self.vectors, "image_ids": self._ids[:self._size]}
        if self.method != "exact":
            index = self._current_faiss()
            if index is not None:
                arrays["faiss_index"] = faiss.serialize_index(index)
        save_directory(directory, kind=GLOBAL_INDEX_KIND, params=asdict(self.params),
                       counts={"images": self._size, "trained_nlist": self._trained_nlist},
                       arrays=arrays)

    @classmethod
    def load(cls, directory: str | os.PathLike, *, use_gpu: bool | None = None) -> "GlobalIndex":
        """Read an index written by :meth:`save` (its current version, whole, even while a writer
        replaces it), verifying checksums, counts and consistency."""
        return load_current(directory, lambda version: cls._load_version(version, use_gpu))

    @classmethod
    def _load_version(cls, directory: Path, use_gpu: bool | None) -> "GlobalIndex":
        manifest, arrays = read_arrays(directory, kind=GLOBAL_INDEX_KIND)
        try:
            index = cls(**manifest["params"], use_gpu=use_gpu)
        except (KeyError, TypeError, ValueError) as error:
            raise IndexFormatError(f"{directory}: corrupt manifest parameters ({error})") from error
        require("vectors" in arrays and "image_ids" in arrays, directory,
                "corrupt index: vectors or image_ids missing")
        vectors, ids = arrays["vectors"], arrays["image_ids"]
        require(ids.ndim == 1 and ids.dtype == np.int64, directory,
                f"image_ids must be 1-d int64, the file holds {ids.shape} {ids.dtype} (corrupt)")
        images = int(ids.shape[0])
        require(vectors.shape == (images, index.dim) and vectors.dtype == np.float32, directory,
                f"vectors shape mismatch: {vectors.shape}, expected ({images}, {index.dim}) "
                "like image_ids")
        stored_ivf = None
        if index.method == "ivf" and "faiss_index" in arrays:
            try:
                stored_ivf = faiss.deserialize_index(np.ascontiguousarray(arrays["faiss_index"]))
            except RuntimeError as error:
                raise IndexFormatError(f"{directory}: corrupt faiss index ({error})") from error
        trained_nlist = None if stored_ivf is None else int(getattr(stored_ivf, "nlist", -1))
        check_counts(directory, manifest, {"images": images, "trained_nlist": trained_nlist})
        require(np.unique(ids).size == ids.size, directory, "corrupt index: duplicate image ids")
        require(bool(np.isfinite(vectors).all()), directory, "corrupt index: NaN/inf vectors")
        index._ensure_capacity(images)
        index._buffer[:images] = vectors
        index._ids[:images] = ids
        index._size = images
        index._reindex()
        if stored_ivf is not None:
            stored = stored_ivf
            require(isinstance(stored, faiss.IndexIVFFlat) and stored.ntotal == images
                    and stored.d == index.dim and stored.nlist == trained_nlist,
                    directory, "faiss index mismatch with the stored vectors")
            stored.nprobe = index.params.nprobe
            index._trained_nlist = int(trained_nlist)
            empty = faiss.clone_index(stored)
            empty.reset()
            index._ivf_template = faiss.serialize_index(empty)
            index._faiss = stored
        elif index.method == "hnsw" and "faiss_index" in arrays:
            try:
                stored = faiss.deserialize_index(np.ascontiguousarray(arrays["faiss_index"]))
            except RuntimeError as error:
                raise IndexFormatError(f"{directory}: corrupt faiss index ({error})") from error
            require(isinstance(stored, faiss.IndexHNSWFlat) and stored.ntotal == images
                    and stored.d == index.dim, directory,
                    "faiss index mismatch with the stored vectors")
            stored.hnsw.efSearch = index.params.ef_search
            index._faiss = stored
        return index
