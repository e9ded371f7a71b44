"""Tests of the contrastive losses (docs/methods.md).

Reference values are written out by hand from 2D unit vectors at known angles:
cos 0° = 1, cos 30° = √3/2, cos 60° = ½, cos 90° = 0, cos 120° = −½, cos 180° = −1.
"""

from __future__ import annotations

import math

import pytest
import torch

from medssl.errors import ConfigError
from medssl.methods.losses import (
    extract_regions,
    gcl_global_loss,
    gcl_local_loss,
    gcl_partition,
    nt_xent,
    other_view_mask,
    partition_positive_mask,
    pcl_positive_mask,
    polycl_infonce,
    region_coords,
    region_neighbours,
    supcon,
)

R3 = math.sqrt(3) / 2
E = math.exp


def unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def vecs(*degs: float) -> torch.Tensor:
    return torch.tensor([unit(d) for d in degs], dtype=torch.float64)


def ell(c_pos: float, c_negs: list[float], tau: float = 1.0) -> float:
    """−log(e^{c⁺/τ} / (e^{c⁺/τ} + Σ e^{c⁻/τ})) for hand-listed cosines."""
    return -math.log(E(c_pos / tau) / (E(c_pos / tau) + sum(E(c / tau) for c in c_negs)))


# ---------------------------------------------------------------- NT-Xent / SupCon
def test_ntxent_hand_value():
    # u0 = 0°, u1 = 90° (view 1); u2 = 60°, u3 = 180° (view 2); τ = 0.5, so s = 2·cos.
    z1, z2 = vecs(0, 90), vecs(60, 180)
    rows = [
        -math.log(E(1.0) / (E(0.0) + E(1.0) + E(-2.0))),  # u0: partner u2 (cos ½); others u1 (0), u3 (−1)
        -math.log(E(0.0) / (E(0.0) + E(2 * R3) + E(0.0))),  # u1: partner u3 (0); u0 (0), u2 (√3/2)
        -math.log(E(1.0) / (E(1.0) + E(2 * R3) + E(-1.0))),  # u2: partner u0 (½); u1 (√3/2), u3 (−½)
        -math.log(E(0.0) / (E(-2.0) + E(0.0) + E(-1.0))),  # u3: partner u1 (0); u0 (−1), u2 (−½)
    ]
    assert nt_xent(z1, z2, tau=0.5).item() == pytest.approx(sum(rows) / 4, abs=1e-12)


def _ntxent_loop(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> float:
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1).tolist()
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        j = (i + n2 // 2) % n2
        sims = [sum(a * b for a, b in zip(z[i], z[k])) / tau for k in range(n2)]
        total += -sims[j] + math.log(sum(math.exp(sims[k]) for k in range(n2) if k != i))
    return total / n2


def test_ntxent_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(6, 8, generator=g, dtype=torch.float64)
    for tau in (0.1, 0.5):
        assert abs(nt_xent(z1, z2, tau).item() - _ntxent_loop(z1, z2, tau)) < 1e-6
    # float32 as in training
    assert abs(nt_xent(z1.float(), z2.float(), 0.2).item() - _ntxent_loop(z1, z2, 0.2)) < 1e-5


def test_supcon_hand_value_and_empty_row():
    # same embeddings as above, τ = 0.5, τ_b = 0.07; P(0) = {1, 2}, P(1) = {3}, P(2) = {0}, P(3) = {} (row left out)
    z = torch.cat([vecs(0, 90), vecs(60, 180)])
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 1] = mask[0, 2] = mask[1, 3] = mask[2, 0] = True
    mask[3, 3] = True  # self is ignored
    lden0 = math.log(E(0.0) + E(1.0) + E(-2.0))
    lden1 = math.log(E(0.0) + E(2 * R3) + E(0.0))
    lden2 = math.log(E(1.0) + E(2 * R3) + E(-1.0))
    row0 = -0.5 * ((0.0 - lden0) + (1.0 - lden0))
    row1 = -(0.0 - lden1)
    row2 = -(1.0 - lden2)
    expected = (0.5 / 0.07) * (row0 + row1 + row2) / 3
    assert supcon(z, mask, tau=0.5).item() == pytest.approx(expected, abs=1e-10)
    empty = supcon(z.clone().requires_grad_(), torch.zeros(4, 4, dtype=torch.bool), tau=0.5)
    assert empty.item() == 0.0 and empty.requires_grad


def test_supcon_identity_mask_is_scaled_ntxent():
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g)
    for tau in (0.1, 0.5):
        got = supcon(torch.cat([z1, z2]), other_view_mask(5), tau=tau, base_tau=0.07)
        assert got.item() == pytest.approx((tau / 0.07) * nt_xent(z1, z2, tau).item(), rel=1e-5)


