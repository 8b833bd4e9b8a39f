"""Shared layers (functional op + nn.Module form): GeM pooling, L2 normalisation, PCA-whitening.

``learn_pca_whitening`` gives ``y = W x + b`` that centres, rotates onto principal axes, optionally
scales each axis to unit variance and keeps ``out_dim`` components (cirtorch's learned whitening /
HOW's reduction-layer initialisation); ``init_linear_from_pca`` copies it into an ``nn.Linear`` or a
1x1 ``nn.Conv2d``.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def gem(x: torch.Tensor, p: float | torch.Tensor = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalised-mean pooling over space.

    Args:
        x: ``(B, C, H, W)`` feature maps (values are clamped to >= eps).
        p: pooling exponent (scalar, float or tensor; p=1 average, p->inf max).
    Returns:
        ``(B, C)`` = ``mean_hw(x^p)^(1/p)``.
    """
    if x.ndim != 4:
        raise ValueError(f"gem expects (B, C, H, W), got shape {tuple(x.shape)}")
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


class GeM(nn.Module):
    """GeM pooling module: ``(B, C, H, W)`` -> ``(B, C)``; ``p`` learnable when ``learn_p``."""

    def __init__(self, p: float = 3.0, learn_p: bool = True, eps: float = 1e-6):
        super().__init__()
        tensor_p = torch.tensor([float(p)])
        if learn_p:
            self.p = nn.Parameter(tensor_p)
        else:
            self.register_buffer("p", tensor_p)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gem(x, self.p, self.eps)

    def extra_repr(self) -> str:
        return f"p={float(self.p):.4f}, learn_p={isinstance(self.p, nn.Parameter)}, eps={self.eps}"


def l2n(x: torch.Tensor, dim: int = 1, eps: float = 1e-6) -> torch.Tensor:
    """L2-normalise ``x`` along ``dim`` (any shape; zero vectors stay zero)."""
    return F.normalize(x, p=2.0, dim=dim, eps=eps)


class L2N(nn.Module):
    """L2 normalisation module along ``dim`` (default channels of ``(B, C, ...)``)."""

    def __init__(self, dim: int = 1, eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return l2n(x, self.dim, self.eps)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def learn_pca_whitening(
    features: np.ndarray | torch.Tensor,
    out_dim: int | None = None,
    *,
    whiten: bool = True,
    eps: float = 1e-5,
    power: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Learn PCA(-whitening) so that ``y = weight @ x + bias`` projects features.

    Args:
        features: ``(N, C)`` training descriptors (numpy or torch), N >= 2.
        out_dim: number of principal components kept (default C; at most min(N, C) carry variance).
        whiten: divide each component by ``(eigenvalue + eps)^power`` (power 0.5 = full whitening,
            i.e. the projected training features have identity covariance); False = PCA rotation only.
        eps: regulariser added to eigenvalues.
    Returns:
        ``weight (out_dim, C)``, ``bias (out_dim,)`` float32 tensors with ``bias = -weight @ mean``.
    """
    x = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features)
    x = x.detach().to(torch.float64).cpu()
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, C), got shape {tuple(x.shape)}")
    n, c = x.shape
    out_dim = c if out_dim is None else int(out_dim)
    if not 1 <= out_dim <= c:
        raise ValueError(f"out_dim must be in [1, {c}], got {out_dim}")
    if not torch.isfinite(x).all():
        raise ValueError("features contain NaN or inf")
    mean = x.mean(dim=0)
    centred = x - mean
    covariance = centred.T @ centred / n
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    order = torch.argsort(eigenvalues, descending=True)[:out_dim]
    eigenvalues = eigenvalues[order].clamp(min=0.0)
    eigenvectors = eigenvectors[:, order]  # (C, out_dim)
    # Deterministic sign: largest-magnitude entry of each component positive.
    signs = torch.sign(eigenvectors.gather(0, eigenvectors.abs().argmax(dim=0, keepdim=True)))
    eigenvectors = eigenvectors * torch.where(signs == 0, torch.ones_like(signs), signs)
    weight = eigenvectors.T
    if whiten:
        weight = weight / (eigenvalues + eps).pow(power)[:, None]
    bias = -weight @ mean
    return weight.to(torch.float32), bias.to(torch.float32)


@torch.no_grad()
def init_linear_from_pca(layer: nn.Linear | nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Copy a PCA-whitening ``(out, in)`` weight and ``(out,)`` bias into an nn.Linear or 1x1 nn.Conv2d.

    The layer must have matching in/out sizes and a bias; raises ValueError otherwise.
    """
    weight = torch.as_tensor(weight)
    bias = torch.as_tensor(bias)
    if isinstance(layer, nn.Conv2d):
        if layer.kernel_size != (1, 1) or layer.groups != 1:
            raise ValueError(f"init_linear_from_pca needs a 1x1 ungrouped conv, got {layer}")
        target_shape = (layer.out_channels, layer.in_channels)
    elif isinstance(layer, nn.Linear):
        target_shape = (layer.out_features, layer.in_features)
    else:
        raise TypeError(f"expected nn.Linear or nn.Conv2d, got {type(layer).__name__}")
    if tuple(weight.shape) != target_shape or tuple(bias.shape) != (target_shape[0],):
        raise ValueError(f"PCA weight {tuple(weight.shape)} / bias {tuple(bias.shape)} do not fit layer "
                         f"(out, in) = {target_shape}")
    if layer.bias is None:
        raise ValueError("layer has no bias; PCA-whitening needs one (bias = -W mean)")
    layer.weight.copy_(weight.reshape(layer.weight.shape).to(layer.weight))
    layer.bias.copy_(bias.to(layer.bias))
