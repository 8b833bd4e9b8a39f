"""Pure tensor functions of MDA (no parameters): attention, pooling, losses, top-n selection.

Shapes: B batch, N heads, C channels (C_g per group), H x W feature map, D descriptor size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

_EPS = 1e-12


def _check(tensor: torch.Tensor, ndim: int, name: str, shape_doc: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor {shape_doc}, got {type(tensor).__name__}")
    if tensor.ndim != ndim:
        raise ValueError(f"{name}: expected shape {shape_doc}, got {tuple(tensor.shape)}")


def activate(x: torch.Tensor, activation: str) -> torch.Tensor:
    """Non-negative activation of an attention map: ``relu`` | ``softplus`` | ``abs`` | ``square``."""
    if activation == "relu":
        return F.relu(x)
    if activation == "softplus":
        return F.softplus(x)
    if activation == "abs":
        return x.abs()
    if activation == "square":
        return x * x
    raise ValueError(f"unknown attention activation {activation!r}")


def dynamic_attention(groups: torch.Tensor, indicator: torch.Tensor, activation: str = "relu") -> torch.Tensor:
    """Attention maps of N heads: ``A^i = act(sum_c g_i[c] * F^i[c])``.

    groups: (B, N, C_g, H, W) the channel groups F^i; indicator: (B, N, C_g) the vectors g_i.
    Returns (B, N, H, W), non-negative.
    """
    _check(groups, 5, "groups", "(B, N, C_g, H, W)")
    _check(indicator, 3, "indicator", "(B, N, C_g)")
    if indicator.shape != groups.shape[:3]:
        raise ValueError(f"indicator shape {tuple(indicator.shape)} does not match groups "
                         f"(B, N, C_g) = {tuple(groups.shape[:3])}")
    return activate(torch.einsum("bnchw,bnc->bnhw", groups, indicator), activation)


def attention_pool(attention: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """Per-head global descriptors ``G^i = l2n(sum_hw A^i_hw L_hw)``.

    attention: (B, N, H, W); local: (B, D, H, W). Returns (B, N, D), L2-normalised over D.
    """
    _check(attention, 4, "attention", "(B, N, H, W)")
    _check(local, 4, "local", "(B, D, H, W)")
    if attention.shape[0] != local.shape[0] or attention.shape[2:] != local.shape[2:]:
        raise ValueError(f"attention {tuple(attention.shape)} and local {tuple(local.shape)} "
                         "must share batch and spatial size")
    pooled = torch.einsum("bnhw,bdhw->bnd", attention, local)
    return F.normalize(pooled, p=2, dim=-1, eps=_EPS)


def hellinger_distance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Hellinger distance of discrete distributions over the last axis.

    ``H(p, q) = sqrt(1 - <sqrt p, sqrt q>)`` (= ||sqrt p - sqrt q||_2 / sqrt 2), in [0, 1]:
    0 for equal distributions, 1 for disjoint supports. p, q: (..., K), each summing to 1.
    Returns (...). Computed as ``sqrt(sum (sqrt p - sqrt q)^2 / 2)`` (the same value for
    distributions, more precise near 0); probabilities and the root's argument are clamped at
    1e-12 so gradients stay finite (softmax outputs can underflow to 0).
    """
    if p.shape != q.shape:
        raise ValueError(f"hellinger_distance: shapes differ: {tuple(p.shape)} vs {tuple(q.shape)}")
    difference = p.clamp_min(_EPS).sqrt() - q.clamp_min(_EPS).sqrt()
    return (0.5 * difference.pow(2).sum(-1)).clamp_min(_EPS).sqrt()


