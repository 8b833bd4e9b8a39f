"""ASMK* kernel: residual aggregation per (image, word) and the selectivity function.

Matches the ``asmk`` package (0.1.1): for every image and every unique word among its descriptors'
assignments, the residuals ``x - c_word`` of the descriptors assigned to that word are summed as
float32 in input order; binary vectors keep the sign bits (``sum > 0``), real ones are
``v / (|v| + 1e-6)``. Similarity of two binary vectors is ``u = 1 - 2 * hamming / bits`` and the
selectivity is ``sigma(u) = u ** alpha if u >= similarity_threshold else 0``.

Choice documented here: ``bits`` is the descriptor dimensionality D. The reference divides by its
packed width (a multiple of 32), which differs from D only when ``D % 32 != 0``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _kernels
from .validation import raise_non_finite


@dataclass(frozen=True)
class KernelParams:
    """Parameters of the ASMK* kernel."""

    binary: bool = True
    alpha: float = 3.0
    similarity_threshold: float = 0.0

    def __post_init__(self):
        if not np.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"alpha must be a positive finite number, got {self.alpha}")
        if not np.isfinite(self.similarity_threshold) or not -1.0 <= self.similarity_threshold <= 1.0:
            raise ValueError("similarity_threshold must lie in [-1, 1], got "
                             f"{self.similarity_threshold}")
        if self.similarity_threshold < 0 and float(self.alpha) != int(self.alpha):
            raise ValueError("a negative similarity_threshold needs an integer alpha (a negative "
                             f"similarity to the power {self.alpha} is undefined)")


@dataclass
class Aggregated:
    """Aggregated vectors sorted by (image, word).

    image: (G,) int64 image index (0..n_images-1, as given to :func:`aggregate`);
    word: (G,) int64 word id; vectors: (G, ceil(D/64)) uint64 packed bits or (G, D) float32.
    """

    image: np.ndarray
    word: np.ndarray
    vectors: np.ndarray


def code_width(dim: int, binary: bool) -> int:
    """Columns of one stored aggregated vector: uint64 words when binary, else D floats."""
    return (dim + 63) // 64 if binary else dim


def aggregate(descriptors: np.ndarray, words: np.ndarray, image_index: np.ndarray, n_images: int,
              centroids: np.ndarray, binary: bool) -> Aggregated:
    """Aggregate descriptors (N, D) float32 with assignments ``words`` (N, ma) int64 per image.

    ``image_index`` (N,) int64 in [0, n_images), in any order. The descriptors are grouped by
    image (a stable counting sort, skipped when already grouped) and handed to
    :func:`aggregate_runs`.
    """
    image_index = np.ascontiguousarray(image_index, dtype=np.int64)
    counts = np.bincount(image_index, minlength=int(n_images)) if image_index.size else \
        np.zeros(int(n_images), dtype=np.int64)
    image_starts = np.zeros(int(n_images) + 1, dtype=np.int64)
    np.cumsum(counts, out=image_starts[1:])
    order = None
    if image_index.size > 1 and np.any(image_index[1:] < image_index[:-1]):
        order = _kernels.stable_argsort_by(image_index, int(n_images),
                                           np.arange(image_index.size, dtype=np.int64))
    return aggregate_runs(descriptors, words, image_starts, centroids, binary,
                          descriptor_order=order)


def aggregate_runs(descriptors: np.ndarray, words: np.ndarray, image_starts: np.ndarray,
                   centroids: np.ndarray, binary: bool, *, descriptor_order=None,
                   check_finite: bool = False, name: str = "descriptors") -> Aggregated:
    """Aggregate images given as runs: image ``i`` owns descriptors
    ``descriptor_order[image_starts[i]:image_starts[i+1]]`` (``None``: rows ``image_starts[i]``
    onwards, i.e. each image contiguous). ``image_starts`` (n_images + 1,) int64.

    One compiled pass sorts each image's (descriptor, word) pairs by word (stable, so a group
    sums in input order), a second sums the residuals. With ``check_finite`` a descriptor row
    holding NaN or inf raises :func:`validation.check_descriptors`' ValueError (naming the first
    bad row); the check rides along the residual pass, so it costs no extra pass over the data.
    """
    size = centroids.shape[0]
    words = np.ascontiguousarray(words, dtype=np.int64)
    image_starts = np.ascontiguousarray(image_starts, dtype=np.int64)
    if descriptor_order is not None:
        descriptor_order = np.ascontiguousarray(descriptor_order, dtype=np.int64)
    pair_descriptor, pair_word, group_starts, group_image = _kernels.group_pairs(
        words, image_starts, size, descriptor_order)
    vectors, all_finite = _kernels.aggregate_residuals(
        descriptors, centroids, pair_descriptor, pair_word, group_starts, bool(binary),
        report_finite=True)
    if check_finite and not all_finite:
        raise_non_finite(descriptors, name)
    return Aggregated(group_image, pair_word[group_starts], vectors)


def binary_selectivity_table(bits: int, alpha: float, similarity_threshold: float) -> np.ndarray:
    """(bits + 1,) float64: sigma(u) for every Hamming distance h, u = 1 - 2 h / bits.

    Computed with the reference's float32 arithmetic so the values are the same.
    """
    hamming = np.arange(bits + 1, dtype=np.float32)
    similarity = np.float32(-2) * (hamming / np.float32(bits)) + np.float32(1)
    table = np.zeros(bits + 1, dtype=np.float64)
    keep = similarity >= similarity_threshold
    table[keep] = np.power(similarity[keep], np.float32(alpha)).astype(np.float64)
    return table
