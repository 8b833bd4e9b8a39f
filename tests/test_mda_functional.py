"""mda.functional: attention, pooling, Hellinger distance, diversity penalty, contrastive loss, top-n."""
import math

import pytest
import torch

from mda import functional as MF

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_dynamic_attention_matches_formula_and_is_non_negative():
    torch.manual_seed(0)
    groups = torch.randn(2, 3, 5, 4, 6)
    indicator = torch.rand(2, 3, 5)
    out = MF.dynamic_attention(groups, indicator, "relu")
    assert out.shape == (2, 3, 4, 6) and out.dtype == torch.float32
    expected = torch.relu((groups * indicator[..., None, None]).sum(2))
    torch.testing.assert_close(out, expected)
    assert (MF.dynamic_attention(groups, indicator, "softplus") > 0).all()
    with pytest.raises(ValueError, match="does not match"):
        MF.dynamic_attention(groups, torch.rand(2, 3, 4))
    with pytest.raises(ValueError, match="unknown attention activation"):
        MF.dynamic_attention(groups, indicator, "tanh")


def test_attention_pool_is_weighted_sum_l2_normalised():
    attention = torch.zeros(1, 2, 2, 2)
    attention[0, 0, 0, 0] = 1.0           # head 0 looks at one location
    attention[0, 1] = 1.0                 # head 1 everywhere
    local = torch.arange(3 * 4, dtype=torch.float32).reshape(1, 3, 2, 2)
    pooled = MF.attention_pool(attention, local)
    assert pooled.shape == (1, 2, 3)
    torch.testing.assert_close(pooled.norm(dim=-1), torch.ones(1, 2))
    head0 = local[0, :, 0, 0] / local[0, :, 0, 0].norm()
    head1 = local[0].sum((1, 2)) / local[0].sum((1, 2)).norm()
    torch.testing.assert_close(pooled[0, 0], head0)
    torch.testing.assert_close(pooled[0, 1], head1)


def test_hellinger_distance_hand_computed():
    p = torch.tensor([0.5, 0.5, 0.0, 0.0])
    q = torch.tensor([0.0, 0.0, 0.5, 0.5])
    r = torch.tensor([0.25, 0.25, 0.25, 0.25])
    assert MF.hellinger_distance(p, q).item() == pytest.approx(1.0, abs=1e-5)         # disjoint
    assert MF.hellinger_distance(p, p).item() == pytest.approx(0.0, abs=1e-5)   # equal
    # <sqrt p, sqrt r> = 2 * sqrt(0.5 * 0.25) = sqrt(0.5)
    assert MF.hellinger_distance(p, r).item() == pytest.approx(math.sqrt(1 - math.sqrt(0.5)), rel=1e-5)
    # equals ||sqrt p - sqrt r|| / sqrt 2
    assert MF.hellinger_distance(p, r).item() == pytest.approx(
        (p.sqrt() - r.sqrt()).norm().item() / math.sqrt(2), rel=1e-5)
    # batched over leading axes, finite gradient at p == q
    a = torch.tensor([[0.2, 0.8], [0.5, 0.5]], requires_grad=True)
    MF.hellinger_distance(a, a.detach()).sum().backward()
    assert torch.isfinite(a.grad).all()


def test_diversity_penalty_falls_when_maps_are_pushed_apart():
    same = torch.zeros(1, 2, 4, 4)
    same[0, :, 1, 1] = 5.0
    apart = same.clone()
    apart[0, 1, 1, 1] = 0.0
    apart[0, 1, 3, 3] = 5.0
    penalty_same = MF.diversity_penalty(same).item()
    penalty_apart = MF.diversity_penalty(apart).item()
    assert penalty_same == pytest.approx(1.0, abs=1e-3)
    assert penalty_apart < penalty_same - 0.1
    # by gradient descent on the maps: the penalty keeps falling
    maps = torch.randn(2, 3, 5, 5).mul(0.1).requires_grad_(True)
    optimizer = torch.optim.SGD([maps], lr=5.0)
    values = []
    for _ in range(20):
        loss = MF.diversity_penalty(maps)
        values.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert values[-1] < values[0] - 0.05
    assert MF.diversity_penalty(torch.rand(2, 1, 3, 3)).item() == 0.0        # one head: nothing