def diversity_penalty(attention_maps: torch.Tensor) -> torch.Tensor:
    """MDA diversity regulariser: mean over head pairs i < j (and the batch) of ``1 - H(a_i, a_j)``,
    with ``a_i = softmax(vec(A^i))``.

    attention_maps: (B, N, H, W) or (N, H, W). Returns a scalar in [0, 1]; 0 for a single head.
    """
    if attention_maps.ndim == 3:
        attention_maps = attention_maps.unsqueeze(0)
    _check(attention_maps, 4, "attention_maps", "(B, N, H, W)")
    num_heads = attention_maps.shape[1]
    if num_heads < 2:
        return attention_maps.sum() * 0.0
    dists = torch.softmax(attention_maps.flatten(2), dim=-1)                 # (B, N, HW)
    first, second = torch.triu_indices(num_heads, num_heads, offset=1, device=dists.device)
    return (1.0 - hellinger_distance(dists[:, first], dists[:, second])).mean()


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, label: torch.Tensor, margin: float,
                     reduction: str = "sum") -> torch.Tensor:
    """Contrastive loss (cirtorch style) on pairs of L2-normalised descriptors.

    ``0.5 d^2`` for matching pairs (label 1), ``0.5 max(0, margin - d)^2`` for non-matching pairs
    (label 0), d = ||a - b||. a, b: (P, D) or (P, N, D) (one loss per head, summed over heads);
    label: (P,) in {0, 1}. reduction: ``sum`` (cirtorch) or ``mean`` over pairs.
    """
    if a.shape != b.shape or a.ndim not in (2, 3):
        raise ValueError(f"contrastive_loss: a and b must both be (P, D) or (P, N, D), "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")
    if label.ndim != 1 or label.shape[0] != a.shape[0]:
        raise ValueError(f"contrastive_loss: label must be (P,) = ({a.shape[0]},), got {tuple(label.shape)}")
    label = label.to(a.dtype)
    if a.ndim == 3:
        label = label.unsqueeze(1)
    distance = (a - b).pow(2).sum(-1).clamp_min(_EPS).sqrt()
    loss = 0.5 * label * distance.pow(2) + 0.5 * (1 - label) * (margin - distance).clamp_min(0).pow(2)
    if a.ndim == 3:
        loss = loss.sum(1)
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    raise ValueError(f"contrastive_loss: reduction must be 'sum' or 'mean', got {reduction!r}")


def head_descriptor_loss(anchors: torch.Tensor, positives: torch.Tensor, labels: torch.Tensor,
                         margin: float) -> torch.Tensor:
    """MDA's training loss on pairs of per-head descriptors: the contrastive loss of every head
    (summed over heads, mean over pairs) of each (anchor, positive) pair (label 1) and of each
    anchor with its hardest in-batch negative (label 0: the most similar descriptor of another
    class, similarity = mean over heads of the dot products).

    anchors, positives: (P, N, D) L2-normalised per head; labels: (P,) the class of each pair.
    """
    from imagedata.datasets import hardest_negatives

    _check(anchors, 3, "anchors", "(P, N, D)")
    if positives.shape != anchors.shape or labels.shape != anchors.shape[:1]:
        raise ValueError(f"head_descriptor_loss: anchors {tuple(anchors.shape)}, positives "
                         f"{tuple(positives.shape)} and labels {tuple(labels.shape)} do not match")
    count, heads, dim = anchors.shape
    pool = torch.cat([anchors, positives])                                            # (2P, N, D)
    negatives = hardest_negatives(pool.reshape(2 * count, heads * dim) / heads ** 0.5,
                                  torch.cat([labels, labels]))[:count]
    if (negatives < 0).any():
        raise ValueError("a batch needs pairs of at least two classes (no in-batch negative)")
    pair_labels = torch.cat([torch.ones(count), torch.zeros(count)]).to(anchors.device)
    return contrastive_loss(torch.cat([anchors, anchors]), torch.cat([positives, pool[negatives]]),
                            pair_labels, margin, reduction="mean")


@dataclass
class Selection:
    """The locations kept by :func:`select_top_locations` (all (n,) tensors, best first)."""

    score: torch.Tensor    # float: the attention value that ranked it
    scale_index: torch.Tensor  # int64: index into the list of per-scale maps
    head: torch.Tensor     # int64
    y: torch.Tensor        # int64 row in that scale's feature map
    x: torch.Tensor        # int64 column


MARGIN_SIDE_FRACTION = 4     # a border margin takes at most 1/4 of a map side's cells


def interior_mask(height: int, width: int, border_cells: int, device=None) -> torch.Tensor:
    """(H, W) bool: the cells at least ``border_cells`` cells from every edge of an H x W map. On
    a small map the margin shrinks to at most a quarter of the side's cells (rounded down, of
    side - 1), so at least about half of every side stays."""
    margin_y = min(border_cells, (height - 1) // MARGIN_SIDE_FRACTION)
    margin_x = min(border_cells, (width - 1) // MARGIN_SIDE_FRACTION)
    mask = torch.zeros(height, width, dtype=torch.bool, device=device)
    mask[margin_y:height - margin_y, margin_x:width - margin_x] = True
    return mask


def select_top_locations(attention: Sequence[torch.Tensor], n: int, *, unique_locations: bool = True,
                         border_cells: int = 0) -> Selection:
    """Top-n (head, location) pairs over every scale, ranked by attention.

    attention: one (N, H_s, W_s) map per scale (sizes may differ). With ``unique_locations`` a
    location is scored by its strongest head (and that head is recorded), so each location is kept
    at most once; without it every head's value competes separately (a location can be kept once
    per head). Locations closer than ``border_cells`` cells to a map's edge are not candidates
    (:func:`interior_mask`). Ties are broken by scale, then head, then row-major position (stable).
    """
    if len(attention) == 0:
        raise ValueError("select_top_locations: no attention maps")
    if n < 1:
        raise ValueError(f"select_top_locations: n must be >= 1, got {n}")
    if border_cells < 0:
        raise ValueError(f"select_top_locations: border_cells must be >= 0, got {border_cells}")
    scores, scale_index, heads, ys, xs = [], [], [], [], []
    for index, maps in enumerate(attention):
        _check(maps, 3, f"attention[{index}]", "(N, H, W)")
        num_heads, height, width = maps.shape
        device = maps.device
        if unique_locations:
            value, head = maps.max(dim=0)                                   # (H, W)
            value, head = value.reshape(-1), head.reshape(-1)
            position = torch.arange(height * width, device=device)
        else:
            value = maps.reshape(-1)
            flat = torch.arange(num_heads * height * width, device=device)
            head, position = flat // (height * width), flat % (height * width)
        if border_cells:
            inside = interior_mask(height, width, border_cells, device).reshape(-1)[position]
            value, head, position = value[inside], head[inside], position[inside]
        scores.append(value)
        heads.append(head)
        ys.append(position // width)
        xs.append(position % width)
        scale_index.append(torch.full_like(position, index))
    score = torch.cat(scores)
    keep = min(n, score.numel())
    order = torch.sort(score, descending=True, stable=True).indices[:keep]
    return Selection(score=score[order], scale_index=torch.cat(scale_index)[order],
                     head=torch.cat(heads)[order], y=torch.cat(ys)[order], x=torch.cat(xs)[order])
