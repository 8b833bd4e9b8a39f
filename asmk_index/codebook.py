"""Visual-word codebook: faiss k-means training and exact nearest-centroid quantization.

Quantization is exact by default. On a GPU (when faiss sees one) it is a faiss flat index. On the
CPU, batches with one word per descriptor (index building) use faiss ``IndexFlatL2`` too; a query's
multiple assignment, and small batches, use :func:`nearest_centroids` (BLAS inner products and a
compiled k-smallest pass), 2-4x (4096 words) to 5-10x (65536 words) faster than faiss there, where
faiss keeps a heap per descriptor. Both give the same words up to float32 rounding of near-ties
(1 descriptor in 300k differed). An HNSW quantizer is optional.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import faiss
import numpy as np

from . import _kernels, persistence
from .validation import check_descriptors

CODEBOOK_KIND = "asmk_codebook"
# exact CPU quantization works on blocks of descriptors x centroids: one BLAS product fills a
# buffer of inner products (at most NEAREST_BUFFER floats, unless NEAREST_MIN_COLUMNS needs more),
# a compiled pass ranks it. 4 MiB, about the two cores' L2: a query's assignment to 65536 words
# took 29 ms against 33 ms with a 16 MiB buffer (2 cores; 4096 words fit one block either way)
NEAREST_ROWS = 8192
NEAREST_BUFFER = 1 << 20
NEAREST_MIN_COLUMNS = 512
FAISS_SEARCH_BATCH = 1 << 18  # descriptors per faiss search call
# single assignment of at least this many descriptors (index building) goes to faiss IndexFlatL2 on
# the CPU too: as fast as nearest_centroids, and the aggregation that follows ran at its own
# speed after it, but 1.5-2x slower after numpy's BLAS product, whose idle OpenBLAS threads keep
# spinning for a while (2 cores; OPENBLAS_THREAD_TIMEOUT=4 removed that effect)
FAISS_MIN_ROWS = 4096


@dataclass(frozen=True)
class KMeansConfig:
    """Defaults for :meth:`Codebook.train`."""

    max_points_per_centroid: int = 256
    niter: int = 20


def _use_gpu() -> bool:
    return faiss.get_num_gpus() > 0


def _flat_l2_index(centroids: np.ndarray):
    """Exact L2 search over the centroids (faiss IndexFlatL2, on all GPUs when present)."""
    index = faiss.IndexFlatL2(centroids.shape[1])
    if _use_gpu():
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(centroids)
    return index


def squared_norms(rows: np.ndarray) -> np.ndarray:
    """(N,) float32 squared L2 norms of (N, D) float32 rows."""
    return np.einsum("ij,ij->i", rows, rows)


def nearest_centroids(descriptors: np.ndarray, centroids: np.ndarray, k: int, *,
                      centroid_norms: np.ndarray | None = None) -> np.ndarray:
    """Exact k nearest centroids (squared L2) of every descriptor, nearest first, on the CPU.

    descriptors (N, D) and centroids (K, D) float32, C-contiguous; centroid_norms (K,) their
    squared norms (computed when None). Returns (N, k) int64; ties keep the lower id first.
    Blocks of inner products come from one BLAS product each (numpy) and are ranked by a
    compiled pass, so no (N, K) distance matrix is ever held.
    """
    n, size = descriptors.shape[0], centroids.shape[0]
    if not 1 <= k <= size:
        raise ValueError(f"k must be in [1, {size}], got {k}")
    if centroid_norms is None:
        centroid_norms = squared_norms(centroids)
    words = np.empty((n, k), dtype=np.int64)
    rows = min(NEAREST_ROWS, max(n, 1))
    columns = min(size, max(NEAREST_MIN_COLUMNS, NEAREST_BUFFER // rows))
    buffer = np.empty((rows, columns), dtype=np.float32)
    for start in range(0, n, rows):
        block = descriptors[start:start + rows]
        best_distances = np.full((block.shape[0], k), np.inf, dtype=np.float32)
        best_ids = np.full((block.shape[0], k), -1, dtype=np.int64)
        for first in range(0, size, columns):
            last = min(first + columns, size)
            products = buffer[:block.shape[0], :last - first]
            np.matmul(block, centroids[first:last].T, out=products)
            _kernels.merge_nearest(products, centroid_norms[first:last], first, best_distances,
                                   best_ids)
        words[start:start + block.shape[0]] = best_ids
    return words


class Codebook:
    """K centroids (K, D) float32; quantize() maps descriptors to their nearest centroid ids."""

    def __init__(self, centroids: np.ndarray):
        self._centroids = np.array(check_descriptors(centroids, name="centroids"), copy=True)
        self._centroids.setflags(write=False)
        self._search_index = None
        self._hash = None
        self._approximate = None
        self._norms = None

    def use_approximate_quantizer(self, kind: str | None = "hnsw", *, neighbors: int = 32,
                                  ef_search: int = 128) -> None:
        """Opt in to approximate quantization (``"hnsw"``: faiss IndexHNSWFlat, CPU) for very
        large codebooks; ``None`` returns to exact search (the default, the reference's)."""
        if kind not in (None, "hnsw"):
            raise ValueError(f"unknown quantizer {kind!r}; expected None or 'hnsw'")
        self._approximate = None if kind is None else (kind, int(neighbors), int(ef_search))
        self._search_index = None

    # construction -------------------------------------------------------------------------
    @classmethod
    def from_centroids(cls, centroids) -> "Codebook":
        """Codebook from a (K, D) array of centroids (copied as float32)."""
        return cls(centroids)

    @classmethod
    def train(cls, descriptors, size: int, *, seed: int = 0,
              max_points_per_centroid: int = KMeansConfig.max_points_per_centroid,
              niter: int = KMeansConfig.niter, verbose: bool = False) -> "Codebook":
        """k-means (faiss) of ``descriptors`` (N, D) into ``size`` words.

        Inputs above ``max_points_per_centroid * size`` rows are subsampled with ``seed``.
        Runs on GPU when faiss sees one. Raises ValueError when N < size.
        """
        size = int(size)
        if size < 1:
            raise ValueError(f"codebook size must be >= 1, got {size}")
        descriptors = check_descriptors(descriptors, name="training descriptors")
        n_points = descriptors.shape[0]
        if n_points < size:
            raise ValueError(f"cannot train a codebook of {size} words from only {n_points} "
                             "descriptors (need at least as many descriptors as words)")
        limit = int(max_points_per_centroid) * size
        if n_points > limit:
            rng = np.random.default_rng(seed)
            subset = np.sort(rng.choice(n_points, size=limit, replace=False))
            descriptors = np.ascontiguousarray(descriptors[subset])
        kmeans = faiss.Kmeans(descriptors.shape[1], size, niter=int(niter), seed=int(seed),
                              verbose=verbose, gpu=_use_gpu(),
                              max_points_per_centroid=int(max_points_per_centroid))
        kmeans.train(descriptors)
        return cls(np.ascontiguousarray(kmeans.centroids, dtype=np.float32))

    # properties ---------------------------------------------------------------------------
    @property
    def centroids(self) -> np.ndarray:
        """(K, D) float32, read-only."""
        return self._centroids

    @property
    def size(self) -> int:
        return int(self._centroids.shape[0])

    @property
    def dim(self) -> int:
        return int(self._centroids.shape[1])

    @property
    def hash(self) -> str:
        """sha256 of the centroid array (contents, shape, dtype)."""
        if self._hash is None:
            self._hash = persistence.sha256_of_array(self._centroids)
        return self._hash

    def __repr__(self) -> str:
        return f"Codebook(size={self.size}, dim={self.dim}, hash={self.hash[:12]})"

    # quantization -------------------------------------------------------------------------
    def quantize(self, descriptors, multiple_assignment: int = 1) -> np.ndarray:
        """(N, D) descriptors -> (N, multiple_assignment) int64 ids of the nearest centroids,
        nearest first (exact search)."""
        multiple_assignment = int(multiple_assignment)
        if not 1 <= multiple_assignment <= self.size:
            raise ValueError(f"multiple_assignment must be in [1, {self.size}] for a codebook of "
                             f"{self.size} words, got {multiple_assignment}")
        descriptors = check_descriptors(descriptors, dim=self.dim, allow_empty=True)
        if self._approximate is None and not _use_gpu() and (
                multiple_assignment > 1 or descriptors.shape[0] < FAISS_MIN_ROWS):
            return nearest_centroids(descriptors, self._centroids, multiple_assignment,
                                     centroid_norms=self._centroid_norms())
        words = np.empty((descriptors.shape[0], multiple_assignment), dtype=np.int64)
        if descriptors.shape[0] == 0:
            return words
        if self._search_index is None:
            self._search_index = self._build_search_index()
        for start in range(0, descriptors.shape[0], FAISS_SEARCH_BATCH):
            chunk = descriptors[start:start + FAISS_SEARCH_BATCH]
            _, words[start:start + chunk.shape[0]] = self._search_index.search(
                chunk, multiple_assignment)
        return words

    def _centroid_norms(self) -> np.ndarray:
        if self._norms is None:
            self._norms = squared_norms(self._centroids)
        return self._norms

    def _build_search_index(self):
        if self._approximate is None:
            return _flat_l2_index(self._centroids)
        _, neighbors, ef_search = self._approximate
        index = faiss.IndexHNSWFlat(self.dim, neighbors)
        index.hnsw.efConstruction = max(40, ef_search)
        index.add(self._centroids)
        index.hnsw.efSearch = max(ef_search, 1)
        return index

    # persistence --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"type": type(self).__name__, "params": {"size": self.size, "dim": self.dim},
                "state": {"centroids": np.array(self._centroids)}}

    @classmethod
    def initialize_from_state(cls, state: dict) -> "Codebook":
        if not isinstance(state, dict) or state.get("type") != cls.__name__:
            raise ValueError(f"not a {cls.__name__} state dict (type="
                             f"{state.get('type') if isinstance(state, dict) else type(state)})")
        return cls.from_centroids(state["state"]["centroids"])

    def save(self, path: str | os.PathLike) -> None:
        """Atomically write one checksummed ``.npz`` file."""
        persistence.save_arrays_file(path, kind=CODEBOOK_KIND,
                                     params={"size": self.size, "dim": self.dim, "hash": self.hash},
                                     arrays={"centroids": self._centroids})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Codebook":
        manifest, arrays = persistence.load_arrays_file(path, kind=CODEBOOK_KIND)
        persistence.require("centroids" in arrays, path, "no centroids array (corrupt)")
        centroids = arrays["centroids"]
        params = manifest.get("params", {})
        persistence.require(
            centroids.ndim == 2 and centroids.dtype == np.float32
            and list(centroids.shape) == [params.get("size"), params.get("dim")], path,
            f"centroids shape mismatch: manifest says ({params.get('size')}, {params.get('dim')}) "
            f"float32, file has {centroids.shape} {centroids.dtype} (corrupt)")
        try:
            codebook = cls(centroids)
        except ValueError as error:
            raise persistence.IndexFormatError(f"{path}: corrupt centroids ({error})") from error
        persistence.require(codebook.hash == params.get("hash"), path,
                            "codebook hash mismatch (corrupt)")
        return codebook