# ---------------------------------------------------------------- PCL / partitions
def test_pcl_mask_strict_theta_and_other_view():
    pos = torch.tensor([(i + 1) / 10 for i in (0, 2, 3, 5, 9)])  # 0.1, 0.3, 0.4, 0.6, 1.0
    expected_sizes = {  # |P(i)| for items 0..4 (same for both views)
        0.0: [1, 1, 1, 1, 1],  # only the other view
        0.1: [1, 1, 1, 1, 1],  # 0.4 − 0.3 = 0.1 is not < 0.1
        0.2: [1, 3, 3, 1, 1],  # 0.3 ↔ 0.4 (both views of the other item); 0.2 gaps excluded
        0.25: [3, 5, 5, 3, 1],  # 0.2 gaps now included; 1.0 stays alone
        0.9: [7, 9, 9, 9, 7],  # everything except the 0.1 ↔ 1.0 pair (gap 0.9 is not < 0.9)
    }
    for theta, sizes in expected_sizes.items():
        m = pcl_positive_mask(pos, theta)
        assert m.shape == (10, 10) and not m.diagonal().any()
        assert torch.equal(m, m.t())
        assert m.sum(1).tolist() == sizes + sizes, theta
        assert all(m[i, i + 5] and m[i + 5, i] for i in range(5))
    m = pcl_positive_mask(pos, 0.2)
    assert m[1, 2] and m[1, 7] and not m[2, 3] and not m[0, 1]


@pytest.mark.parametrize(
    "z, parts",
    [
        (10, [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]),  # q = round_half_up(2.5) = 3 (banker's rounding would give 2)
        (11, [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3]),  # q = round(2.75) = 3
        (13, [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3]),  # q = round(3.25) = 3, tail clamped to 3
        (14, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3]),  # q = round(3.5) = 4
        (1, [0]),  # q = max(1, 0) = 1
    ],
)
def test_gcl_partition_rounding(z, parts):
    assert [gcl_partition(i, z) for i in range(z)] == parts
    assert gcl_partition(torch.arange(z), z).tolist() == parts
    with pytest.raises(ValueError):
        gcl_partition(z, z)


