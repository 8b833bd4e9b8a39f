"""Visual-word codebook: faiss k-means training and exact nearest-centroid quantization."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import faiss
import numpy as np

from . import persistence
from .validation import check_descriptors

CODEBOOK_KIND = "asmk_codebook"
QUANTIZE_BATCH = 1 << 18  # descriptors per faiss search call (bounds the distance buffers)
# rows * words * dim below this (one query image against up to ~16k words) run faster on one CPU
# thread: measured 240 x 4096 x 128 with k=5: 8.4 ms on 1 thread, 19 ms on 2 (faiss 1.15)
SINGLE_THREAD_WORK = 1 << 29


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


@contextlib.contextmanager
def _cpu_threads(count: int):
    """Temporarily limit faiss's OpenMP threads (process-wide) for small CPU searches, where
    thread start-up costs more than the search itself."""
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(count)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


class Codebook:
    """K centroids (K, D) float32; quantize() maps descriptors to their nearest centroid ids."""

    def __init__(self, centroids: np.ndarray):
        self._centroids = np.array(check_descriptors(centroids, name="centroids"), copy=True)
        self._centroids.setflags(write=False)
        self._search_index = None
        self._hash = None
        self._approximate = None

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
        words = np.empty((descriptors.shape[0], multiple_assignment), dtype=np.int64)
        if descriptors.shape[0] == 0:
            return words
        if self._search_index is None:
            self._search_index = self._build_search_index()
        small = descriptors.shape[0] * self.size * self.dim < SINGLE_THREAD_WORK
        with _cpu_threads(1) if small and not _use_gpu() else contextlib.nullcontext():
            for start in range(0, descriptors.shape[0], QUANTIZE_BATCH):
                chunk = descriptors[start:start + QUANTIZE_BATCH]
                _, words[start:start + chunk.shape[0]] = self._search_index.search(
                    chunk, multiple_assignment)
        return words

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
