"""Visual-word codebook: faiss k-means training and exact nearest-centroid quantization.

Quantization is exact by default, by one of these paths (:attr:`Codebook.quantizer` says which):

- ``"faiss-gpu"``: a faiss flat index on the GPU, when faiss sees one;
- ``"amx-bf16"``: on CPUs with AMX (Intel Sapphire Rapids and later),
  :func:`nearest_centroids_bf16`: bfloat16 tile products with a proven error bound pick the few
  centroids that can be among the k nearest, whose exact distances (double precision) then
  decide; ties go to the lower id;
- ``"blas"``: elsewhere, :func:`nearest_centroids` (numpy BLAS blocks and a compiled k-smallest
  pass) for a query's multiple assignment and small batches, 2-4x (4096 words) to 5-10x (65536
  words) faster than faiss there, and faiss ``IndexFlatL2`` for large single-assignment batches;
- ``"hnsw"``: an approximate faiss HNSW index, on request.

"amx-bf16" gives the words of exact (double precision) distances; the BLAS and faiss products
agree with it up to float32 rounding of near-ties (1 descriptor in 300k differed).
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
# the bfloat16 prefilter keeps each row's k best in a sorted list: above this many words per
# descriptor, the BLAS path ranks instead
BF16_MAX_ASSIGNMENT = 64
# what Codebook.use_quantizer accepts: "auto" picks faiss-gpu, else amx-bf16, else blas
QUANTIZER_CHOICES = ("auto", "amx-bf16", "blas", "hnsw")


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


def amx_usable() -> bool:
    """Whether this machine runs the AMX bfloat16 prefilter (CPU, OS and build allow it)."""
    return _kernels.bf16_amx_usable()


@dataclass(frozen=True)
class Bf16Centroids:
    """Centroids packed for :func:`nearest_centroids_bf16` (bfloat16 tiles, half squared norms,
    and the rounding statistics the error bound needs)."""

    centroids: np.ndarray   # (K, D) float32, the exact values the final ranking uses
    packed: np.ndarray      # (Kp * Dp,) uint16 bfloat16 tiles (K, D rounded up to 32)
    half_norms: np.ndarray  # (Kp,) float32, -|c|^2 / 2 (NaN for the padding)
    stats: tuple            # (max |c - bf16(c)|, max |bf16(c)|, max |c|^2)

    @classmethod
    def pack(cls, centroids: np.ndarray) -> "Bf16Centroids":
        centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        packed, half_norms, stats = _kernels.bf16_pack_centroids(centroids)
        return cls(centroids, packed, half_norms, stats)


def nearest_centroids_bf16(descriptors: np.ndarray, centroids: Bf16Centroids, k: int, *,
                           use_amx: bool = True) -> np.ndarray:
    """Exact k nearest centroids (squared L2) of every descriptor, nearest first, ties to the
    lower id: (N, D) float32 C-contiguous descriptors -> (N, k) int64.

    Every centroid's proximity is first computed from bfloat16 copies, on AMX tiles
    (``use_amx``; see :func:`amx_usable`) or by a portable loop (slow; the same result); a proven
    bound on that rounding leaves the few centroids that can be among the k nearest, and their
    distances in double precision decide. So the words are the exact ones, whatever the
    prefilter's rounding (see ``_nearest_bf16.h``).
    """
    words, _, _ = _kernels.bf16_nearest(descriptors, centroids.centroids, centroids.packed,
                                        centroids.half_norms, centroids.stats, int(k),
                                        bool(use_amx))
    return words


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
        self._choice = "auto"
        self._hnsw = None
        self._norms = None
        self._bf16 = None

    def use_quantizer(self, kind: str = "auto", *, neighbors: int = 32,
                      ef_search: int = 128) -> None:
        """Choose the quantization path (see the module docstring): ``"auto"`` (the default:
        faiss-gpu, else amx-bf16, else blas), ``"amx-bf16"`` (ValueError where AMX is not usable),
        ``"blas"``, or the approximate ``"hnsw"`` (faiss IndexHNSWFlat with ``neighbors`` links
        and ``ef_search``) for very large codebooks."""
        if kind not in QUANTIZER_CHOICES:
            raise ValueError(f"unknown quantizer {kind!r}; expected one of {QUANTIZER_CHOICES}")
        if kind == "amx-bf16" and not amx_usable():
            raise ValueError("quantizer 'amx-bf16' needs a CPU with AMX-BF16, an OS that grants "
                             "the tile state, and kernels built with the AMX kernel")
        self._choice = kind
        self._hnsw = (int(neighbors), int(ef_search)) if kind == "hnsw" else None
        self._search_index = None

    def use_approximate_quantizer(self, kind: str | None = "hnsw", *, neighbors: int = 32,
                                  ef_search: int = 128) -> None:
        """``"hnsw"``: :meth:`use_quantizer` ("hnsw"); ``None``: back to exact search ("auto")."""
        if kind not in (None, "hnsw"):
            raise ValueError(f"unknown quantizer {kind!r}; expected None or 'hnsw'")
        self.use_quantizer("auto" if kind is None else kind, neighbors=neighbors,
                           ef_search=ef_search)

    @property
    def quantizer(self) -> str:
        """The path quantize() takes: "faiss-gpu", "amx-bf16", "blas" or "hnsw"."""
        if self._choice == "auto":
            return "faiss-gpu" if _use_gpu() else "amx-bf16" if amx_usable() else "blas"
        return self._choice

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
        path = self.quantizer
        if path == "amx-bf16" and multiple_assignment <= BF16_MAX_ASSIGNMENT:
            if self._bf16 is None:
                self._bf16 = Bf16Centroids.pack(self._centroids)
            return nearest_centroids_bf16(descriptors, self._bf16, multiple_assignment)
        if path in ("amx-bf16", "blas") and (
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
        if self._hnsw is None:
            return _flat_l2_index(self._centroids)
        neighbors, ef_search = self._hnsw
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
