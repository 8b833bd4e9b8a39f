"""Fusion of the stages' scores over one query's shortlist, independent of the scores' scales.

The global similarity (stage 1), the ASMK* score (stage 2) and the inlier count of spatial
verification (stage 3) live on unrelated scales (ASMK* scores of true matches can be 100x smaller
than cosine similarities), so a raw weighted sum lets one stage decide alone. Each rule first maps
every stage's scores over the shortlist onto a common scale, then sums them with weights:

- ``"minmax"``: ``(s - min) / (max - min)`` over the shortlist (0 for all when max == min): every
  stage spans [0, 1]; invariant to ``a * s + b`` (a > 0) applied to a stage.
- ``"zscore"``: ``(s - mean) / std`` over the shortlist (0 for all when std == 0); invariant to
  ``a * s + b`` (a > 0).
- ``"rrf"`` (reciprocal rank fusion, Cormack et al. 2009): ``1 / (rrf_k + rank)`` with ``rank`` = 1 +
  the number of shortlisted images with a strictly higher score (ties share a rank); invariant to
  any strictly increasing map of a stage's scores.
- ``"adaptive"`` (query-adaptive late fusion, after Zheng et al., CVPR 2015): min-max as above, and
  each stage's weight divided by the mean of its normalised scores over the shortlist (the area
  under its sorted score curve). On each query, a stage that singles out a few images (an
  L-shaped curve) counts more than one that scores the whole shortlist alike, so the weights
  follow the query instead of one collection.

``fused = sum_s weight_s * normalised_s``; the shortlist is ranked by it (ties keep the order the
images came in). With every weight positive, each stage can move a result: raising one image's
score in one stage (others fixed) never lowers its fused value and can raise it past another's.
A stage with weight 0 is ignored. The weights are config values, to be chosen on development data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

RULES = ("minmax", "zscore", "rrf", "adaptive")
DEFAULT_RRF_K = 60.0            # the constant of Cormack et al.'s reciprocal rank fusion


def normalize(scores, rule: str, *, rrf_k: float = DEFAULT_RRF_K) -> np.ndarray:
    """One stage's scores (n,) over a shortlist -> (n,) float64 on the rule's common scale."""
    if rule not in RULES:
        raise ValueError(f"fusion rule must be one of {RULES}, got {rule!r}")
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 1:
        raise ValueError(f"scores: expected a 1-D array, got shape {scores.shape}")
    if scores.size and not np.isfinite(scores).all():
        raise ValueError("scores: NaN or infinite values cannot be fused")
    if scores.size == 0:
        return scores.copy()
    if rule in ("minmax", "adaptive"):
        low, span = scores.min(), scores.max() - scores.min()
        return (scores - low) / span if span > 0 else np.zeros_like(scores)
    if rule == "zscore":
        std = scores.std()
        return (scores - scores.mean()) / std if std > 0 else np.zeros_like(scores)
    # rrf: rank = 1 + number of strictly greater scores (ties share the best rank)
    ascending = np.sort(scores)
    greater = scores.size - np.searchsorted(ascending, scores, side="right")
    return 1.0 / (rrf_k + 1.0 + greater)


def fuse(stage_scores: Sequence[np.ndarray], weights: Sequence[float], rule: str = "minmax", *,
         rrf_k: float = DEFAULT_RRF_K) -> np.ndarray:
    """Fused scores (n,) float64: ``sum_s weights[s] * normalize(stage_scores[s], rule)``.

    ``stage_scores``: one (n,) array per stage, all over the same n shortlisted images.
    """
    stage_scores = list(stage_scores)
    weights = [float(w) for w in weights]
    if len(weights) != len(stage_scores):
        raise ValueError(f"{len(stage_scores)} stages but {len(weights)} weights")
    if any(not np.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"weights must be finite and >= 0, got {weights}")
    if not np.isfinite(rrf_k) or rrf_k < 0:
        raise ValueError(f"rrf_k must be a finite number >= 0, got {rrf_k!r}")
    lengths = {np.shape(scores) for scores in stage_scores}
    if len(lengths) > 1:
        raise ValueError(f"every stage must score the same images, got shapes {sorted(lengths)}")
    fused = np.zeros(np.shape(stage_scores[0]) if stage_scores else (0,), np.float64)
    for scores, weight in zip(stage_scores, weights):
        if weight:
            normalised = normalize(scores, rule, rrf_k=rrf_k)
            if rule == "adaptive":
                area = normalised.mean() if normalised.size else 0.0
                if area == 0:              # every score alike: the stage cannot rank this query
                    continue
                weight = weight / area
            fused += weight * normalised
    return fused


@dataclass(frozen=True)
class Fusion:
    """A fusion rule and the weight of each stage (see module docstring).

    ``global_weight``, ``asmk_weight``, ``inlier_weight``: weights of the global similarity, the
    ASMK* score and the spatial-verification inlier count (used when stage 3 ran).
    """

    rule: str = "minmax"
    global_weight: float = 1.0
    asmk_weight: float = 1.0
    inlier_weight: float = 1.0
    rrf_k: float = DEFAULT_RRF_K

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"fusion rule must be one of {RULES}, got {self.rule!r}")
        for name in ("global_weight", "asmk_weight", "inlier_weight", "rrf_k"):
            value = float(getattr(self, name))
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")

    def __call__(self, global_scores, asmk_scores, inliers=None) -> np.ndarray:
        """Fused scores (n,) of a shortlist; ``inliers`` (n,) (None: stage 3 did not run)."""
        stages, weights = [global_scores, asmk_scores], [self.global_weight, self.asmk_weight]
        if inliers is not None:
            stages.append(inliers)
            weights.append(self.inlier_weight)
        return fuse(stages, weights, self.rule, rrf_k=self.rrf_k)


__all__ = ["DEFAULT_RRF_K", "Fusion", "RULES", "fuse", "normalize"]
