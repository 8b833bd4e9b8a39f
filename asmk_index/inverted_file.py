"""Log-structured inverted file of aggregated ASMK* vectors.

The file is a short list of segments (at most ~log2 of the number of postings: an add() appends a
segment and adjacent segments of similar size are merged, an O(n) interleave). Each segment covers a
contiguous range of internal document indices and holds:

- word-major postings (CSR): ``offsets`` (K+1,) int64, ``docs`` (n,) uint32 (global document index),
  ``codes`` (n, W) uint64 packed bits or (n, D) float32;
- a doc-major forward index: ``fwd_offsets`` (n_docs + 1,) int64 and ``fwd_positions`` (n,) uint32,
  the posting positions of each document in ascending order (= ascending word), so that a
  shortlist is scored without scanning whole posting lists.

Bytes per aggregated 128-d binary vector: 16 (code) + 4 (doc) + 4 (forward position).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _kernels

POSITION_LIMIT = np.iinfo(np.uint32).max
MERGE_RATIO = 2  # merge the last two segments while the older one is at most this times larger


def _counts_to_offsets(counts: np.ndarray) -> np.ndarray:
    offsets = np.zeros(counts.size + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets


def _row_bytes(array: np.ndarray) -> np.ndarray:
    """(n, bytes per row) uint8 view of a C-contiguous (n, ...) array."""
    array = np.ascontiguousarray(array)
    return array.reshape(array.shape[0], -1).view(np.uint8)


def _forward_index(docs: np.ndarray, doc_start: int, n_docs: int) -> tuple[np.ndarray, np.ndarray]:
    """Posting positions grouped by document (ascending inside each), and per-doc offsets."""
    local = docs.astype(np.int64) - doc_start
    order = _kernels.stable_argsort_by(local, n_docs, np.arange(docs.size, dtype=np.int64))
    return (_counts_to_offsets(np.bincount(local, minlength=n_docs)),
            order.astype(np.uint32))


@dataclass
class Segment:
    """Postings of documents ``doc_start .. doc_start + n_docs - 1`` (see module docstring)."""

    doc_start: int
    n_docs: int
    offsets: np.ndarray
    docs: np.ndarray
    codes: np.ndarray
    fwd_offsets: np.ndarray
    fwd_positions: np.ndarray

    @property
    def n_postings(self) -> int:
        return int(self.docs.shape[0])

    @property
    def size(self) -> int:
        return int(self.offsets.shape[0] - 1)

    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in (self.offsets, self.docs, self.codes, self.fwd_offsets,
                                           self.fwd_positions))

    def posting_words(self) -> np.ndarray:
        """(n,) int64 word of every posting."""
        return np.repeat(np.arange(self.size, dtype=np.int64), np.diff(self.offsets))

    @classmethod
    def from_postings(cls, words: np.ndarray, docs: np.ndarray, codes: np.ndarray, *,
                      doc_start: int, n_docs: int, size: int) -> "Segment":
        """Build from postings in any order; within a word, postings keep their given order."""
        if words.size > POSITION_LIMIT:
            raise ValueError(f"{words.size} aggregated vectors in one segment exceed the uint32 "
                             "position limit; add them in several calls")
        words = np.asarray(words, dtype=np.int64)
        order = _kernels.stable_argsort_by(words, size, np.arange(words.size, dtype=np.int64))
        docs = np.ascontiguousarray(docs[order], dtype=np.uint32)
        codes = np.ascontiguousarray(codes[order])
        fwd_offsets, fwd_positions = _forward_index(docs, doc_start, n_docs)
        return cls(int(doc_start), int(n_docs), _counts_to_offsets(np.bincount(words, minlength=size)),
                   docs, codes, fwd_offsets, fwd_positions)

    @classmethod
    def from_doc_major(cls, words: np.ndarray, local_docs: np.ndarray, codes: np.ndarray, *,
                       doc_start: int, n_docs: int, size: int) -> "Segment":
        """Build from postings sorted by (document, word), as :func:`kernel.aggregate_runs` gives
        them: ``local_docs`` (n,) int64 in [0, n_docs) non-decreasing, words ascending within a
        document. Same segment as :meth:`from_postings`, with one counting sort instead of two:
        a document's postings land at ascending word-major positions, which are its forward index.
        """
        if words.size > POSITION_LIMIT:
            raise ValueError(f"{words.size} aggregated vectors in one segment exceed the uint32 "
                             "position limit; add them in several calls")
        offsets, position = _kernels.word_major_positions(
            np.ascontiguousarray(words, dtype=np.int64), size)
        docs = np.empty(words.size, dtype=np.uint32)
        _kernels.scatter_rows(_row_bytes((local_docs + doc_start).astype(np.uint32)), position,
                              _row_bytes(docs))
        ordered_codes = np.empty_like(codes)
        _kernels.scatter_rows(_row_bytes(codes), position, _row_bytes(ordered_codes))
        fwd_offsets = _counts_to_offsets(np.bincount(local_docs, minlength=n_docs))
        return cls(int(doc_start), int(n_docs), offsets, docs, ordered_codes, fwd_offsets,
                   position.astype(np.uint32))

    def merged_with(self, later: "Segment") -> "Segment":
        """One segment holding self's postings then ``later``'s (which must follow it in docs)."""
        assert self.doc_start + self.n_docs == later.doc_start
        n_total = self.n_postings + later.n_postings
        if n_total > POSITION_LIMIT:
            raise ValueError("merged segment would exceed the uint32 position limit")
        # within a word: self's postings first, then later's (keeps docs ascending): a compiled
        # per-word memcpy of the doc ids, then of the codes (same positions both times)
        new_position_self = np.empty(self.n_postings, dtype=np.int64)
        new_position_later = np.empty(later.n_postings, dtype=np.int64)
        docs = np.empty(n_total, dtype=np.uint32)
        codes = np.empty((n_total,) + self.codes.shape[1:], dtype=self.codes.dtype)
        for mine, theirs, out in ((self.docs, later.docs, docs), (self.codes, later.codes, codes)):
            _kernels.merge_postings(self.offsets, _row_bytes(mine), later.offsets,
                                    _row_bytes(theirs), _row_bytes(out), new_position_self,
                                    new_position_later)
        fwd_positions = np.empty(n_total, dtype=np.uint32)
        _kernels.gather_positions(new_position_self, self.fwd_positions,
                                  fwd_positions[:self.n_postings])
        _kernels.gather_positions(new_position_later, later.fwd_positions,
                                  fwd_positions[self.n_postings:])
        fwd_offsets = np.concatenate([self.fwd_offsets[:-1], later.fwd_offsets + self.n_postings])
        return Segment(self.doc_start, self.n_docs + later.n_docs, self.offsets + later.offsets,
                       docs, codes, fwd_offsets, fwd_positions)

    def without_docs(self, keep_doc: np.ndarray, new_index: np.ndarray) -> "Segment | None":
        """Copy without the postings of removed documents, renumbered by ``new_index``."""
        doc_range = slice(self.doc_start, self.doc_start + self.n_docs)
        n_kept_docs = int(np.count_nonzero(keep_doc[doc_range]))
        if n_kept_docs == 0:
            return None
        keep = keep_doc[self.docs]
        new_start = int(new_index[doc_range][keep_doc[doc_range]][0])
        return Segment.from_postings(self.posting_words()[keep], new_index[self.docs[keep]],
                                     self.codes[keep], doc_start=new_start, n_docs=n_kept_docs,
                                     size=self.size)

    def arrays(self) -> dict:
        return {"offsets": self.offsets, "docs": self.docs, "codes": self.codes,
                "fwd_offsets": self.fwd_offsets, "fwd_positions": self.fwd_positions}


def append_segment(segments: list, segment: Segment) -> list:
    """New segment list with ``segment`` appended and similar-sized tail segments merged."""
    result = list(segments) + [segment]
    while len(result) >= 2 and result[-2].n_postings <= MERGE_RATIO * result[-1].n_postings:
        later = result.pop()
        result[-1] = result[-1].merged_with(later)
    return result


def remove_docs(segments: list, keep_doc: np.ndarray) -> list:
    """New segment list without the documents where ``keep_doc`` is False (renumbered densely)."""
    new_index = np.cumsum(keep_doc, dtype=np.int64) - 1
    result = []
    for segment in segments:
        doc_range = slice(segment.doc_start, segment.doc_start + segment.n_docs)
        if keep_doc[doc_range].all():
            shift = segment.doc_start - int(new_index[segment.doc_start])
            if shift:
                segment = Segment(segment.doc_start - shift, segment.n_docs, segment.offsets,
                                  (segment.docs - np.uint32(shift)).astype(np.uint32),
                                  segment.codes, segment.fwd_offsets, segment.fwd_positions)
            result.append(segment)
            continue
        reduced = segment.without_docs(keep_doc, new_index)
        if reduced is not None:
            result.append(reduced)
    return result


def document_frequencies(segments: list, size: int) -> np.ndarray:
    """(K,) int64 number of documents having each word."""
    df = np.zeros(size, dtype=np.int64)
    for segment in segments:
        df += np.diff(segment.offsets)
    return df


def vectors_per_document(segments: list, n_docs: int) -> np.ndarray:
    """(n_docs,) int64 number of aggregated vectors of every document."""
    counts = np.zeros(n_docs, dtype=np.int64)
    for segment in segments:
        counts[segment.doc_start:segment.doc_start + segment.n_docs] = np.diff(segment.fwd_offsets)
    return counts


def weight_sum_per_document(segments: list, n_docs: int, word_weight: np.ndarray) -> np.ndarray:
    """(n_docs,) float64 sum of ``word_weight`` over every document's words."""
    total = np.zeros(n_docs, dtype=np.float64)
    for segment in segments:
        total += np.bincount(segment.docs, weights=word_weight[segment.posting_words()],
                             minlength=n_docs)
    return total
