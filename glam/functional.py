"""Functional GLAM ops (global-local, spatial-channel attention; Song, Han & Avrithis, WACV 2022).

Pure tensor functions; the learned parts (convolutions, fusion logits) live in `glam.modules`.
Notation: F is a backbone map (B, C, H, W), N = H * W positions, C' the reduced channel count of the
spatial attentions.

Our reading of the seed (`/work/shared/seeds/001_*.txt`), used throughout:

* local channel   A_lc = sigmoid(Conv1D(GAP(F)))                      (B, C, 1, 1)
* local spatial   A_ls = sigmoid(Conv1x1(Concat_d DilConv3x3_d(Conv1x1(F))))  (B, 1, H, W)
* local stream    F_l  = (F * A_lc + F) * A_ls + (F * A_lc + F)
* global channel  Q_c, K_c = sigmoid(Conv1D(GAP(F))) (B, C) each;
                  A_gc = softmax(K_c^T Q_c) (B, C, C), normalised over its first (key) index, so that
                  G_c = V_c A_gc with V_c = F as an (N, C) matrix: every output channel j is a convex
                  combination of the input channels, G_c[:, j] = sum_i A_gc[i, j] F[i]   (B, C, H, W)
* global spatial  Q_s, K_s, V_s = Conv1x1(F) (B, C', H, W) each;
                  A_gs = softmax(K_s^T Q_s) (B, N, N), normalised over the key position, and
                  G_s = Conv1x1(V_s A_gs) back to C channels                          (B, C, H, W)
                  computed with scaled_dot_product_attention, so A_gs is never materialised.
* global stream   F_c = F * G_c  (the seed's F ⊙ (V_c A_gc)),  F_g = F_c * G_s + F_c
                  (the seed's (F ⊙ (V_c A_gc)) ⊙ A_gs + F ⊙ (V_c A_gc), where "⊙ A_gs" is read as
                  the element-wise product with the spatial-attention output G_s).
* fusion          F_gl = w_l F_l + w_g F_g + w F, (w_l, w_g, w) = softmax(logits).

Switching an attention off replaces it by the identity of its formula: local channel off gives
F * A_lc + F -> F; local spatial off gives F_l = F * A_lc + F; global channel off gives F_c = F;
global spatial off gives F_g = F_c. A stream whose two attentions are both off is left out of the
fusion (the paper's ablation "baseline + local" / "+ global"), so with all four off F_gl = F exactly.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as nnf

__all__ = [
    "eca_kernel_size",
    "channel_gate",
    "local_channel_attention",
    "local_spatial_attention",
    "compose_local_spatial",
    "composed_local_spatial_attention",
    "apply_local_attention",
    "global_channel_attention_matrix",
    "global_channel_attention",
    "series_terms",
    "global_spatial_attention",
    "apply_global_attention",
    "fusion_weights",
    "fuse_streams",
]


def _check_map(x: torch.Tensor, name: str = "features") -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a (B, C, H, W) tensor, got {shape}")


def eca_kernel_size(channels: int, gamma: float = 2.0, beta: float = 1.0) -> int:
    """ECA-Net's adaptive 1-D kernel size: the odd integer nearest above |log2(C) / gamma + beta / gamma|."""
    if channels < 1:
        raise ValueError(f"channels must be positive, got {channels}")
    size = int(abs(math.log2(channels) / gamma + beta / gamma))
    return max(size if size % 2 == 1 else size + 1, 1)


