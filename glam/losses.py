"""Training losses for GLAM descriptors: ArcFace (labelled classes) and contrastive (pairs)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as nnf
from torch import nn

__all__ = ["arcface_logits", "ArcFaceLoss", "contrastive_loss", "ContrastiveLoss", "two_view_contrastive_loss"]


def arcface_logits(
    embeddings: torch.Tensor, class_weights: torch.Tensor, labels: torch.Tensor, scale: float, margin: float
) -> torch.Tensor:
    """Additive angular margin logits (ArcFace, Deng et al. 2019).

    logit[b, k] = scale * cos(theta_bk + margin * [k == label_b]) with cos(theta_bk) the cosine of
    embedding b and class centre k. Past theta > pi - margin, where cos(theta + m) stops decreasing,
    the usual fallback cos(theta) - m sin(m) keeps the logit monotone.

    Args:
        embeddings: (B, D) (normalised here).
        class_weights: (K, D) class centres (normalised here).
        labels: (B,) int64 in [0, K).
    Returns:
        (B, K) logits for cross-entropy.
    """
    if embeddings.dim() != 2 or class_weights.dim() != 2 or embeddings.shape[1] != class_weights.shape[1]:
        raise ValueError(
            f"embeddings (B, D) and class weights (K, D) must agree, got {tuple(embeddings.shape)}, "
            f"{tuple(class_weights.shape)}"
        )
    if labels.shape != embeddings.shape[:1]:
        raise ValueError(f"labels must be ({embeddings.shape[0]},), got {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= class_weights.shape[0]):
        raise ValueError(f"labels must lie in [0, {class_weights.shape[0]}), got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    cosine = nnf.normalize(embeddings, dim=1) @ nnf.normalize(class_weights, dim=1).t()
    target = cosine.gather(1, labels[:, None]).clamp(-1.0, 1.0)
    sine = (1.0 - target.square()).clamp_min(0.0).sqrt()
    with_margin = target * math.cos(margin) - sine * math.sin(margin)
    fallback = target - math.sin(math.pi - margin) * margin
    with_margin = torch.where(target > math.cos(math.pi - margin), with_margin, fallback)
    logits = cosine.scatter(1, labels[:, None], with_margin)
    return scale * logits


class ArcFaceLoss(nn.Module):
    """Cross-entropy over ArcFace logits with learned class centres (K, D)."""

    def __init__(self, embedding_dim: int, num_classes: int, scale: float = 30.0, margin: float = 0.15):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"ArcFace needs at least 2 classes, got {num_classes}")
        self.scale = float(scale)
        self.margin = float(margin)
        self.class_weights = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.normal_(self.class_weights, std=1.0 / math.sqrt(embedding_dim))

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return arcface_logits(embeddings, self.class_weights, labels, self.scale, self.margin)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """embeddings (B, D), labels (B,) -> scalar loss."""
        return nnf.cross_entropy(self.logits(embeddings, labels), labels)


def contrastive_loss(
    anchors: torch.Tensor, others: torch.Tensor, is_positive: torch.Tensor, margin: float = 0.7
) -> torch.Tensor:
    """Contrastive loss on descriptor pairs (Radenovic et al.): mean of
    0.5 * d^2 for positives and 0.5 * max(0, margin - d)^2 for negatives, d the Euclidean distance.

    Args:
        anchors, others: (P, D) descriptors (L2-normalised by the model).
        is_positive: (P,) bool or {0, 1}.
    Returns:
        scalar.
    """
    if anchors.shape != others.shape or anchors.dim() != 2:
        raise ValueError(f"pair descriptors must both be (P, D), got {tuple(anchors.shape)}, {tuple(others.shape)}")
    if is_positive.shape != anchors.shape[:1]:
        raise ValueError(f"is_positive must be ({anchors.shape[0]},), got {tuple(is_positive.shape)}")
    distance = (anchors - others).norm(dim=1)
    positive = is_positive.to(anchors.dtype)
    per_pair = positive * distance.square() + (1.0 - positive) * (margin - distance).clamp_min(0.0).square()
    return 0.5 * per_pair.mean()


class ContrastiveLoss(nn.Module):
    """Module form of `contrastive_loss`."""

    def __init__(self, margin: float = 0.7):
        super().__init__()
        self.margin = float(margin)

    def forward(self, anchors: torch.Tensor, others: torch.Tensor, is_positive: torch.Tensor) -> torch.Tensor:
        return contrastive_loss(anchors, others, is_positive, self.margin)


def paired_contrastive_loss(anchors: torch.Tensor, positives: torch.Tensor, labels: torch.Tensor,
                            margin: float = 0.7) -> torch.Tensor:
    """Contrastive loss of labelled pairs with hardest in-batch negatives: (anchors[i], positives[i])
    are positives (both of class labels[i]); every one of the 2P descriptors also gets its hardest
    negative among the batch's descriptors of other classes (`imagedata.datasets.hardest_negatives`).

    Args:
        anchors, positives: (P, D) L2-normalised descriptors; labels: (P,) class of each pair, at
            least two classes.
    Returns:
        scalar contrastive loss over P positive and 2P negative pairs.
    """
    from imagedata.datasets import hardest_negatives

    if anchors.shape != positives.shape or anchors.dim() != 2 or anchors.shape[0] < 2:
        raise ValueError(f"pairs must both be (P >= 2, D), got {tuple(anchors.shape)}, {tuple(positives.shape)}")
    if labels.shape != anchors.shape[:1]:
        raise ValueError(f"labels must be ({anchors.shape[0]},), got {tuple(labels.shape)}")
    count = anchors.shape[0]
    pool = torch.cat([anchors, positives], dim=0)
    negatives = hardest_negatives(pool, torch.cat([labels, labels]))
    if (negatives < 0).any():
        raise ValueError("a batch needs pairs of at least two classes (no in-batch negative)")
    is_positive = torch.cat([torch.ones(count), torch.zeros(2 * count)]).to(pool.device)
    return contrastive_loss(torch.cat([anchors, pool]), torch.cat([positives, pool[negatives]]), is_positive,
                            margin)


def two_view_contrastive_loss(view_a: torch.Tensor, view_b: torch.Tensor, margin: float = 0.7) -> torch.Tensor:
    """Unlabelled-folder loss: (view_a[i], view_b[i]) are positives (two augmentations of image i);
    every descriptor also gets its hardest in-batch negative (:func:`paired_contrastive_loss` with
    one class per image).

    Args:
        view_a, view_b: (B, D) L2-normalised descriptors of two augmentations of the same B >= 2 images.
    Returns:
        scalar contrastive loss over B positive and 2B negative pairs.
    """
    if view_a.shape != view_b.shape or view_a.dim() != 2 or view_a.shape[0] < 2:
        raise ValueError(f"two views must both be (B >= 2, D), got {tuple(view_a.shape)}, {tuple(view_b.shape)}")
    return paired_contrastive_loss(view_a, view_b, torch.arange(view_a.shape[0], device=view_a.device), margin)
