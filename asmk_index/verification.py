"""Spatial verification (stage 3): tentative correspondences by visual word and Hamming distance,
then a robust geometric fit (OpenCV's USAC / RANSAC) whose inliers score the image.

Functional API::

    pairs, hamming = tentative_matches(query_words, query_signatures, db_words, db_signatures,
                                       max_hamming=...)            # (k, 2) (query i, db j)
    result = verify(query_xy, db_xy, pairs, model="affine", threshold_px=24.0)
    result.inliers, result.query_xy, result.db_xy, result.model  # count, (m, 2), (m, 2), 3x3

Batched for one query against many images (what :class:`TwoStageIndex` uses)::

    query = QueryFeatures.from_descriptors(descriptors, words, centroids, xy)
    results = verify_images(query, [store.get(i) for i in ids], VerificationConfig())

A tentative correspondence pairs query feature ``i`` and database feature ``j`` when ``j``'s word is
one of ``i``'s words (the query may carry several: multiple assignment) and the Hamming distance
between ``i``'s signature for that word and ``j``'s signature is at most ``max_hamming`` (signatures:
:func:`local_store.binary_signatures`). With ``one_to_one`` each query feature then keeps its
closest database feature (smallest distance, ties by order) and each database feature its
closest remaining query feature, so a burst of similar features counts once.

The model maps query pixels to database pixels; an inlier's reprojection error in the database
image is at most ``threshold_px`` (original image pixels). An image is verified when at least
``min_inliers`` correspondences are inliers; otherwise its result has 0 inliers and no model.

A verified image's ``score`` sums its inliers' weights (``inlier_weighting``): 1 each ("count"),
or the idf ``log(n_images / df_w)`` of the database feature's visual word ("idf") or its square
("squared_idf", the idf of ASMK*), as Philbin et al. (CVPR 2007) score spatially verified images by
the idf of their inlier words. Inliers on words that most images hold (walls, sky, shelf edges)
then count little, those on the rare words of one object much.

Defaults (:class:`VerificationConfig`) were chosen on ukbench-dev only (grocery-dev was not used):
400 real 320x240 photos, untrained MDA heads with a PCA-whitened reduction, scales 1, 0.71, 0.5,
545 features per photo, a 1024-word codebook; benchmarks/verification.py on 1200 true and 1200
unrelated photo pairs, scored by the recall of true pairs at the inlier count that at most 1% of
unrelated pairs reach. MDA features sit at the centres of feature-map cells (16 px at scale 1,
32 px at scale 0.5 in such a photo), so their positions are exact to about a cell: thresholds of
24-32 px separated best (8-12 px lost many true inliers; 24, a cell and a half at scale 1, was
kept over 32, which was 1% better on this set); ``max_hamming`` 40 of 128 bits (48-64 let more
unrelated correspondences through, 32 lost true ones); 1 query word came within 1% of 3 words
with a third of the matching work;
``min_inliers`` 13 is that 1% point; the affine model with OpenCV's RANSAC was the fastest fit and
within 1% recall of the best (USAC_ACCURATE, 2-4x slower); kornia's RANSAC was as good and 100x
slower. For photos downscaled before extraction, scale ``threshold_px`` by the original pixels
per extracted pixel (e.g. ``24 * original_side / max_size``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import cv2
import numpy as np

MODELS = ("affine", "homography")
# robust estimators of OpenCV that estimateAffine2D / findHomography accept, by name
ESTIMATORS = {"magsac": cv2.USAC_MAGSAC, "accurate": cv2.USAC_ACCURATE, "usac": cv2.USAC_DEFAULT,
              "ransac": cv2.RANSAC}
MIN_CORRESPONDENCES = {"affine": 3, "homography": 4}   # points a model needs
# what one inlier adds to a verified image's score: the power of its word's idf (0: 1 each)
IDF_POWER = {"count": 0, "idf": 1, "squared_idf": 2}
INLIER_WEIGHTINGS = tuple(IDF_POWER)
AFFINE_REFINE_ITERATIONS = 10                          # Levenberg-Marquardt steps after RANSAC


@dataclass(frozen=True)
class VerificationConfig:
    """Parameters of stage 3 (defaults chosen on ukbench-dev, see the module docstring).

    max_hamming: largest Hamming distance between two signatures of a correspondence (of D bits).
    query_assignment: how many of the query's nearest words (multiple assignment) propose
        correspondences (at most the number the caller quantized).
    one_to_one: keep each query and each database feature in at most one correspondence.
    model: "affine" (6 dof) or "homography" (8 dof), query pixels -> database pixels.
    threshold_px: reprojection error (database image pixels) of an inlier.
    min_inliers: fewer inliers than this: the image is not verified (0 inliers).
    inlier_weighting: one of ``INLIER_WEIGHTINGS``, what each inlier adds to the image's score
        (see the module docstring; "idf" and "squared_idf" need the index's idf).
    estimator: one of ``ESTIMATORS`` (OpenCV method).
    max_iterations, confidence: the estimator's iteration cap and stopping confidence.
    """

    max_hamming: int = 40
    query_assignment: int = 1
    one_to_one: bool = True
    model: str = "affine"
    threshold_px: float = 24.0
    min_inliers: int = 13
    inlier_weighting: str = "count"
    estimator: str = "ransac"
    max_iterations: int = 1000
    confidence: float = 0.99

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.inlier_weighting not in INLIER_WEIGHTINGS:
            raise ValueError(f"inlier_weighting must be one of {INLIER_WEIGHTINGS}, got "
                             f"{self.inlier_weighting!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {tuple(ESTIMATORS)}, got "
                             f"{self.estimator!r}")
        for name in ("max_hamming",):
            if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        for name in ("query_assignment", "min_inliers", "max_iterations"):
            if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not (np.isfinite(self.threshold_px) and self.threshold_px > 0):
            raise ValueError(f"threshold_px must be a positive number, got {self.threshold_px!r}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must lie in (0, 1), got {self.confidence!r}")


@dataclass(frozen=True)
class VerificationResult:
    """Outcome of verifying one image.

    inliers: number of inlier correspondences (0 when not verified).
    pairs: (inliers, 2) int64 (query feature index, database feature index in the image's stored
        order); query_xy, db_xy: (inliers, 2) float32 their pixel positions in each image.
    model: (3, 3) float64 query -> database transform, or None when not verified.
    tentative: number of tentative correspondences the fit started from.
    score: the inliers' summed weights (``inlier_weighting``; the count unless weighed by
        :func:`weigh_inliers`), 0 when not verified.
    """

    inliers: int
    pairs: np.ndarray
    query_xy: np.ndarray
    db_xy: np.ndarray
    model: np.ndarray | None
    tentative: int = 0
    score: float = 0.0

    @classmethod
    def rejected(cls, tentative: int = 0) -> "VerificationResult":
        empty = np.empty((0, 2), np.float32)
        return cls(0, np.empty((0, 2), np.int64), empty, empty.copy(), None, int(tentative))

    @property
    def verified(self) -> bool:
        return self.inliers > 0


# --------------------------------------------------------------------- correspondences
def hamming_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Hamming distances of packed signatures ``a``, ``b`` (K, B) uint8 -> (K,) int64."""
    differing = np.bitwise_xor(a, b)
    if differing.shape[1] % 8 == 0:            # popcount 64 bits at a time
        differing = np.ascontiguousarray(differing).view(np.uint64)
    bits = np.bitwise_count(differing)
    distances = bits[:, 0].astype(np.int64) if bits.shape[1] else np.zeros(len(bits), np.int64)
    for column in range(1, bits.shape[1]):     # a few columns: faster than sum(axis=1)
        distances += bits[:, column]
    return distances