def test_partition_positive_mask():
    m = partition_positive_mask(torch.tensor([0, 0, 1]))
    expected = torch.tensor(
        [
            [0, 1, 0, 1, 1, 0],
            [1, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
            [1, 1, 0, 0, 1, 0],
            [1, 1, 0, 1, 0, 0],
            [0, 0, 1, 0, 0, 0],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(m, expected)


# ---------------------------------------------------------------- GCL global
# 3 images: item 0 (partition 0, volume 0) at 0°, item 1 (partition 0, volume 1) at 90°,
# item 2 (partition 1, volume 0) at 180°; augmented copies at 60°, 90°, 180°. τ = 1.
# Embedding order: u0, u1, u2 = images, u3, u4, u5 = augmented copies.
GCL_Z, GCL_ZA = vecs(0, 90, 180), vecs(60, 90, 180)
GCL_PARTS, GCL_VOLS = torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0])
NEG_PART0 = {0: [-1, -1], 1: [0, 0], 3: [-0.5, -0.5], 4: [0, 0]}  # cos to u2, u5 (the other partition)
NEG_PART1 = [-1, 0, -0.5, 0]  # cos of u2 (or u5, same angle) to u0, u1, u3, u4


def test_gcl_gd_hand_value():
    # Λ⁺: (0,3), (1,4), (2,5) + same partition / other volume: (0,1), (0,4), (3,1), (3,4) → 7 pairs
    directed = [
        (0.5, NEG_PART0[0]), (0.5, NEG_PART0[3]),  # (0,3), (3,0)
        (1.0, NEG_PART0[1]), (1.0, NEG_PART0[4]),  # (1,4), (4,1)
        (1.0, NEG_PART1), (1.0, NEG_PART1),  # (2,5), (5,2)
        (0.0, NEG_PART0[0]), (0.0, NEG_PART0[1]),  # (0,1), (1,0)
        (0.0, NEG_PART0[0]), (0.0, NEG_PART0[4]),  # (0,4), (4,0)
        (R3, NEG_PART0[3]), (R3, NEG_PART0[1]),  # (3,1), (1,3)
        (R3, NEG_PART0[3]), (R3, NEG_PART0[4]),  # (3,4), (4,3)
    ]
    expected = sum(ell(c, negs) for c, negs in directed) / 7
    got = gcl_global_loss(GCL_Z, GCL_ZA, GCL_PARTS, GCL_VOLS, tau=1.0, strategy="GD").item()
    assert got == pytest.approx(expected, abs=1e-10)


def test_gcl_gd_denominator_excludes_same_partition():
    # If same-partition images stayed in the denominators (negatives = all but self and the positive),
    # the value would differ: e.g. anchor u0 of (0,3) would also see u1 (0), u4 (0) as negatives.
    cos = [[math.cos(math.radians(a - b)) for b in (0, 90, 180, 60, 90, 180)] for a in (0, 90, 180, 60, 90, 180)]
    pairs = [(0, 3), (1, 4), (2, 5), (0, 1), (0, 4), (3, 1), (3, 4)]
    inclusive = sum(
        ell(cos[a][b], [cos[a][k] for k in range(6) if k not in (a, b)]) for x, y in pairs for a, b in ((x, y), (y, x))
    ) / 7
    got = gcl_global_loss(GCL_Z, GCL_ZA, GCL_PARTS, GCL_VOLS, tau=1.0, strategy="GD").item()
    assert abs(got - inclusive) > 0.1
    # and G^R, whose denominators keep the same-partition images, differs from G^{D−} on the same data
    gr = gcl_global_loss(GCL_Z, GCL_ZA, GCL_PARTS, GCL_VOLS, tau=1.0, strategy="GR").item()
    gdm = gcl_global_loss(GCL_Z, GCL_ZA, GCL_PARTS, GCL_VOLS, tau=1.0, strategy="GD-").item()
    assert abs(gr - gdm) > 0.1


def test_gcl_gd_minus_hand_value():
    # Λ⁺ = the 3 augmented pairs only; same-partition images (u1, u4 for u0) are neither positive nor negative
    directed = [
        (0.5, NEG_PART0[0]), (0.5, NEG_PART0[3]),
        (1.0, NEG_PART0[1]), (1.0, NEG_PART0[4]),
        (1.0, NEG_PART1), (1.0, NEG_PART1),
    ]
    expected = sum(ell(c, negs) for c, negs in directed) / 3
    got = gcl_global_loss(GCL_Z, GCL_ZA, GCL_PARTS, GCL_VOLS, tau=1.0, strategy="GD-").item()
    assert got == pytest.approx(expected, abs=1e-10)


def test_gcl_gr_is_twice_ntxent_and_bad_strategy():
    g = torch.Generator().manual_seed(2)
    z, za = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    parts, vols = torch.tensor([0, 1, 2, 3] * 2), torch.tensor([0] * 4 + [1] * 4)
    gr = gcl_global_loss(z, za, parts, vols, tau=0.1, strategy="GR")
    assert gr.item() == pytest.approx(2 * nt_xent(z, za, 0.1).item(), rel=1e-5)
    with pytest.raises(ConfigError, match="gcl strategy"):
        gcl_global_loss(z, za, parts, vols, strategy="GX")


# ---------------------------------------------------------------- GCL local
def test_region_coords_and_neighbours():
    # 11×11 map, K = 3: start = round_half_up(t · 8) → t = 0, ¼, ½, ¾, 1 give 0, 2, 4, 6, 8
    assert region_coords(11, 11, 3, 13) == [
        (0, 0), (0, 8), (8, 0), (8, 8),  # corners
        (0, 4), (4, 0), (4, 8), (8, 4),  # edge midpoints
        (4, 4),  # centre
        (2, 2), (2, 6), (6, 2), (6, 6),  # quarter points
    ]
    nb = region_neighbours(13, 5)
    # corner (0,0): (¼,¼) d²=⅛; (0,½), (½,0) d²=¼; centre d²=½; then (¼,¾)/(¾,¼) tie at ⅝ → lower index 10
    assert nb[0].tolist() == [9, 4, 5, 8, 10]
    # centre: the 4 quarter points (d²=⅛), then the first edge midpoint (0,½) (d²=¼, ties → index 4)
    assert nb[8].tolist() == [9, 10, 11, 12, 4]
    with pytest.raises(ConfigError):
        region_neighbours(13, 13)


def test_local_regions_aligned_for_intensity_only_views():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 1, 12, 16, generator=g)
    view = 1.2 * x + 0.1  # brightness/contrast only: no spatial change
    coords = region_coords(*x.shape[2:], 3, 13)
    assert coords == region_coords(*view.shape[2:], 3, 13)
    rx, rv = extract_regions(x, coords, 3), extract_regions(view, coords, 3)
    assert rx.shape == (2, 13, 9)
    assert torch.allclose(rv, 1.2 * rx + 0.1)
    # block u really is x[top:top+3, left:left+3]
    top, left = coords[12]
    assert torch.equal(rx[1, 12], x[1, 0, top : top + 3, left : left + 3].flatten())