def test_contrastive_loss_cirtorch_values():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    label = torch.tensor([1, 0, 0])
    d = math.sqrt(2)
    # positive: 0.5 d^2 = 1; negative beyond the margin 0.7: 0; identical negative: 0.5 * 0.7^2
    loss = MF.contrastive_loss(a, b, label, margin=0.7)
    assert loss.item() == pytest.approx(0.5 * d ** 2 + 0 + 0.5 * 0.49)
    per_head = MF.contrastive_loss(torch.stack([a, a], 1), torch.stack([b, b], 1), label, margin=0.7)
    assert per_head.item() == pytest.approx(2 * loss.item())
    with pytest.raises(ValueError, match="label"):
        MF.contrastive_loss(a, b, torch.tensor([1, 0]), margin=0.7)


def test_select_top_locations_exact_points():
    scale0 = torch.zeros(2, 3, 4)
    scale0[0, 1, 2] = 9.0          # head 0 (y=1, x=2)
    scale0[1, 1, 2] = 8.0          # head 1 same location: weaker
    scale0[1, 0, 3] = 7.0          # head 1 (y=0, x=3)
    scale1 = torch.zeros(2, 2, 2)
    scale1[1, 1, 0] = 8.5          # head 1 at scale 1 (y=1, x=0)
    selection = MF.select_top_locations([scale0, scale1], 3)
    assert selection.score.tolist() == [9.0, 8.5, 7.0]
    assert selection.scale_index.tolist() == [0, 1, 0]
    assert selection.head.tolist() == [0, 1, 1]
    assert selection.y.tolist() == [1, 1, 0]
    assert selection.x.tolist() == [2, 0, 3]
    # without unique locations the same cell can be chosen by both heads
    every = MF.select_top_locations([scale0, scale1], 3, unique_locations=False)
    assert every.score.tolist() == [9.0, 8.5, 8.0]
    assert every.head.tolist() == [0, 1, 1] and every.x.tolist() == [2, 0, 2]
    # n larger than the number of locations: all of them
    assert MF.select_top_locations([scale0], 100).score.numel() == 12
    assert MF.select_top_locations([scale0], 100, unique_locations=False).score.numel() == 24


def test_select_top_locations_skips_border_cells():
    attention = torch.zeros(2, 5, 6)
    attention[0, 0, 3] = 9.0       # top row: a border cell
    attention[1, 2, 5] = 8.0       # right column: a border cell
    attention[0, 2, 2] = 5.0       # interior
    attention[1, 1, 4] = 4.0       # interior (one cell in)
    chosen = MF.select_top_locations([attention], 2, border_cells=1)
    assert chosen.score.tolist() == [5.0, 4.0]
    assert chosen.y.tolist() == [2, 1] and chosen.x.tolist() == [2, 4] and chosen.head.tolist() == [0, 1]
    assert MF.select_top_locations([attention], 100, border_cells=1).score.numel() == 3 * 4
    per_head = MF.select_top_locations([attention], 100, unique_locations=False, border_cells=1)
    assert per_head.score.numel() == 2 * 3 * 4 and per_head.score[0] == 5.0
    # the margin takes at most a quarter of a side's cells (of side - 1, rounded down)
    assert MF.interior_mask(9, 13, 2).sum().item() == (9 - 4) * (13 - 4)
    assert MF.interior_mask(8, 13, 2).sum().item() == (8 - 2) * (13 - 4)
    assert MF.interior_mask(4, 3, 5).sum().item() == 4 * 3
    assert MF.interior_mask(1, 1, 3).tolist() == [[True]]
    assert MF.select_top_locations([attention], 100, border_cells=2).score.numel() == 3 * 4
    with pytest.raises(ValueError, match="border_cells"):
        MF.select_top_locations([attention], 2, border_cells=-1)