def _first_by_key(keys: np.ndarray) -> np.ndarray:
    """Positions of the first occurrence of each distinct key (``keys`` already in priority
    order)."""
    _, first = np.unique(keys, return_index=True)
    return np.sort(first)


@dataclass(frozen=True)
class QueryFeatures:
    """One query's local features prepared for matching: its (feature, word) entries sorted by
    word. ``xy`` (n, 2) float32 pixels; ``entry_word`` (E,) int64, ``entry_feature`` (E,) int64,
    ``entry_signature`` (E, B) uint8 with E = n x assignments used."""

    xy: np.ndarray
    entry_word: np.ndarray
    entry_feature: np.ndarray
    entry_signature: np.ndarray

    @classmethod
    def from_words(cls, words, signatures, xy=None) -> "QueryFeatures":
        """``words`` (n, A) or (n,) integer ids, ``signatures`` (n, A, B) or (n, B) uint8 (one
        signature per word: the residual differs per word), ``xy`` (n, 2) or None."""
        words = np.asarray(words)
        signatures = np.asarray(signatures)
        if words.ndim == 1:
            words, signatures = words[:, None], signatures[:, None]
        n, assignments = words.shape
        if signatures.shape[:2] != (n, assignments) or signatures.ndim != 3 \
                or signatures.dtype != np.uint8:
            raise ValueError(f"query signatures: expected ({n}, {assignments}, B) uint8 for words "
                             f"of shape {words.shape}, got {signatures.shape} {signatures.dtype}")
        flat_words = words.reshape(-1).astype(np.int64)
        order = np.argsort(flat_words, kind="stable")
        xy = np.zeros((n, 2), np.float32) if xy is None else np.asarray(xy, np.float32)
        if xy.shape != (n, 2):
            raise ValueError(f"query xy: expected ({n}, 2), got {xy.shape}")
        return cls(xy=xy, entry_word=flat_words[order],
                   entry_feature=(order // assignments).astype(np.int64),
                   entry_signature=np.ascontiguousarray(
                       signatures.reshape(n * assignments, -1)[order]))

    @classmethod
    def from_descriptors(cls, descriptors, words, centroids, xy=None) -> "QueryFeatures":
        """From descriptors (n, D) and their words (n, A): signatures computed here."""
        from .local_store import binary_signatures
        return cls.from_words(words, binary_signatures(descriptors, words, centroids), xy)


def _match_concatenated(query: QueryFeatures, db_words, db_signatures, db_image, max_hamming,
                        one_to_one) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Correspondences of the query with database features of several images concatenated
    (``db_image`` (M,) the image number of each): (query feature (k,), database row (k,),
    Hamming (k,)) sorted by image, then database row."""
    db_words = np.asarray(db_words, np.int64)
    low = np.searchsorted(query.entry_word, db_words, side="left")
    counts = np.searchsorted(query.entry_word, db_words, side="right") - low
    total = int(counts.sum())
    if total == 0:
        empty = np.empty(0, np.int64)
        return empty, empty, empty
    db_row = np.repeat(np.arange(db_words.size), counts)
    first_entry = np.repeat(low - (np.cumsum(counts) - counts), counts)
    entry = first_entry + np.arange(total)
    hamming = hamming_distances(query.entry_signature[entry], db_signatures[db_row])
    keep = hamming <= max_hamming
    db_row, entry, hamming = db_row[keep], entry[keep], hamming[keep]
    query_feature = query.entry_feature[entry]
    if one_to_one and db_row.size:
        n_query = query.xy.shape[0]
        order = np.lexsort((hamming,))                      # closest first, stable
        db_row, query_feature, hamming = db_row[order], query_feature[order], hamming[order]
        pick = _first_by_key(db_image[db_row] * n_query + query_feature)
        db_row, query_feature, hamming = db_row[pick], query_feature[pick], hamming[pick]
        pick = _first_by_key(db_row)
        db_row, query_feature, hamming = db_row[pick], query_feature[pick], hamming[pick]
    order = np.argsort(db_row, kind="stable")
    return query_feature[order], db_row[order], hamming[order]


def tentative_matches(query_words, query_signatures, db_words, db_signatures, max_hamming: int,
                      *, one_to_one: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Correspondences between one query and one database image (see module docstring).

    ``query_words`` (n, A) or (n,), ``query_signatures`` (n, A, B) or (n, B) uint8, ``db_words``
    (m,), ``db_signatures`` (m, B) uint8 -> (pairs (k, 2) int64 (query i, db j), hamming (k,)).
    """
    query = QueryFeatures.from_words(query_words, query_signatures)
    db_words = np.asarray(db_words)
    db_signatures = np.asarray(db_signatures)
    if db_signatures.shape != (db_words.shape[0], query.entry_signature.shape[1]):
        raise ValueError(f"db_signatures: expected ({db_words.shape[0]}, "
                         f"{query.entry_signature.shape[1]}), got {db_signatures.shape}")
    query_feature, db_row, hamming = _match_concatenated(
        query, db_words, db_signatures, np.zeros(db_words.shape[0], np.int64), int(max_hamming),
        one_to_one)
    return np.stack([query_feature, db_row], axis=1), hamming


# --------------------------------------------------------------------- geometry
def verify(query_xy, db_xy, pairs, config: VerificationConfig | None = None,
           **options) -> VerificationResult:
    """Robust fit of ``config.model`` to the correspondences ``pairs`` (k, 2) between
    ``query_xy`` (n, 2) and ``db_xy`` (m, 2) pixel positions; the inliers (reprojection error at
    most ``threshold_px`` in the database image) score the image. Fewer than ``min_inliers``
    (or too few correspondences for the model): a rejected result. ``options`` override fields
    of ``config`` (default :class:`VerificationConfig`), e.g. ``model="homography"``."""
    config = replace(config or VerificationConfig(), **options)
    return _fit(np.asarray(query_xy, np.float32), np.asarray(db_xy, np.float32),
                np.asarray(pairs, np.int64).reshape(-1, 2), config)


def _fit(query_xy: np.ndarray, db_xy: np.ndarray, pairs: np.ndarray,
         config: VerificationConfig) -> VerificationResult:
    tentative = int(pairs.shape[0])
    if tentative < max(config.min_inliers, MIN_CORRESPONDENCES[config.model]):
        return VerificationResult.rejected(tentative)
    source = np.ascontiguousarray(query_xy[pairs[:, 0]], np.float32)
    target = np.ascontiguousarray(db_xy[pairs[:, 1]], np.float32)
    method = ESTIMATORS[config.estimator]
    if config.model == "affine":
        matrix, mask = cv2.estimateAffine2D(
            source, target, method=method, ransacReprojThreshold=config.threshold_px,
            maxIters=config.max_iterations, confidence=config.confidence,
            refineIters=AFFINE_REFINE_ITERATIONS)
        if matrix is not None:
            matrix = np.vstack([matrix, [0.0, 0.0, 1.0]])
    else:
        matrix, mask = cv2.findHomography(source, target, method, config.threshold_px,
                                          maxIters=config.max_iterations,
                                          confidence=config.confidence)
    if matrix is None or mask is None:
        return VerificationResult.rejected(tentative)
    inlier = mask.reshape(-1).astype(bool)
    if int(inlier.sum()) < config.min_inliers:
        return VerificationResult.rejected(tentative)
    chosen = pairs[inlier]
    return VerificationResult(int(inlier.sum()), chosen, source[inlier], target[inlier],
                              np.asarray(matrix, np.float64), tentative, float(inlier.sum()))


# --------------------------------------------------------------------- scores
def inlier_word_weights(idf: np.ndarray | None, weighting: str) -> np.ndarray | None:
    """What an inlier on each visual word adds to a score under ``weighting`` (one of
    ``INLIER_WEIGHTINGS``): None for "count" (1 each), else ``idf`` (K,) (the index's
    ``log(n_images / df_w)``, e.g. ``AsmkIndex.inverse_document_frequency()``) to the power."""
    if weighting not in IDF_POWER:
        raise ValueError(f"inlier_weighting must be one of {INLIER_WEIGHTINGS}, got {weighting!r}")
    if IDF_POWER[weighting] == 0:
        return None
    if idf is None:
        raise ValueError(f"inlier_weighting {weighting!r} needs the index's idf of every word")
    return np.asarray(idf, np.float64) ** IDF_POWER[weighting]


def weigh_inliers(result: VerificationResult, image_words: np.ndarray,
                  word_weights: np.ndarray | None) -> VerificationResult:
    """``result`` with ``score`` = the summed ``word_weights`` (K,) of its inliers' database words
    (``image_words`` (m,): the word of each of the image's stored features); ``word_weights``
    None: the inlier count."""
    if word_weights is None or not result.verified:
        return replace(result, score=float(result.inliers))
    words = np.asarray(image_words)[result.pairs[:, 1]]
    return replace(result, score=float(word_weights[words].sum()))


def verify_images(query: QueryFeatures, images, config: VerificationConfig | None = None,
                  idf: np.ndarray | None = None) -> list[VerificationResult]:
    """Verify one prepared query against several images' stored features
    (:class:`local_store.ImageFeatures`, e.g. ``store.get(id)``): one result per image, in order,
    scored by ``config.inlier_weighting`` (``idf`` (K,): the index's, see
    :func:`inlier_word_weights`). Matching runs once over all images' features; the fit runs per
    image."""
    config = config or VerificationConfig()
    word_weights = inlier_word_weights(idf, config.inlier_weighting)
    images = list(images)
    if not images:
        return []
    sizes = np.array([len(image) for image in images], np.int64)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    db_image = np.repeat(np.arange(len(images)), sizes)
    query_feature, db_row, _ = _match_concatenated(
        query, np.concatenate([image.words for image in images]),
        np.concatenate([image.signatures for image in images]), db_image, config.max_hamming,
        config.one_to_one)
    cuts = np.searchsorted(db_row, bounds)
    results = []
    for number, image in enumerate(images):
        part = slice(cuts[number], cuts[number + 1])
        pairs = np.stack([query_feature[part], db_row[part] - bounds[number]], axis=1)
        result = _fit(query.xy, np.asarray(image.xy), pairs, config)
        results.append(result if word_weights is None else weigh_inliers(result, image.words, word_weights))
    return results


__all__ = ["ESTIMATORS", "INLIER_WEIGHTINGS", "MODELS", "QueryFeatures", "VerificationConfig",
           "VerificationResult", "hamming_distances", "inlier_word_weights", "tentative_matches",
           "verify", "verify_images", "weigh_inliers"]
