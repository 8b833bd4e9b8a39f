"""GLAM attention ops and head: shapes, the seed's formulas checked by hand, switches, gradients, memory."""
from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from glam import functional as G
from glam.modules import (
    GlamHead,
    GlobalChannelAttention,
    GlobalSpatialAttention,
    LocalChannelAttention,
    LocalSpatialAttention,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
SWITCHES = ("local_channel", "local_spatial", "global_channel", "global_spatial")


def small_head(channels: int = 16, **switches) -> GlamHead:
    return GlamHead(channels, local_reduced_channels=8, global_reduced_channels=8, kernel_size=3, **switches)


def test_attention_output_shapes():
    torch.manual_seed(0)
    x = torch.rand(2, 16, 5, 7)
    assert LocalChannelAttention(16, 3)(x).shape == (2, 16, 1, 1)
    assert LocalSpatialAttention(16, 8, (1, 2, 3))(x).shape == (2, 1, 5, 7)
    gca = GlobalChannelAttention(16, 3)
    assert gca(x).shape == (2, 16, 5, 7)
    assert gca.attention_matrix(x).shape == (2, 16, 16)
    assert GlobalSpatialAttention(16, 8)(x).shape == (2, 16, 5, 7)
    assert small_head()(x).shape == (2, 16, 5, 7)
    a_lc, a_ls = LocalChannelAttention(16, 3)(x), LocalSpatialAttention(16, 8)(x)
    assert ((a_lc > 0) & (a_lc < 1)).all() and ((a_ls > 0) & (a_ls < 1)).all()


def test_bad_shapes_are_rejected_with_clear_errors():
    with pytest.raises(ValueError, match=r"\(B, 16, H, W\)"):
        LocalChannelAttention(16)(torch.rand(2, 8, 4, 4))
    with pytest.raises(ValueError, match="A_ls"):
        G.apply_local_attention(torch.rand(1, 2, 3, 3), None, torch.rand(1, 1, 2, 2))
    with pytest.raises(ValueError, match="odd"):
        LocalChannelAttention(16, kernel_size=4)


def test_eca_kernel_size_is_odd_and_grows_with_channels():
    assert G.eca_kernel_size(1280) == 5  # log2(1280)/2 + 1/2 = 5.66 -> 5
    assert G.eca_kernel_size(2048) == 7  # 6.0 -> 7 (next odd)
    assert all(G.eca_kernel_size(c) % 2 == 1 for c in (1, 3, 64, 512, 4096))


def test_local_formula_by_hand():
    # F has 2 channels at 2 positions; A_lc = (0.5, 0.25); A_ls = (0.2, 0.8) over the positions.
    features = torch.tensor([[[[1.0, 2.0]], [[4.0, 8.0]]]])  # (1, 2, 1, 2)
    a_lc = torch.tensor([0.5, 0.25]).reshape(1, 2, 1, 1)
    a_ls = torch.tensor([0.2, 0.8]).reshape(1, 1, 1, 2)
    # F*A_lc + F = [[1.5, 3.0], [5.0, 10.0]]; times (1 + A_ls) = (1.2, 1.8):
    expected = torch.tensor([[[[1.8, 5.4]], [[6.0, 18.0]]]])
    torch.testing.assert_close(G.apply_local_attention(features, a_lc, a_ls), expected)
    # switched off: the attention's term disappears
    torch.testing.assert_close(G.apply_local_attention(features, a_lc, None), torch.tensor([[[[1.5, 3.0]], [[5.0, 10.0]]]]))
    torch.testing.assert_close(G.apply_local_attention(features, None, a_ls), features * torch.tensor([1.2, 1.8]))


def test_local_stream_of_the_head_follows_the_formula():
    torch.manual_seed(0)
    head = small_head()
    x = torch.rand(1, 16, 4, 6)
    with torch.no_grad():  # constant attentions: A_lc = sigmoid(0.3), A_ls = sigmoid(-1)
        head.local_channel.gate.conv.weight.zero_()
        head.local_channel.gate.conv.bias.fill_(0.3)
        head.local_spatial.fuse.weight.zero_()
        head.local_spatial.fuse.bias.fill_(-1.0)
    a, s = 1 / (1 + math.exp(-0.3)), 1 / (1 + math.exp(1.0))
    torch.testing.assert_close(head.local_stream(x), x * (1 + a) * (1 + s))


def test_global_channel_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    x = torch.rand(2, 6, 3, 4)
    q, k = torch.rand(2, 6), torch.rand(2, 6)
    a = G.global_channel_attention_matrix(q, k)
    explicit = torch.softmax(k[:, :, None] @ q[:, None, :], dim=1)  # softmax(K^T Q) over keys
    torch.testing.assert_close(a, explicit)
    torch.testing.assert_close(a.sum(dim=1), torch.ones(2, 6))
    v = x.flatten(2).transpose(1, 2)  # V_c (B, HW, C)
    torch.testing.assert_close(G.global_channel_attention(x, q, k), (v @ a).transpose(1, 2).reshape(2, 6, 3, 4))


@pytest.mark.parametrize("channels_last", [False, True])
def test_series_channel_attention_equals_the_matrix_form_with_its_gradients(channels_last):
    # Sigmoid gates (the module's Q_c, K_c) and enough channels that the series form is chosen.
    torch.manual_seed(0)
    x = torch.randn(2, 96, 5, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    q, k = torch.rand(2, 96), torch.rand(2, 96)
    bound = float(q.max() * k.max())
    assert G.series_terms(bound) is not None and 2 * G.series_terms(bound) < 96
    leaves = [t.clone().requires_grad_(True) for t in (x, q, k)]
    series = G.global_channel_attention(*leaves)
    reference = [t.clone().double().requires_grad_(True) for t in (x, q, k)]
    matrix = G.global_channel_attention(*reference, method="matrix")
    torch.testing.assert_close(series.double(), matrix, rtol=1e-6, atol=1e-6)
    assert series.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    weights = torch.randn(series.shape, dtype=torch.float64)
    (series.double() * weights).sum().backward()
    (matrix * weights).sum().backward()
    for mine, exact in zip(leaves, reference):
        torch.testing.assert_close(mine.grad.double(), exact.grad, rtol=1e-5, atol=1e-5)


def test_series_terms_bound_the_truncation_and_large_logits_use_the_matrix():
    for bound in (0.25, 1.0, 2.0):
        terms = G.series_terms(bound)
        truncated = sum(bound ** n / math.factorial(n) for n in range(terms))
        assert (math.exp(bound) - truncated) / math.exp(-bound) < G.SERIES_TOLERANCE
    assert G.series_terms(0.5) < G.series_terms(1.0) < G.series_terms(2.0)
    assert G.series_terms(20.0) is None and G.series_terms(float("inf")) is None
    torch.manual_seed(0)
    x, q, k = torch.randn(1, 96, 3, 3), torch.rand(1, 96), torch.rand(1, 96)
    # scale 40: logits up to ~40, far beyond the series; the matrix form (with its max-subtracted
    # softmax) is used and stays finite
    out = G.global_channel_attention(x, q, k, scale=40.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, G.global_channel_attention(x, q, k, scale=40.0, method="matrix"))
    with pytest.raises(ValueError, match="method"):
        G.global_channel_attention(x, q, k, method="fast")


def test_composed_local_spatial_attention_equals_the_formula_as_written():
    torch.manual_seed(0)
    module = LocalSpatialAttention(24, 16, (1, 2, 3))
    x = torch.randn(2, 24, 9, 11)
    composed = module(x)
    grads = torch.autograd.grad(composed.sum(), list(module.parameters()))
    module.composed = False
    written = module(x)
    written_grads = torch.autograd.grad(written.sum(), list(module.parameters()))
    torch.testing.assert_close(composed, written, rtol=1e-5, atol=1e-6)
    for mine, exact in zip(grads, written_grads):
        torch.testing.assert_close(mine, exact, rtol=1e-4, atol=1e-5)


def test_global_spatial_attention_matches_materialised_softmax():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 3, 5), torch.randn(2, 4, 3, 5), torch.randn(2, 3, 3, 5)
    flat = lambda t: t.flatten(2)  # (B, C', N)  # noqa: E731
    a_gs = torch.softmax(flat(k).transpose(1, 2) @ flat(q), dim=1)  # (B, N_keys, N_queries), K_s^T Q_s
    expected = (flat(v) @ a_gs).reshape(2, 3, 3, 5)  # V_s A_gs
    torch.testing.assert_close(G.global_spatial_attention(q, k, v), expected, rtol=1e-4, atol=1e-5)


def test_global_stream_formula():
    torch.manual_seed(0)
    f, g_c, g_s = torch.rand(1, 3, 2, 2), torch.rand(1, 3, 2, 2), torch.randn(1, 3, 2, 2)
    torch.testing.assert_close(G.apply_global_attention(f, g_c, g_s), (f * g_c) * g_s + f * g_c)
    torch.testing.assert_close(G.apply_global_attention(f, None, g_s), f * g_s + f)
    torch.testing.assert_close(G.apply_global_attention(f, g_c, None), f * g_c)


def test_fusion_starts_near_identity_and_all_off_is_exact_identity():
    torch.manual_seed(0)
    x = torch.rand(2, 16, 5, 5)
    head = small_head()
    torch.testing.assert_close(head.fusion_weights(), torch.tensor([0.01, 0.01, 0.98]))
    fused = head(x)
    assert (fused - x).abs().max() < 0.1 * x.abs().max()
    off = small_head(**{s: False for s in SWITCHES})
    assert off(x) is x or torch.equal(off(x), x)
    assert len(list(off.parameters())) == 1  # only the fusion logits remain


@pytest.mark.parametrize("switch", SWITCHES)
def test_each_switch_changes_the_output(switch):
    torch.manual_seed(0)
    x = torch.rand(2, 16, 6, 6)
    torch.manual_seed(1)
    full = small_head()
    torch.manual_seed(1)
    reduced = small_head(**{switch: False})
    # share the parameters the two heads have in common, so only the switch differs
    reduced.load_state_dict({k: v for k, v in full.state_dict().items() if k in reduced.state_dict()})
    assert getattr(reduced, switch) is None
    assert not torch.allclose(full(x), reduced(x), atol=1e-6)


def test_gradients_reach_every_attention_parameter():
    torch.manual_seed(0)
    head = small_head()
    x = torch.rand(2, 16, 5, 6, requires_grad=True)
    head(x).pow(2).sum().backward()
    for name, parameter in head.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_global_spatial_attention_never_builds_the_hw_by_hw_matrix():
    # a 1024 x 768 image at stride 16 gives a 64 x 48 map: N = 3072, N^2 = 9.4 M entries
    torch.manual_seed(0)
    module = GlobalSpatialAttention(32, 16)
    x = torch.rand(1, 32, 64, 48, requires_grad=True)
    n = 64 * 48
    recorder = _LargestTensor()
    with recorder:
        module(x).sum().backward()
    assert recorder.largest <= x.numel() < n * n // 10, recorder.largest  # nothing bigger than the input


def test_global_spatial_attention_peak_memory_is_bounded_at_large_maps():
    # 1024 x 768 at stride 8 (128 x 96 map, N = 12288): an N x N float matrix would be 604 MB.
    # Run in a fresh process so ru_maxrss (a lifetime peak) measures this computation only.
    script = textwrap.dedent(
        """
        import resource, torch
        from glam.modules import GlobalSpatialAttention
        torch.set_num_threads(1)
        torch.manual_seed(0)
        module = GlobalSpatialAttention(64, 32)
        x = torch.rand(1, 64, 128, 96)
        with torch.no_grad():
            module(x[:, :, :8, :8])
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with torch.no_grad():
            out = module(x)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert out.shape == x.shape and torch.isfinite(out).all()
        print((after - before) / 1024.0)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    growth_mb = float(result.stdout.strip().splitlines()[-1])
    n_by_n_mb = 12288 ** 2 * 4 / 2**20
    assert growth_mb < n_by_n_mb / 4, f"peak RSS grew {growth_mb:.0f} MB (N x N would be {n_by_n_mb:.0f} MB)"


def test_head_under_bfloat16_autocast_follows_float32():
    # mixed precision: the series factors stay float32, the products run in bfloat16
    torch.manual_seed(0)
    head = GlamHead(64, local_reduced_channels=16, global_reduced_channels=16, fusion_init_logits=(0.0, 0.0, 0.0)).eval()
    x = torch.rand(1, 64, 9, 7).contiguous(memory_format=torch.channels_last)
    assert 2 * G.series_terms(1.0) < 64          # the series form of the channel attention runs
    with torch.inference_mode():
        exact = head(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = head(x)
    assert torch.isfinite(mixed).all()
    torch.testing.assert_close(mixed.float(), exact, rtol=3e-2, atol=3e-2)


def test_composed_local_spatial_attention_follows_weight_changes_without_gradients():
    # without gradients the composition is kept between calls: a changed weight must still count
    torch.manual_seed(0)
    module = LocalSpatialAttention(24, 16, (1, 2, 3))
    x = torch.randn(1, 24, 7, 8)
    with torch.no_grad():
        before = module(x)
        module.reduce.weight.mul_(-2.0)
        after = module(x)
    with torch.inference_mode():
        in_inference = module(x)
    module.composed = False
    with torch.no_grad():
        written = module(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, written, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(in_inference, written, rtol=1e-5, atol=1e-6)
