"""AsmkIndex: the ASMK* inverted file over a codebook (add, remove, search, score, save, load).

Scores equal the ``asmk`` package's (0.1.1) on the same codebook and parameters:
``score(q, X) = sum_w idf_w * sigma(u_w) / sqrt(norm_X) / sqrt(norm_q)`` over the words shared by
the query and image X, ``norm`` = number of aggregated vectors (idf off) or the sum of idf over
the image's words (idf on); ``idf_w = log(n_images / df_w) ** 2`` for indexed words and 1 for words
absent from the index (a query word absent from the index still adds 1 to the query norm, as in
the reference). Differences from the reference, by design: idf is always computed from the current
counts (the reference leaves stale idf values for words untouched by a later add() call); a zero
norm gives a zero score instead of NaN; binary similarity divides by D (see ``kernel``).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import _kernels, persistence
from . import inverted_file as ivf
from .codebook import Codebook
from .kernel import KernelParams, aggregate_runs, binary_selectivity_table, code_width
from .validation import check_descriptors, check_ids

INDEX_KIND = "asmk_index"
CODEBOOK_FILE = "codebook.npz"
MAX_DOCUMENTS = int(np.iinfo(np.uint32).max)
# a query's scan sums the terms of its first and second half of words apart, then adds the two
# (score() likewise, so both give the same bits); the halves run on two threads when a segment
# holds at least this many aggregated vectors and no BLAS product precedes the scan (the "blas"
# quantizer's idle OpenBLAS threads keep spinning, and a second pool on the same cores made
# queries 1.6-3.2x slower). 4096 words, 10k images, 2 cores, AMX quantizer: the scan took 0.42
# against 0.78 ms, the whole search 1.1 against 1.5 ms
SCAN_THREAD_MIN_VECTORS = 1 << 17
SCAN_THREAD_QUANTIZERS = ("amx-bf16", "faiss-gpu")


def _first_half_end(words: np.ndarray) -> int:
    """Where a query's second half of words begins (the same split for search and score)."""
    return words.size // 2


@dataclass(frozen=True)
class AsmkParams:
    """Every parameter of an :class:`AsmkIndex` (stored in its manifest)."""

    binary: bool = True
    alpha: float = 3.0
    similarity_threshold: float = 0.0
    multiple_assignment: int = 1
    query_multiple_assignment: int = 5
    use_idf: bool = False

    @property
    def kernel(self) -> KernelParams:
        return KernelParams(self.binary, self.alpha, self.similarity_threshold)


