"""GLAM nn.Modules: the four attentions and the fused head (formulas in `glam.functional`)."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from glam import functional as G

__all__ = [
    "LocalChannelAttention",
    "LocalSpatialAttention",
    "GlobalChannelAttention",
    "GlobalSpatialAttention",
    "GlamHead",
]


class _ChannelConv1d(nn.Module):
    """One Conv1D (1 -> 1 channel, odd kernel) over the channel axis of GAP(F), then sigmoid."""

    def __init__(self, kernel_size: int):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"Conv1D kernel size must be odd and positive, got {kernel_size}")
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C) gate in (0, 1)."""
        return G.channel_gate(features, self.conv.weight, self.conv.bias)


def _kernel_size(channels: int, kernel_size: Optional[int]) -> int:
    return G.eca_kernel_size(channels) if kernel_size is None else kernel_size


class LocalChannelAttention(nn.Module):
    """A_lc = sigmoid(Conv1D(GAP(F))): (B, C, H, W) -> (B, C, 1, 1).

    Args:
        channels: C.
        kernel_size: odd Conv1D size; None picks ECA's adaptive size from C.
    """

    def __init__(self, channels: int, kernel_size: Optional[int] = None):
        super().__init__()
        self.channels = channels
        self.gate = _ChannelConv1d(_kernel_size(channels, kernel_size))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        _check_channels(features, self.channels)
        return self.gate(features)[:, :, None, None]


class LocalSpatialAttention(nn.Module):
    """A_ls: 1x1 reduction to C', dilated 3x3 convs (one per dilation), concat, 1x1 to one map, sigmoid.

    (B, C, H, W) -> (B, 1, H, W). `composed` (default True) runs the reduction, the dilated convs and
    the fuse composed into one linear filter, the same function at a fraction of the cost
    (`glam.functional.compose_local_spatial`); False runs the formula as written.
    """

    composed = True

    def __init__(self, channels: int, reduced_channels: int = 256, dilations: Sequence[int] = (1, 2, 3)):
        super().__init__()
        if not dilations or any(d < 1 for d in dilations):
            raise ValueError(f"dilations must be positive integers, got {tuple(dilations)}")
        self.channels = channels
        self.dilations = tuple(int(d) for d in dilations)
        self.reduce = nn.Conv2d(channels, reduced_channels, 1)
        self.dilated = nn.ModuleList(
            nn.Conv2d(reduced_channels, reduced_channels, 3, padding=d, dilation=d) for d in self.dilations
        )
        self.fuse = nn.Conv2d(len(self.dilations) * reduced_channels, 1, 1)
        self._cached_key, self._cached = None, None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        _check_channels(features, self.channels)
        if not self.composed:
            return G.local_spatial_attention(features, *self._layers(), composed=False)
        return G.composed_local_spatial_attention(features, self._composition())

    def _layers(self) -> tuple:
        return (
            self.reduce.weight,
            self.reduce.bias,
            [c.weight for c in self.dilated],
            [c.bias for c in self.dilated],
            self.dilations,
            self.fuse.weight,
            self.fuse.bias,
        )

    def _composition(self) -> tuple:
        """`G.compose_local_spatial` of the current weights; kept while no gradient is recorded
        and no parameter changed (inference composes once, training every step)."""
        if torch.is_grad_enabled():
            return G.compose_local_spatial(*self._layers())
        key = tuple((p.data_ptr(), p._version, p.device, p.dtype) for p in self.parameters())
        if self._cached_key != key:
            with torch.inference_mode(False), torch.no_grad():
                self._cached = G.compose_local_spatial(*self._layers())
            self._cached_key = key
        return self._cached


class GlobalChannelAttention(nn.Module):
    """G_c = V_c A_gc with A_gc = softmax(K_c^T Q_c), Q_c, K_c = sigmoid(Conv1D(GAP(F))), V_c = F.

    (B, C, H, W) -> (B, C, H, W); `attention_matrix` gives A_gc (B, C, C). `method` ("auto" or
    "matrix") chooses how G_c is computed (see `glam.functional.global_channel_attention`).
    """

    method = "auto"

    def __init__(self, channels: int, kernel_size: Optional[int] = None, scale: float = 1.0):
        super().__init__()
        size = _kernel_size(channels, kernel_size)
        self.channels = channels
        self.scale = float(scale)
        self.query = _ChannelConv1d(size)
        self.key = _ChannelConv1d(size)

    def attention_matrix(self, features: torch.Tensor) -> torch.Tensor:
        """A_gc (B, C, C), columns summing to 1."""
        _check_channels(features, self.channels)
        return G.global_channel_attention_matrix(self.query(features), self.key(features), self.scale)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        _check_channels(features, self.channels)
        return G.global_channel_attention(
            features, self.query(features), self.key(features), self.scale, method=self.method
        )