def test_local_loss_hand_value():
    # 2 channels, 5×5 maps, K = 1, 2 regions ((0,0) and (0,4)), 1 negative region, τ = 1.
    f = torch.zeros(1, 2, 5, 5, dtype=torch.float64)
    fa = torch.zeros_like(f)
    f[0, :, 0, 0] = torch.tensor(unit(0), dtype=torch.float64)
    f[0, :, 0, 4] = torch.tensor(unit(90), dtype=torch.float64)
    fa[0, :, 0, 0] = torch.tensor(unit(60), dtype=torch.float64)
    fa[0, :, 0, 4] = torch.tensor(unit(90), dtype=torch.float64)
    rows = [
        ell(0.5, [0.0, 0.0]),  # f⁰ (0°): pos f̃⁰ (60°); negs f¹, f̃¹ (90°, 90°)
        ell(1.0, [0.0, R3]),  # f¹ (90°): pos f̃¹ (90°); negs f⁰ (0°), f̃⁰ (60°)
        ell(0.5, [R3, R3]),  # f̃⁰ (60°): pos f⁰; negs f̃¹, f¹ (90°)
        ell(1.0, [R3, 0.0]),  # f̃¹ (90°): pos f¹; negs f̃⁰, f⁰
    ]
    got = gcl_local_loss(f, fa, region_size=1, n_regions=2, n_neg=1, tau=1.0).item()
    assert got == pytest.approx(sum(rows) / 4, abs=1e-10)


# ---------------------------------------------------------------- PolyCL
def test_polycl_hand_value_and_inverse_batch():
    # triplet 1: a 0°, p 60°, n 90°; triplet 2: a 90°, p 90°, n 270°; vectors scaled by 3 (no normalisation needed)
    a, p, n = 3 * vecs(0, 90), 3 * vecs(60, 90), 3 * vecs(90, 270)
    tau = 0.5
    expected = (
        -math.log(E(0.5 / tau) / (E(0.5 / tau) + E(0.0 / tau))) - math.log(E(1.0 / tau) / (E(1.0 / tau) + E(-1.0 / tau)))
    ) / 2
    assert polycl_infonce(a, p, n, tau).item() == pytest.approx(expected, abs=1e-10)
    assert polycl_infonce(a, p, n, "inverse_batch").item() == pytest.approx(expected, abs=1e-10)  # τ = 1/2
    sp = torch.nn.functional.softplus((torch.tensor([0.0, -1.0]) - torch.tensor([0.5, 1.0])) / tau).mean()
    assert polycl_infonce(a, p, n, tau).item() == pytest.approx(sp.item(), abs=1e-6)


# ---------------------------------------------------------------- gradients, batch size 2
def _leaf(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_()


LOSS_CASES = {
    "nt_xent": lambda: ((a := _leaf(2, 8, seed=10)), (b := _leaf(2, 8, seed=11)), nt_xent(a, b, 0.1)),
    "supcon_pcl": lambda: (
        (a := _leaf(4, 8, seed=12)),
        supcon(a, pcl_positive_mask(torch.tensor([0.2, 0.5]), 0.1), 0.1),
    ),
    "supcon_partition": lambda: (
        (a := _leaf(4, 8, seed=13)),
        supcon(a, partition_positive_mask(torch.tensor([0, 0])), 0.1),
    ),
    "gcl_global_GD": lambda: (
        (a := _leaf(2, 8, seed=14)),
        (b := _leaf(2, 8, seed=15)),
        gcl_global_loss(a, b, torch.tensor([0, 1]), torch.tensor([0, 0]), 0.1, "GD"),
    ),
    "gcl_global_GD_no_neg": lambda: (  # one partition in two volumes: no negatives at all, still finite
        (a := _leaf(2, 8, seed=16)),
        (b := _leaf(2, 8, seed=17)),
        gcl_global_loss(a, b, torch.tensor([0, 0]), torch.tensor([0, 1]), 0.1, "GD"),
    ),
    "gcl_local": lambda: ((a := _leaf(2, 4, 12, 12, seed=18)), (b := _leaf(2, 4, 12, 12, seed=19)), gcl_local_loss(a, b)),
    "polycl": lambda: (
        (a := _leaf(2, 8, seed=20)),
        (b := _leaf(2, 8, seed=21)),
        (c := _leaf(2, 8, seed=22)),
        polycl_infonce(a, b, c, "inverse_batch"),
    ),
}


@pytest.mark.parametrize("name", sorted(LOSS_CASES))
def test_batch_two_finite_and_gradients_flow(name):
    *inputs, loss = LOSS_CASES[name]()
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for t in inputs:
        assert t.grad is not None and torch.isfinite(t.grad).all()
        if name != "gcl_global_GD_no_neg":
            assert t.grad.abs().sum() > 0