def _image_runs(image_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(new ids (M,), descriptor order (N,) int64 or None, run starts (M + 1,) int64): image
    ``m`` owns descriptors ``order[starts[m]:starts[m+1]]``.

    Fast path O(N), order None, ids in order of appearance, when each image's descriptors are
    contiguous; else ids ascending and a stable counting sort of the descriptors by image.
    """
    changes = np.flatnonzero(image_ids[1:] != image_ids[:-1]) + 1
    run_starts = np.concatenate([[0], changes, [image_ids.size]]).astype(np.int64) \
        if image_ids.size else np.zeros(1, dtype=np.int64)
    run_ids = image_ids[run_starts[:-1]]
    if np.unique(run_ids).size == run_ids.size:
        return run_ids, None, run_starts
    new_ids, inverse = np.unique(image_ids, return_inverse=True)  # interleaved: ascending ids
    image_index = inverse.reshape(-1).astype(np.int64)
    order = _kernels.stable_argsort_by(image_index, new_ids.size,
                                       np.arange(image_ids.size, dtype=np.int64))
    starts = np.zeros(new_ids.size + 1, dtype=np.int64)
    np.cumsum(np.bincount(image_index, minlength=new_ids.size), out=starts[1:])
    return new_ids, order, starts


class AsmkIndex:
    """ASMK* index of images given as sets of local descriptors (see module docstring)."""

    def __init__(self, codebook: Codebook, *, binary: bool = True, alpha: float = 3.0,
                 similarity_threshold: float = 0.0, multiple_assignment: int = 1,
                 query_multiple_assignment: int = 5, use_idf: bool = False):
        if not isinstance(codebook, Codebook):
            raise TypeError(f"codebook must be an asmk_index.Codebook, got {type(codebook)}")
        self.params = AsmkParams(bool(binary), float(alpha), float(similarity_threshold),
                                 int(multiple_assignment), int(query_multiple_assignment),
                                 bool(use_idf))
        self.kernel_params = self.params.kernel  # raises ValueError on bad alpha / threshold
        for name in ("multiple_assignment", "query_multiple_assignment"):
            value = getattr(self.params, name)
            if not 1 <= value <= codebook.size:
                raise ValueError(f"{name} must be in [1, {codebook.size}], got {value}")
        self.codebook = codebook
        self._doc_ids = np.zeros(0, dtype=np.int64)
        self._segments: list[ivf.Segment] = []
        self._selectivity = (binary_selectivity_table(codebook.dim, self.params.alpha,
                                                      self.params.similarity_threshold)
                             if self.params.binary else None)
        self._invalidate()

    # bookkeeping --------------------------------------------------------------------------
    def _invalidate(self) -> None:
        self._sorted_ids = None
        self._sorted_positions = None
        self._idf = None
        self._inv_sqrt_norm = None
        self._log_idf = None

    def _lookup_order(self) -> tuple[np.ndarray, np.ndarray]:
        if self._sorted_ids is None:
            self._sorted_positions = np.argsort(self._doc_ids, kind="stable")
            self._sorted_ids = self._doc_ids[self._sorted_positions]
        return self._sorted_ids, self._sorted_positions

    def _weights(self) -> tuple[np.ndarray, np.ndarray]:
        """(idf (K,) float64, 1/sqrt(norm) (n_docs,) float64), recomputed after a change."""
        if self._idf is None:
            n_docs = len(self)
            idf = np.ones(self.codebook.size, dtype=np.float64)
            if self.params.use_idf:
                present = ivf.document_frequencies(self._segments, self.codebook.size) > 0
                idf[present] = self.inverse_document_frequency()[present] ** 2
                norm = ivf.weight_sum_per_document(self._segments, n_docs, idf)
            else:
                norm = ivf.vectors_per_document(self._segments, n_docs).astype(np.float64)
            inv_sqrt_norm = np.zeros(n_docs, dtype=np.float64)
            positive = norm > 0
            inv_sqrt_norm[positive] = 1.0 / np.sqrt(norm[positive])
            # the guard (_idf) is set last: concurrent searches never see half a cache
            self._inv_sqrt_norm = inv_sqrt_norm
            self._idf = idf
        return self._idf, self._inv_sqrt_norm

    def inverse_document_frequency(self) -> np.ndarray:
        """(K,) float64 ``log(n_images / df_w)`` of every word (``df_w``: indexed images holding
        word w; 0 for words no image holds), from the current counts. ASMK*'s idf (``use_idf``) is
        its square; spatial verification can weigh inliers by it."""
        if self._log_idf is None:
            df = ivf.document_frequencies(self._segments, self.codebook.size)
            log_idf = np.zeros(self.codebook.size, dtype=np.float64)
            present = df > 0
            log_idf[present] = np.log(len(self) / df[present])
            self._log_idf = log_idf
        return self._log_idf

    def _doc_positions(self, image_ids: np.ndarray) -> np.ndarray:
        """Internal document index of every id; KeyError naming the unknown ones."""
        sorted_ids, sorted_positions = self._lookup_order()
        where = np.searchsorted(sorted_ids, image_ids)
        where_clipped = np.minimum(where, max(sorted_ids.size - 1, 0))
        found = (where < sorted_ids.size) & (sorted_ids[where_clipped] == image_ids) \
            if sorted_ids.size else np.zeros(image_ids.size, dtype=bool)
        if not found.all():
            unknown = np.unique(image_ids[~found])
            raise KeyError(f"{unknown.size} image id(s) not in the index: "
                           f"{unknown[:10].tolist()}{' ...' if unknown.size > 10 else ''}")
        return sorted_positions[where_clipped]

    # public state -------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._doc_ids.size)

    def __repr__(self) -> str:
        return (f"AsmkIndex(images={len(self)}, vectors={self.n_vectors}, "
                f"segments={len(self._segments)}, {self.params})")

    @property
    def image_ids(self) -> np.ndarray:
        """(n_images,) int64 ids, in insertion order (a copy)."""
        return self._doc_ids.copy()

    @property
    def n_vectors(self) -> int:
        """Number of aggregated vectors (postings) stored."""
        return sum(segment.n_postings for segment in self._segments)

    def contains(self, image_ids) -> np.ndarray:
        """(M,) bool: which ids are in the index."""
        image_ids = check_ids(image_ids)
        sorted_ids, _ = self._lookup_order()
        where = np.minimum(np.searchsorted(sorted_ids, image_ids), max(sorted_ids.size - 1, 0))
        if not sorted_ids.size:
            return np.zeros(image_ids.size, dtype=bool)
        return sorted_ids[where] == image_ids

    def memory_bytes(self) -> int:
        """Bytes held by the index's arrays (postings, forward index, ids, norms), codebook excluded."""
        total = sum(segment.nbytes() for segment in self._segments) + self._doc_ids.nbytes
        idf, inv_sqrt_norm = self._weights()
        return int(total + idf.nbytes + inv_sqrt_norm.nbytes)

    def bytes_per_image(self) -> float:
        return self.memory_bytes() / max(len(self), 1)

    # query aggregation --------------------------------------------------------------------
    def query_words(self, query_descriptors) -> np.ndarray:
        """The words of a query's descriptors (n, D): (n, query_multiple_assignment) int64,
        nearest first (pass them to :meth:`search` / :meth:`score` to quantize only once)."""
        query = check_descriptors(query_descriptors, dim=self.codebook.dim, name="query descriptors")
        return self.codebook.quantize(query, self.params.query_multiple_assignment)

    def _aggregate_query(self, query_descriptors, words=None) -> tuple[np.ndarray, np.ndarray]:
        """(sorted unique words (m,), aggregated vectors (m, W)) of one query image."""
        query = check_descriptors(query_descriptors, dim=self.codebook.dim,
                                  name="query descriptors")
        if words is None:
            words = self.codebook.quantize(query, self.params.query_multiple_assignment)
        else:
            words = self._check_words(words, query.shape[0], self.params.query_multiple_assignment)
        aggregated = aggregate_runs(query, words, np.array([0, query.shape[0]], dtype=np.int64),
                                    self.codebook.centroids, self.params.binary)
        return aggregated.word, aggregated.vectors

    def _query_weights(self, words: np.ndarray) -> tuple[np.ndarray, float]:
        idf, _ = self._weights()
        weights = np.ascontiguousarray(idf[words])
        query_norm = float(weights.sum())
        return weights, (1.0 / np.sqrt(query_norm) if query_norm > 0 else 0.0)

    # mutation -----------------------------------------------------------------------------
    def add(self, descriptors, image_ids, *, words=None) -> None:
        """Index descriptors (N, D) float32, one image id per descriptor; ids must be new.

        ``words``: optional precomputed assignments (N, multiple_assignment) int64 of these
        descriptors to this codebook (nearest first), e.g. from a GPU or a cache; else quantized here.
        """
        # with precomputed words the NaN/inf check rides along the compiled residual pass (same
        # error, raised before any state change); else it must precede the quantization
        descriptors = check_descriptors(descriptors, dim=self.codebook.dim,
                                        check_finite=words is None)
        image_ids = check_ids(image_ids, length=descriptors.shape[0])
        if words is not None:
            words = self._check_words(words, descriptors.shape[0])
        new_ids, descriptor_order, image_starts = _image_runs(image_ids)
        present = self.contains(new_ids)
        if present.any():
            raise ValueError(f"{int(present.sum())} image id(s) already in the index: "
                             f"{new_ids[present][:10].tolist()} (remove them first)")
        n_docs = len(self)
        if n_docs + new_ids.size > MAX_DOCUMENTS:
            raise ValueError(f"the index holds at most {MAX_DOCUMENTS} images")
        if words is None:
            words = self.codebook.quantize(descriptors, self.params.multiple_assignment)
        aggregated = aggregate_runs(descriptors, words, image_starts, self.codebook.centroids,
                                    self.params.binary, descriptor_order=descriptor_order,
                                    check_finite=True)
        segment = ivf.Segment.from_doc_major(aggregated.word, aggregated.image, aggregated.vectors,
                                             doc_start=n_docs, n_docs=new_ids.size,
                                             size=self.codebook.size)
        segments = ivf.append_segment(self._segments, segment)
        doc_ids = np.concatenate([self._doc_ids, new_ids])
        # commit (nothing above touched self)
        self._segments, self._doc_ids = segments, doc_ids
        self._invalidate()

    def _check_words(self, words, n_descriptors: int, assignment: int | None = None) -> np.ndarray:
        """``words`` checked: (n_descriptors, assignment) ids of distinct words per descriptor
        (``assignment`` default: the database's multiple assignment)."""
        words = np.asarray(words)
        assignment = self.params.multiple_assignment if assignment is None else assignment
        expected = (n_descriptors, assignment)
        if words.shape != expected or not np.issubdtype(words.dtype, np.integer):
            raise ValueError(f"words: expected an integer array of shape {expected}, got "
                             f"{words.shape} {words.dtype}")
        words = np.ascontiguousarray(words, dtype=np.int64)
        if words.size and (words.min() < 0 or words.max() >= self.codebook.size):
            raise ValueError(f"words: ids must lie in [0, {self.codebook.size})")
        if assignment > 1 and np.any(np.sort(words, axis=1)[:, 1:] == np.sort(words, axis=1)[:, :-1]):
            raise ValueError("words: a descriptor is assigned to the same word twice")
        return words

    def remove(self, image_ids) -> None:
        """Remove images by id (KeyError naming unknown ids; then nothing is removed)."""
        image_ids = check_ids(image_ids)
        positions = self._doc_positions(image_ids)
        if positions.size == 0:
            return
        keep_doc = np.ones(len(self), dtype=bool)
        keep_doc[positions] = False
        segments = ivf.remove_docs(self._segments, keep_doc)
        doc_ids = self._doc_ids[keep_doc]
        self._segments, self._doc_ids = segments, doc_ids
        self._invalidate()

    # search -------------------------------------------------------------------------------
    def _accumulate(self, words, vectors, weights) -> np.ndarray:
        """(images,) sums of every posting's term: the first half of the query words and the
        second summed apart (see SCAN_THREAD_MIN_VECTORS), then added."""
        first_half = np.zeros(len(self), dtype=np.float64)
        second_half = np.zeros(len(self), dtype=np.float64)
        split = _first_half_end(words)
        threaded = (self.codebook.quantizer in SCAN_THREAD_QUANTIZERS
                    and _kernels.max_threads() >= 2)
        for segment in self._segments:
            threads = 2 if threaded and segment.n_postings >= SCAN_THREAD_MIN_VECTORS else 1
            if self.params.binary:
                _kernels.scan_binary(vectors, words, weights, split, segment.offsets,
                                     segment.codes, segment.docs, self._selectivity, first_half,
                                     second_half, threads)
            else:
                _kernels.scan_float(vectors, words, weights, split, segment.offsets, segment.codes,
                                    segment.docs, self.params.alpha,
                                    self.params.similarity_threshold, first_half, second_half,
                                    threads)
        first_half += second_half
        return first_half

    def search(self, query_descriptors, k: int, *, words=None) -> tuple[np.ndarray, np.ndarray]:
        """Best ``k`` images for one query image (M, D): (ids (k,) int64, scores (k,) float64),
        best first, ties by lower id. Fewer than k when the index holds fewer images.
        ``words``: the query's :meth:`query_words` when already computed."""
        k = int(k)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        words, vectors = self._aggregate_query(query_descriptors, words)
        if len(self) == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
        weights, inv_sqrt_query_norm = self._query_weights(words)
        _, inv_sqrt_norm = self._weights()
        scores = self._accumulate(words, vectors, weights) * inv_sqrt_norm * inv_sqrt_query_norm
        best = _kernels.top_k(scores, self._doc_ids, k)  # ties: lower id first
        return self._doc_ids[best], scores[best]

    def score(self, query_descriptors, candidate_ids, *, words=None) -> np.ndarray:
        """Scores (C,) float64 of the given images only (forward index; equal to search()'s).
        ``words``: the query's :meth:`query_words` when already computed."""
        candidate_ids = check_ids(candidate_ids, name="candidate_ids")
        positions = self._doc_positions(candidate_ids)
        words, vectors = self._aggregate_query(query_descriptors, words)
        weights, inv_sqrt_query_norm = self._query_weights(words)
        _, inv_sqrt_norm = self._weights()
        accumulator = np.zeros(candidate_ids.size, dtype=np.float64)
        if candidate_ids.size == 0:
            return accumulator
        split = _first_half_end(words)
        starts = np.array([segment.doc_start for segment in self._segments], dtype=np.int64)
        segment_of = np.searchsorted(starts, positions, side="right") - 1
        for number in np.unique(segment_of):
            segment = self._segments[number]
            chosen = np.flatnonzero(segment_of == number)
            local = np.ascontiguousarray(positions[chosen] - segment.doc_start, dtype=np.int64)
            out = np.zeros(chosen.size, dtype=np.float64)
            if self.params.binary:
                _kernels.score_binary(vectors, words, weights, split, segment.offsets,
                                      segment.codes, segment.fwd_positions, segment.fwd_offsets,
                                      local, self._selectivity, out)
            else:
                _kernels.score_float(vectors, words, weights, split, segment.offsets,
                                     segment.codes, segment.fwd_positions, segment.fwd_offsets,
                                     local, self.params.alpha, self.params.similarity_threshold,
                                     out)
            accumulator[chosen] = out
        return accumulator * inv_sqrt_norm[positions] * inv_sqrt_query_norm

    # persistence --------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        """Publish the index (with its codebook) as a checksummed directory (a new version under
        the writer lock; plainly when it is a component of a directory being published)."""
        arrays = {"image_ids": self._doc_ids}
        ranges = []
        for number, segment in enumerate(self._segments):
            for name, array in segment.arrays().items():
                arrays[f"segment{number:03d}_{name}"] = array
            ranges.append([segment.doc_start, segment.n_docs])
        with persistence.publish_directory(directory) as temporary:
            self.codebook.save(Path(temporary) / CODEBOOK_FILE)
            persistence.write_arrays(
                temporary, kind=INDEX_KIND, params=asdict(self.params),
                counts={"images": len(self), "vectors": self.n_vectors,
                        "segments": len(self._segments)},
                arrays=arrays,
                extra={"codebook": {"file": CODEBOOK_FILE, "hash": self.codebook.hash,
                                    "size": self.codebook.size, "dim": self.codebook.dim},
                       "segment_ranges": ranges})

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "AsmkIndex":
        """Read an index written by :meth:`save` (its current version, whole, even while a writer
        replaces it); IndexFormatError when anything is corrupt."""
        return persistence.load_current(directory, cls._load_version)

    @classmethod
    def _load_version(cls, directory: Path) -> "AsmkIndex":
        manifest, arrays = persistence.read_arrays(directory, kind=INDEX_KIND)
        require = persistence.require
        stored = manifest.get("codebook", {})
        codebook = Codebook.load(directory / CODEBOOK_FILE)
        require(codebook.hash == stored.get("hash") and codebook.size == stored.get("size")
                and codebook.dim == stored.get("dim"), directory / CODEBOOK_FILE,
                "codebook mismatch: its hash/shape differ from the index manifest (corrupt or "
                "replaced codebook; rebuild the index)")
        try:
            index = cls(codebook, **manifest["params"])
        except (TypeError, ValueError, KeyError) as error:
            raise persistence.IndexFormatError(f"{directory}: corrupt parameters ({error})") from error
        doc_ids = arrays.get("image_ids")
        require(doc_ids is not None and doc_ids.dtype == np.int64 and doc_ids.ndim == 1,
                directory, "image_ids missing or not int64 (corrupt)")
        require(np.unique(doc_ids).size == doc_ids.size, directory, "duplicate image ids (corrupt)")
        ranges = manifest.get("segment_ranges", [])
        width = code_width(codebook.dim, index.params.binary)
        code_dtype = np.uint64 if index.params.binary else np.float32
        segments, expected_start = [], 0
        for number, (doc_start, n_docs) in enumerate(ranges):
            prefix = f"segment{number:03d}_"
            parts = {name: arrays.get(prefix + name) for name in
                     ("offsets", "docs", "codes", "fwd_offsets", "fwd_positions")}
            require(all(part is not None for part in parts.values()), directory,
                    f"segment {number} incomplete (corrupt)")
            segment = ivf.Segment(int(doc_start), int(n_docs), **parts)
            n = segment.n_postings
            offsets = segment.offsets
            require(int(doc_start) == expected_start and n_docs > 0
                    and offsets.shape == (codebook.size + 1,) and offsets[0] == 0
                    and offsets[-1] == n and np.all(np.diff(offsets) >= 0)
                    and segment.codes.shape == (n, width) and segment.codes.dtype == code_dtype
                    and segment.docs.dtype == np.uint32
                    and segment.fwd_offsets.shape == (n_docs + 1,)
                    and segment.fwd_positions.shape == (n,)
                    and segment.fwd_offsets[0] == 0 and segment.fwd_offsets[-1] == n
                    and (n == 0 or (int(segment.docs.min()) >= doc_start
                                    and int(segment.docs.max()) < doc_start + n_docs
                                    and int(segment.fwd_positions.max()) < n)),
                    directory, f"segment {number} arrays are inconsistent (shape mismatch, corrupt)")
            segments.append(segment)
            expected_start += int(n_docs)
        require(expected_start == doc_ids.size, directory,
                f"segments cover {expected_start} images, image_ids has {doc_ids.size} (mismatch)")
        persistence.check_counts(directory, manifest, {
            "images": int(doc_ids.size), "vectors": int(sum(s.n_postings for s in segments)),
            "segments": len(segments)})
        index._doc_ids, index._segments = doc_ids, segments
        index._invalidate()
        return index