class GlobalSpatialAttention(nn.Module):
    """G_s = Conv1x1(V_s A_gs) with A_gs = softmax(K_s^T Q_s) (N x N, never materialised).

    Q_s, K_s, V_s are 1x1 convs C -> C'; the output 1x1 conv maps C' -> C. (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, reduced_channels: int = 256, scale: float = 1.0):
        super().__init__()
        self.channels = channels
        self.scale = float(scale)
        self.query = nn.Conv2d(channels, reduced_channels, 1)
        self.key = nn.Conv2d(channels, reduced_channels, 1)
        self.value = nn.Conv2d(channels, reduced_channels, 1)
        self.output = nn.Conv2d(reduced_channels, channels, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        _check_channels(features, self.channels)
        attended = G.global_spatial_attention(
            self.query(features), self.key(features), self.value(features), self.scale
        )
        return self.output(attended)


class GlamHead(nn.Module):
    """Global-local attention head: F (B, C, H, W) -> F_gl (B, C, H, W).

    F_l from the local attentions, F_g from the global ones, F_gl = w_l F_l + w_g F_g + w F with
    (w_l, w_g, w) = softmax(fusion_logits). Each attention can be switched off (see
    `glam.functional` for what "off" means); a stream with both of its attentions off is left out of
    the fusion, so with all four off the head is exactly the identity.

    Args:
        channels: C of the backbone map.
        local_channel, local_spatial, global_channel, global_spatial: the four switches.
        kernel_size: Conv1D size of the channel attentions (None: ECA adaptive).
        local_reduced_channels, dilations: local spatial attention.
        global_reduced_channels: C' of the global spatial attention.
        attention_scale: logit scale of both global softmaxes (the seed: 1.0).
        fusion_init_logits: initial (local, global, identity) logits.
    """

    def __init__(
        self,
        channels: int,
        *,
        local_channel: bool = True,
        local_spatial: bool = True,
        global_channel: bool = True,
        global_spatial: bool = True,
        kernel_size: Optional[int] = None,
        local_reduced_channels: int = 256,
        dilations: Sequence[int] = (1, 2, 3),
        global_reduced_channels: int = 256,
        attention_scale: float = 1.0,
        fusion_init_logits: Tuple[float, float, float] = (0.0, 0.0, math.log(98.0)),
    ):
        super().__init__()
        self.channels = channels
        self.local_channel = LocalChannelAttention(channels, kernel_size) if local_channel else None
        self.local_spatial = (
            LocalSpatialAttention(channels, local_reduced_channels, dilations) if local_spatial else None
        )
        self.global_channel = GlobalChannelAttention(channels, kernel_size, attention_scale) if global_channel else None
        self.global_spatial = (
            GlobalSpatialAttention(channels, global_reduced_channels, attention_scale) if global_spatial else None
        )
        if len(fusion_init_logits) != 3:
            raise ValueError(f"fusion_init_logits must have 3 values, got {fusion_init_logits}")
        self.fusion_logits = nn.Parameter(torch.tensor([float(v) for v in fusion_init_logits]))

    @property
    def uses_local(self) -> bool:
        return self.local_channel is not None or self.local_spatial is not None

    @property
    def uses_global(self) -> bool:
        return self.global_channel is not None or self.global_spatial is not None

    def fusion_weights(self) -> torch.Tensor:
        """(w_l, w_g, w) actually used (0 for a stream that is off)."""
        return G.fusion_weights(self.fusion_logits, self.uses_local, self.uses_global)

    def local_stream(self, features: torch.Tensor) -> Optional[torch.Tensor]:
        """F_l (B, C, H, W) or None when both local attentions are off."""
        if not self.uses_local:
            return None
        a_lc = self.local_channel(features) if self.local_channel is not None else None
        a_ls = self.local_spatial(features) if self.local_spatial is not None else None
        return G.apply_local_attention(features, a_lc, a_ls)

    def global_stream(self, features: torch.Tensor) -> Optional[torch.Tensor]:
        """F_g (B, C, H, W) or None when both global attentions are off."""
        if not self.uses_global:
            return None
        g_c = self.global_channel(features) if self.global_channel is not None else None
        g_s = self.global_spatial(features) if self.global_spatial is not None else None
        return G.apply_global_attention(features, g_c, g_s)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        _check_channels(features, self.channels)
        return G.fuse_streams(features, self.local_stream(features), self.global_stream(features), self.fusion_logits)


def _check_channels(features: torch.Tensor, channels: int) -> None:
    if not isinstance(features, torch.Tensor) or features.dim() != 4 or features.shape[1] != channels:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"expected a (B, {channels}, H, W) feature map, got {shape}")
