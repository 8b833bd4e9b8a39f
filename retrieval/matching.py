"""Which local features of two images matched under ASMK* (for display: lines in the HTML page).

Two features match when they are quantized to the same visual word (query side: multiple
assignment, as in search) and that word's binarized aggregated residuals of the two images are
selective: sigma(u) = u^alpha > 0 with u = 1 - 2 * hamming / bits >= tau (the same kernel,
``asmk_index.kernel``, that scores the images). Within a selective word
every query feature is paired with the result features of the word; the pairs with the highest
descriptor similarity are kept.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from asmk_index.kernel import aggregate, binary_selectivity_table
from mda.extract import LocalFeatures

from .config import AsmkConfig


@dataclass
class FeatureMatches:
    """Matched pairs, strongest word first: indices into the two images' features (m,) int64,
    their visual word (m,), the word's selectivity sigma(u) (m,) and the descriptors' dot (m,)."""
    query_index: np.ndarray
    result_index: np.ndarray
    word: np.ndarray
    selectivity: np.ndarray
    similarity: np.ndarray

    def __len__(self) -> int:
        return int(self.query_index.shape[0])

    def points(self, query: LocalFeatures, result: LocalFeatures) -> np.ndarray:
        """(m, 4) float32 (query x, query y, result x, result y)."""
        return np.stack([query.x[self.query_index], query.y[self.query_index],
                         result.x[self.result_index], result.y[self.result_index]],
                        axis=1).astype(np.float32).reshape(-1, 4)


def match_local_features(query: LocalFeatures, result: LocalFeatures, codebook, *,
                         asmk: AsmkConfig | None = None, pairs_per_word: int = 2,
                         max_matches: int = 150) -> FeatureMatches:
    """Feature pairs of ``query`` and ``result`` that ASMK* counts as matching (see module doc)."""
    asmk = asmk or AsmkConfig()
    empty = np.zeros(0, np.int64)
    if len(query.descriptors) == 0 or len(result.descriptors) == 0:
        return FeatureMatches(empty, empty, empty, np.zeros(0), np.zeros(0))
    centroids = np.asarray(codebook.centroids, np.float32)
    assignment = min(int(asmk.query_multiple_assignment), codebook.size)
    query_words = codebook.quantize(query.descriptors, assignment)
    result_words = codebook.quantize(result.descriptors, min(int(asmk.multiple_assignment),
                                                             codebook.size))
    zeros_q = np.zeros(len(query.descriptors), np.int64)
    zeros_r = np.zeros(len(result.descriptors), np.int64)
    query_vectors = aggregate(query.descriptors, query_words, zeros_q, 1, centroids, binary=True)
    result_vectors = aggregate(result.descriptors, result_words, zeros_r, 1, centroids, binary=True)
    words, query_rows, result_rows = np.intersect1d(query_vectors.word, result_vectors.word,
                                                    return_indices=True)
    differing = query_vectors.vectors[query_rows] ^ result_vectors.vectors[result_rows]
    hamming = np.unpackbits(differing.view(np.uint8), axis=1).sum(axis=1)
    table = binary_selectivity_table(codebook.dim, asmk.alpha, asmk.similarity_threshold)
    selectivities = table[hamming]
    pairs = []
    for word, selectivity in zip(words.tolist(), selectivities.tolist()):
        if selectivity <= 0:
            continue
        query_members = np.flatnonzero((query_words == word).any(axis=1))
        result_members = np.flatnonzero((result_words == word).any(axis=1))
        similarity = query.descriptors[query_members] @ result.descriptors[result_members].T
        best = np.argsort(-similarity, axis=None)[:pairs_per_word]
        for flat in best:
            i, j = np.unravel_index(flat, similarity.shape)
            pairs.append((selectivity, float(similarity[i, j]), int(query_members[i]),
                          int(result_members[j]), word))
    pairs.sort(key=lambda pair: (-pair[0], -pair[1]))
    pairs = pairs[:max_matches]
    if not pairs:
        return FeatureMatches(empty, empty, empty, np.zeros(0), np.zeros(0))
    selectivity, similarity, query_index, result_index, word = (np.asarray(v) for v in zip(*pairs))
    return FeatureMatches(query_index.astype(np.int64), result_index.astype(np.int64),
                          word.astype(np.int64), selectivity.astype(np.float64),
                          similarity.astype(np.float64))


__all__ = ["FeatureMatches", "match_local_features"]