def channel_gate(features: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """sigmoid(Conv1D(GAP(F))) as a (B, C) gate.

    Args:
        features: (B, C, H, W).
        weight: (1, 1, k) Conv1D kernel sliding over the channel axis (odd k, 'same' padding).
        bias: (1,) or None.
    Returns:
        (B, C) values in (0, 1).
    """
    _check_map(features)
    if weight.dim() != 3 or weight.shape[:2] != (1, 1) or weight.shape[2] % 2 != 1:
        raise ValueError(f"Conv1D weight must be (1, 1, k) with odd k, got {tuple(weight.shape)}")
    pooled = features.mean(dim=(2, 3)).unsqueeze(1)  # (B, 1, C)
    gate = nnf.conv1d(pooled, weight, bias, padding=weight.shape[2] // 2)
    return torch.sigmoid(gate).squeeze(1)


def local_channel_attention(
    features: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Local channel attention A_lc = sigmoid(Conv1D(GAP(F))) (ECA-style).

    Args:
        features: (B, C, H, W).
        weight, bias: Conv1D parameters, see `channel_gate`.
    Returns:
        (B, C, 1, 1) attention in (0, 1).
    """
    return channel_gate(features, weight, bias)[:, :, None, None]


def local_spatial_attention(
    features: torch.Tensor,
    reduce_weight: torch.Tensor,
    reduce_bias: Optional[torch.Tensor],
    dilated_weights: Sequence[torch.Tensor],
    dilated_biases: Sequence[Optional[torch.Tensor]],
    dilations: Sequence[int],
    fuse_weight: torch.Tensor,
    fuse_bias: Optional[torch.Tensor],
    composed: bool = True,
) -> torch.Tensor:
    """Local spatial attention A_ls.

    F' = Conv1x1(F) (C -> C'); D_d = DilatedConv3x3_d(F') (C' -> C') for every dilation d ('same'
    padding d); A_ls = sigmoid(Conv1x1(Concat_d D_d)) (len(dilations) * C' -> 1).

    Args:
        features: (B, C, H, W).
        reduce_weight: (C', C, 1, 1); reduce_bias: (C',) or None.
        dilated_weights: one (C', C', 3, 3) per dilation; dilated_biases: (C',) or None each.
        dilations: e.g. (1, 2, 3).
        fuse_weight: (1, len(dilations) * C', 1, 1); fuse_bias: (1,) or None.
        composed: compute it through `compose_local_spatial` (the same function, far cheaper);
            False runs the formula as written, as a reference.
    Returns:
        (B, 1, H, W) attention in (0, 1).
    """
    _check_map(features)
    if not composed:
        _check_local_spatial(reduce_weight, dilated_weights, dilated_biases, dilations, fuse_weight)
        reduced = nnf.conv2d(features, reduce_weight, reduce_bias)
        branches = [
            nnf.conv2d(reduced, w, b, padding=d, dilation=d)
            for w, b, d in zip(dilated_weights, dilated_biases, dilations)
        ]
        return torch.sigmoid(nnf.conv2d(torch.cat(branches, dim=1), fuse_weight, fuse_bias))
    weights = compose_local_spatial(
        reduce_weight, reduce_bias, dilated_weights, dilated_biases, dilations, fuse_weight, fuse_bias
    )
    return composed_local_spatial_attention(features, weights)


def _check_local_spatial(reduce_weight, dilated_weights, dilated_biases, dilations, fuse_weight) -> None:
    if not (len(dilated_weights) == len(dilated_biases) == len(dilations)) or not dilations:
        raise ValueError("need one dilated conv weight and bias per dilation")
    reduced_channels = reduce_weight.shape[0]
    if fuse_weight.shape != (1, len(dilations) * reduced_channels, 1, 1):
        raise ValueError(
            f"fuse weight must be (1, {len(dilations) * reduced_channels}, 1, 1), got {tuple(fuse_weight.shape)}"
        )


def compose_local_spatial(
    reduce_weight: torch.Tensor,
    reduce_bias: Optional[torch.Tensor],
    dilated_weights: Sequence[torch.Tensor],
    dilated_biases: Sequence[Optional[torch.Tensor]],
    dilations: Sequence[int],
    fuse_weight: torch.Tensor,
    fuse_bias: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The local spatial attention's layers composed into one linear filter of F (arguments as in
    `local_spatial_attention`).

    Nothing non-linear stands between the reduction, the dilated convs, the concatenation and the
    fuse, so the map before the sigmoid is one linear filter of F. Every tap of every dilated conv
    (offset (d (k - 1), d (l - 1))) composes with its slice of the fuse and with the reduction into
    one C-vector; taps at the same offset (the centre) add up. A_ls is then a 1x1 conv C -> P (one
    channel per distinct offset) and a fixed one-hot conv that shifts every channel by its offset
    and sums them: the same function and gradients with P / C' of the reduction's multiply-adds.
    The reduction's bias rides on the P channels, which the shift pads with zeros exactly where the
    formula pads F', so the borders agree as well.

    Returns:
        (offset_weight (P, C, 1, 1), offset_bias (P,) or None, bias (), shift (1, P, S, S)).
    """
    _check_local_spatial(reduce_weight, dilated_weights, dilated_biases, dilations, fuse_weight)
    reduced_channels = reduce_weight.shape[0]
    offsets = sorted({(d * (k - 1), d * (l - 1)) for d in dilations for k in range(3) for l in range(3)})
    position = {offset: n for n, offset in enumerate(offsets)}
    tap_index = torch.tensor(
        [position[(d * (k - 1), d * (l - 1))] for d in dilations for k in range(3) for l in range(3)],
        device=reduce_weight.device,
    )
    fuse_slices = fuse_weight.reshape(len(dilations), reduced_channels)
    # every tap composed with the fuse: (9 len(dilations), C'), taps ordered (k, l) per dilation
    taps = torch.cat([
        (slice_d @ weight_d.reshape(reduced_channels, -1)).reshape(reduced_channels, 9).t()
        for slice_d, weight_d in zip(fuse_slices, dilated_weights)
    ])
    per_offset = taps.new_zeros(len(offsets), reduced_channels).index_add(0, tap_index, taps)  # (P, C')
    offset_weight = (per_offset @ reduce_weight.reshape(reduced_channels, -1))[:, :, None, None]
    offset_bias = None if reduce_bias is None else per_offset @ reduce_bias
    bias = fuse_weight.new_zeros(()) if fuse_bias is None else fuse_bias.reshape(())
    for slice_d, bias_d in zip(fuse_slices, dilated_biases):
        if bias_d is not None:
            bias = bias + slice_d @ bias_d
    reach = max(dilations)
    shift = torch.zeros(len(offsets), (2 * reach + 1) ** 2, dtype=reduce_weight.dtype, device=reduce_weight.device)
    flat_positions = torch.tensor([(reach + dy) * (2 * reach + 1) + reach + dx for dy, dx in offsets],
                                  device=reduce_weight.device)
    shift[torch.arange(len(offsets), device=shift.device), flat_positions] = 1.0
    return offset_weight, offset_bias, bias, shift.reshape(1, len(offsets), 2 * reach + 1, 2 * reach + 1)


def composed_local_spatial_attention(features: torch.Tensor, composed: Sequence[torch.Tensor]) -> torch.Tensor:
    """A_ls (B, 1, H, W) from F (B, C, H, W) and `compose_local_spatial`'s result."""
    _check_map(features)
    offset_weight, offset_bias, bias, shift = composed
    per_offset_maps = nnf.conv2d(features, offset_weight, offset_bias)  # (B, P, H, W)
    logits = nnf.conv2d(per_offset_maps, shift, padding=shift.shape[-1] // 2)
    return torch.sigmoid(logits + bias)


def apply_local_attention(
    features: torch.Tensor,
    channel_attention: Optional[torch.Tensor],
    spatial_attention: Optional[torch.Tensor],
) -> torch.Tensor:
    """Local stream F_l = (F * A_lc + F) * A_ls + (F * A_lc + F); a None attention is switched off.

    Args:
        features: F (B, C, H, W).
        channel_attention: A_lc (B, C, 1, 1) or None (then F * A_lc + F is replaced by F).
        spatial_attention: A_ls (B, 1, H, W) or None (then F_l = F * A_lc + F).
    Returns:
        F_l (B, C, H, W).
    """
    _check_map(features)
    b, c, h, w = features.shape
    channel_refined = features
    if channel_attention is not None:
        if channel_attention.shape != (b, c, 1, 1):
            raise ValueError(f"A_lc must be {(b, c, 1, 1)}, got {tuple(channel_attention.shape)}")
        channel_refined = torch.addcmul(features, features, channel_attention)
    if spatial_attention is None:
        return channel_refined
    if spatial_attention.shape != (b, 1, h, w):
        raise ValueError(f"A_ls must be {(b, 1, h, w)}, got {tuple(spatial_attention.shape)}")
    return torch.addcmul(channel_refined, channel_refined, spatial_attention)


def global_channel_attention_matrix(query: torch.Tensor, key: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """A_gc = softmax(K_c^T Q_c) (B, C, C), entry [i, j] = softmax over i of scale * k_i q_j.

    Args:
        query, key: Q_c, K_c (B, C).
    Returns:
        (B, C, C); every column sums to 1.
    """
    if query.dim() != 2 or query.shape != key.shape:
        raise ValueError(f"Q_c and K_c must both be (B, C), got {tuple(query.shape)} and {tuple(key.shape)}")
    logits = scale * key.unsqueeze(2) * query.unsqueeze(1)  # (B, C_i, C_j)
    return torch.softmax(logits, dim=1)


# The series form of the global channel attention (below) is used while its truncation error stays
# under SERIES_TOLERANCE relative to the softmax's normaliser and it needs at most
# SERIES_MAX_TERMS terms; otherwise the C x C matrix is formed.
SERIES_TOLERANCE = 1e-7
SERIES_MAX_TERMS = 24


def series_terms(bound: float, tolerance: float = SERIES_TOLERANCE) -> Optional[int]:
    """Terms n = 0..T-1 of exp(x) = sum_n x^n / n! that the series form needs for |x| <= bound.

    The truncation error of every term of the softmax sums, relative to the normaliser (at least
    C exp(-bound)), is below bound^T / T! * exp(2 bound); that is kept under `tolerance`. Returns
    None when more than SERIES_MAX_TERMS would be needed (then the matrix form is cheaper or safer).
    """
    if not math.isfinite(bound):
        return None
    error = math.exp(2.0 * bound)
    for terms in range(1, SERIES_MAX_TERMS + 1):
        error *= bound / terms
        if error < tolerance:
            return terms
    return None


def global_channel_attention(
    features: torch.Tensor, query: torch.Tensor, key: torch.Tensor, scale: float = 1.0, method: str = "auto"
) -> torch.Tensor:
    """Global channel attention output G_c = V_c A_gc with V_c = F.

    Args:
        features: F (B, C, H, W), also the value V_c.
        query, key: Q_c, K_c (B, C).
        method: "auto" (the series form below where it is exact to float precision and cheaper)
            or "matrix" (A_gc formed and applied, as a reference).
    Returns:
        G_c (B, C, H, W) in F's memory format: G_c[:, j] = sum_i A_gc[i, j] F[:, i].

    Every logit scale * k_i * q_j is a product of two per-channel scalars, so with
    exp(x) = sum_n x^n / n! the attention factors through T moments M_n = sum_i k_i^n F[:, i]:
    G_c[:, j] = sum_n (scale q_j)^n / n! M_n / Z_j. That costs 2 T C HW multiply-adds instead of the
    matrix form's C^2 HW (the GLAM head's largest cost); T comes from `series_terms` for the largest
    |logit| (sigmoid gates and scale 1 need 12), so the two forms agree to float precision, and the
    matrix form is used when the bound is too large for it.
    """
    _check_map(features)
    if query.shape != features.shape[:2] or key.shape != query.shape:
        raise ValueError(f"Q_c and K_c must be {tuple(features.shape[:2])}, got {tuple(query.shape)}, {tuple(key.shape)}")
    if method not in ("auto", "matrix"):
        raise ValueError(f"method must be 'auto' or 'matrix', got {method!r}")
    b, c, h, w = features.shape
    bound = abs(scale) * float(query.detach().abs().max()) * float(key.detach().abs().max())
    terms = series_terms(bound)
    if method == "matrix" or terms is None or 2 * terms >= c:
        attention = global_channel_attention_matrix(query, key, scale)
        return torch.einsum("bihw,bij->bjhw", features, attention)
    # the (B, C, T) and (B, T, C) factors in at least float32, also under mixed precision
    precise = torch.promote_types(query.dtype, torch.float32)
    query, key = query.to(precise), key.to(precise)
    orders = torch.arange(terms, device=query.device, dtype=precise)
    key_powers = key.unsqueeze(1) ** orders[None, :, None]  # (B, T, C): k_i^n
    query_terms = (scale * query).unsqueeze(2) ** orders / torch.exp(torch.lgamma(orders + 1))  # (B, C, T)
    normaliser = query_terms @ key_powers.sum(dim=2, keepdim=True)  # (B, C, 1): Z_j
    coefficients = (query_terms / normaliser).to(features.dtype)  # (B, C, T)
    key_powers = key_powers.to(features.dtype)
    flat = features.flatten(2)  # (B, C, N), a view in either memory format
    if features.is_contiguous(memory_format=torch.channels_last) and not features.is_contiguous():
        moments = flat.transpose(1, 2) @ key_powers.transpose(1, 2)  # (B, N, T)
        out = (moments @ coefficients.transpose(1, 2)).transpose(1, 2)  # (B, C, N) with C innermost
    else:
        out = coefficients @ (key_powers @ flat)  # (B, C, N)
    return out.reshape(b, c, h, w) if out.is_contiguous() else out.view(b, c, h, w)


def global_spatial_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """V_s A_gs with A_gs = softmax(K_s^T Q_s) over key positions, never materialising (N, N).

    Uses torch.nn.functional.scaled_dot_product_attention (flash / memory-efficient kernels on CPU
    and GPU), so memory grows with N, not N^2.

    Args:
        query, key, value: Q_s, K_s, V_s (B, C', H, W).
        scale: multiplier of the logits (the seed has none: 1.0).
    Returns:
        (B, C', H, W), channels-last: output position j = sum_i softmax_i(scale * k_i . q_j) v_i.
    """
    for name, t in (("Q_s", query), ("K_s", key), ("V_s", value)):
        _check_map(t, name)
    if not (query.shape == key.shape and key.shape[0] == value.shape[0] and key.shape[2:] == value.shape[2:]):
        raise ValueError(
            f"Q_s, K_s must match and V_s share their positions: {tuple(query.shape)}, "
            f"{tuple(key.shape)}, {tuple(value.shape)}"
        )
    b, c, h, w = value.shape
    # (B, 1, N, C') with a unit last stride: the fused CPU/GPU kernels need it, otherwise torch falls
    # back to the math path, which materialises the (N, N) matrix.
    as_tokens = lambda t: t.flatten(2).transpose(1, 2).contiguous().unsqueeze(1)  # noqa: E731
    out = nnf.scaled_dot_product_attention(as_tokens(query), as_tokens(key), as_tokens(value), scale=scale)
    # (B, N, C') tokens are the channels-last layout of (B, C', H, W): returned without a copy, so
    # the maps that follow keep one memory format.
    return out.view(b, h, w, c).permute(0, 3, 1, 2)


def apply_global_attention(
    features: torch.Tensor,
    channel_output: Optional[torch.Tensor],
    spatial_output: Optional[torch.Tensor],
) -> torch.Tensor:
    """Global stream F_g = F_c * G_s + F_c with F_c = F * G_c; a None output is switched off.

    Args:
        features: F (B, C, H, W).
        channel_output: G_c (B, C, H, W) or None (then F_c = F).
        spatial_output: G_s (B, C, H, W) or None (then F_g = F_c).
    Returns:
        F_g (B, C, H, W).
    """
    _check_map(features)
    for name, t in (("G_c", channel_output), ("G_s", spatial_output)):
        if t is not None and t.shape != features.shape:
            raise ValueError(f"{name} must be {tuple(features.shape)}, got {tuple(t.shape)}")
    channel_refined = features if channel_output is None else features * channel_output
    if spatial_output is None:
        return channel_refined
    return torch.addcmul(channel_refined, channel_refined, spatial_output)


def fusion_weights(logits: torch.Tensor, use_local: bool = True, use_global: bool = True) -> torch.Tensor:
    """(w_l, w_g, w) = softmax(logits) over the streams in use; an unused stream gets weight 0.

    Args:
        logits: (3,) ordered (local, global, identity).
    Returns:
        (3,) non-negative weights summing to 1.
    """
    if logits.shape != (3,):
        raise ValueError(f"fusion logits must be (3,), got {tuple(logits.shape)}")
    mask = torch.tensor([use_local, use_global, True], device=logits.device)
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=0)


def fuse_streams(
    features: torch.Tensor,
    local_stream: Optional[torch.Tensor],
    global_stream: Optional[torch.Tensor],
    logits: torch.Tensor,
) -> torch.Tensor:
    """F_gl = w_l F_l + w_g F_g + w F; a None stream is left out of the softmax.

    With both streams None this returns `features` itself (exact identity).

    Args:
        features: F (B, C, H, W); local_stream F_l, global_stream F_g: (B, C, H, W) or None.
        logits: (3,) fusion logits (local, global, identity).
    Returns:
        F_gl (B, C, H, W).
    """
    _check_map(features)
    if local_stream is None and global_stream is None:
        return features
    weights = fusion_weights(logits, local_stream is not None, global_stream is not None)
    fused = features * weights[2]
    if local_stream is not None:
        fused = torch.addcmul(fused, local_stream, weights[0])
    if global_stream is not None:
        fused = torch.addcmul(fused, global_stream, weights[1])
    return fused
