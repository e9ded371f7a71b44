"""KAF pretraining parts (docs/kaf.md#one-step): Sinkhorn, correspondences, local and global losses, the matcher."""

from __future__ import annotations

import math

import pytest
import torch

from medssl.methods.losses.kaf_correspondence import match_target, mutual_matches, surviving_matches
from medssl.methods.losses.kaf_local import kaf_global_loss, kaf_local_loss
from medssl.models.kaf.matching import KeypointMatcher, MaskedBatchNorm1d, log_sinkhorn


# ------------------------------------------------------------------ Sinkhorn
def test_sinkhorn_marginals_with_dustbin():
    torch.manual_seed(0)
    n1, n2 = 5, 7
    scores = torch.randn(3, n1, n2) * 3
    log_p = log_sinkhorn(scores, torch.tensor(1.0), iters=100)
    p = log_p.exp()
    assert p.shape == (3, n1 + 1, n2 + 1)
    rows, cols = p.sum(2), p.sum(1)
    assert torch.allclose(rows[:, :n1], torch.ones(3, n1), atol=1e-3)  # each keypoint: one unit of mass
    assert torch.allclose(cols[:, :n2], torch.ones(3, n2), atol=1e-3)
    assert torch.allclose(rows[:, n1], torch.full((3,), float(n2)), atol=1e-3)  # dustbin row: N2
    assert torch.allclose(cols[:, n2], torch.full((3,), float(n1)), atol=1e-3)  # dustbin column: N1
    assert bool((log_p[:, :n1, :n2] <= 1e-5).all())


def test_sinkhorn_padding_equals_unpadded_and_empty_views_are_finite():
    torch.manual_seed(1)
    scores = torch.randn(3, 6, 5, requires_grad=True)
    mask1 = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    mask2 = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    log_p = log_sinkhorn(scores, 0.5, iters=50, mask1=mask1, mask2=mask2)
    ref = log_sinkhorn(scores[:1, :4, :3], 0.5, iters=50)[0]
    got = torch.cat([torch.cat([log_p[0, :4, :3], log_p[0, :4, -1:]], 1),
                     torch.cat([log_p[0, -1:, :3], log_p[0, -1:, -1:]], 1)], 0)
    assert torch.allclose(got, ref, atol=1e-5)
    assert bool((log_p[0, 4:6, :] < -1e3).all()) and bool((log_p[0, :, 3:5] < -1e3).all())
    # sample 1: no view-1 keypoint, so both view-2 keypoints go to the dustbin row with probability 1
    assert torch.allclose(log_p[1, -1, :2].exp(), torch.ones(2), atol=1e-4)
    assert torch.isfinite(log_p).all()
    (log_p[0, :4, :3].sum() + log_p[1, -1, :2].sum() + log_p[2, -1, -1]).backward()
    assert torch.isfinite(scores.grad).all()


# ------------------------------------------------------------------ correspondences
def test_mutual_matches_constructed_case():
    r = 5.0
    pos1 = torch.tensor([[10, 10], [12, 10], [40, 40], [70, 70]])
    desc1 = torch.tensor([[0, 0], [1, 0], [5, 5], [9, 9]], dtype=torch.float32)
    pos2 = torch.tensor([[11, 10], [40, 43], [40, 60], [40, 45]])
    desc2 = torch.tensor([[0.1, 0], [5, 5.2], [9, 9], [5, 5]], dtype=torch.float32)
    pairs = mutual_matches(pos1, desc1, pos2, desc2, r)
    # a0-b0 mutual; a1's nearest is b0 but b0 prefers a0 (non-mutual); a2-b1 mutual because b3 (identical
    # descriptor) sits at Manhattan distance exactly R (strict <); a3/b2 share a descriptor but are 40 px apart
    assert pairs.tolist() == [[0, 0], [2, 1]]
    assert mutual_matches(pos1, desc1, pos2, desc2, 5.01).tolist() == [[0, 0], [2, 3]]
    assert mutual_matches(pos1[:0], desc1[:0], pos2, desc2, r).shape == (0, 2)


def test_surviving_matches_and_target():
    pairs = torch.tensor([[0, 0], [2, 1], [3, 3]])
    keep1 = torch.tensor([True, False, True, True])
    keep2 = torch.tensor([True, True, True, False])
    assert surviving_matches(pairs, keep1, keep2, compact=False).tolist() == [[0, 0], [2, 1]]
    kept = surviving_matches(pairs, keep1, keep2)  # view-1 index 2 becomes 1 once index 1 is removed
    assert kept.tolist() == [[0, 0], [1, 1]]
    mask1 = torch.tensor([[True, True, True, False], [True, False, False, False]])
    mask2 = torch.tensor([[True, True, True], [False, False, False]])
    t = match_target([kept, torch.zeros(0, 2, dtype=torch.long)], mask1, mask2)
    assert t.shape == (2, 5, 4)
    assert t[0, 0, 0] and t[0, 1, 1] and t[0, 2, 3] and t[0, 4, 2]  # matches, 𝓘 = {2}, 𝓙 = {2}
    assert int(t[0].sum()) == 4 and not t[0, 3].any()  # the padded keypoint has no target
    assert t[1, 0, 3] and int(t[1].sum()) == 1  # empty view 2: the one view-1 keypoint goes to the dustbin
    with pytest.raises(ValueError, match="padded"):
        match_target([torch.tensor([[3, 0]]), kept[:0]], mask1, mask2)


# ------------------------------------------------------------------ losses
def _tiny_log_p():
    lp = torch.full((2, 3, 3), -5.0)
    lp[0, 0, 1] = math.log(0.5)  # match (0, 1)
    lp[0, 1, 2] = math.log(0.25)  # view-1 keypoint 1 unmatched
    lp[0, 2, 0] = math.log(0.8)  # view-2 keypoint 0 unmatched
    lp[1, 0, 2] = math.log(0.9)
    lp[1, 2, 0] = math.log(0.6)
    mask1 = torch.tensor([[True, True], [True, False]])
    mask2 = torch.tensor([[True, True], [True, False]])
    target = match_target([torch.tensor([[0, 1]]), torch.zeros(0, 2, dtype=torch.long)], mask1, mask2)
    return lp, target


def test_local_loss_hand_computed():
    lp, target = _tiny_log_p()
    loss, logs = kaf_local_loss(lp, target)  # code form
    pos = -math.log(0.5)  # only sample 0 has a match
    neg = ((-math.log(0.25) - math.log(0.8)) / 2 + (-math.log(0.9) - math.log(0.6)) / 2) / 2
    assert loss.item() == pytest.approx(0.45 * pos + neg, rel=1e-6)
    assert logs["n_matches"] == 1 and logs["n_unmatched"] == 4
    paper, _ = kaf_local_loss(lp, target, form="paper")
    assert paper.item() == pytest.approx((-math.log(0.5 * 0.25 * 0.8) - math.log(0.9 * 0.6)) / 2, rel=1e-6)
    lp2 = lp.clone()
    lp2[0, 0, 1] = -200.0  # the code form clamps log P at -100
    assert kaf_local_loss(lp2, target)[0].item() == pytest.approx(0.45 * 100 + neg, rel=1e-6)
    empty = torch.zeros_like(target)
    assert kaf_local_loss(lp.requires_grad_(), empty)[0].item() == 0.0


def _hand_supcon(z, pos, theta, tau, base_tau):
    z = [[a / math.sqrt(sum(v * v for v in row)) for a in row] for row in z]
    m, b = len(z), len(z) // 2
    item = [i % b for i in range(m)]
    total = 0.0
    for i in range(m):
        sim = [sum(z[i][d] * z[k][d] for d in range(len(z[i]))) for k in range(m)]
        log_den = math.log(sum(math.exp(sim[k] / tau) for k in range(m) if k != i))
        positives = [j for j in range(m) if j != i and (abs(pos[item[i]] - pos[item[j]]) < theta
                                                          or item[j] == item[i])]
        total += -(tau / base_tau) * sum(sim[j] / tau - log_den for j in positives) / len(positives)
    return total / m


def test_global_loss_hand_computed_and_valid_mask():
    torch.manual_seed(3)
    z = torch.randn(8, 3, dtype=torch.float64)
    pos = [0.1, 0.15, 0.5, 0.2]  # |0.1 - 0.2| = 0.1 is *not* < θ = 0.1
    got = kaf_global_loss(z, torch.tensor(pos), theta=0.1, tau=0.1, base_tau=0.07)
    assert got.item() == pytest.approx(_hand_supcon(z.tolist(), pos, 0.1, 0.1, 0.07), rel=1e-9)
    valid = torch.tensor([True, True, False, True])
    sub = [z[i].tolist() for i in (0, 1, 3, 4, 5, 7)]
    got = kaf_global_loss(z, torch.tensor(pos), theta=0.1, tau=0.1, valid=valid)
    assert got.item() == pytest.approx(_hand_supcon(sub, [0.1, 0.15, 0.2], 0.1, 0.1, 0.07), rel=1e-9)
    zr = z.clone().requires_grad_()
    none = kaf_global_loss(zr, torch.tensor(pos), 0.1, 0.1, valid=torch.zeros(4, dtype=torch.bool))
    assert none.item() == 0.0 and none.requires_grad


# ------------------------------------------------------------------ matcher
def test_masked_batchnorm_matches_batchnorm_and_ignores_padding():
    torch.manual_seed(4)
    x = torch.randn(3, 6, 5)
    mbn, bn = MaskedBatchNorm1d(6), torch.nn.BatchNorm1d(6)
    assert torch.allclose(mbn(x), bn(x), atol=1e-6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    y = mbn(x, mask)
    flat = x.transpose(1, 2)[mask]
    ref = (flat - flat.mean(0)) / torch.sqrt(flat.var(0, unbiased=False) + mbn.eps)
    assert torch.allclose(y.transpose(1, 2)[mask], ref, atol=1e-5)
    assert bool((y.transpose(1, 2)[~mask] == 0).all())


def test_matcher_shapes_gradients_and_padding_invariance():
    torch.manual_seed(5)
    m = KeypointMatcher(in_dim=12, dim=16, heads=4, layers=("self", "cross"), sinkhorn_iters=10)
    g1, g2 = torch.randn(2, 12, 6, requires_grad=True), torch.randn(2, 12, 5, requires_grad=True)
    p1, p2 = torch.randint(0, 32, (2, 6, 2)).float(), torch.randint(0, 32, (2, 5, 2)).float()
    mask1 = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    mask2 = torch.tensor([[1, 1, 1, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)  # sample 1: view 2 empty
    log_p, scores = m(g1, g2, p1, p2, (32, 32), mask1, mask2)
    assert log_p.shape == (2, 7, 6) and scores.shape == (2, 6, 5)
    assert torch.isfinite(log_p).all()
    target = match_target([torch.tensor([[0, 0], [2, 3]]), torch.zeros(0, 2, dtype=torch.long)], mask1, mask2)
    loss, _ = kaf_local_loss(log_p, target)
    loss.backward()
    for t in (g1.grad, g2.grad, m.dustbin.grad, *(p.grad for p in m.parameters() if p.grad is not None)):
        assert torch.isfinite(t).all()
    assert g1.grad[0].abs().sum() > 0 and g2.grad[0].abs().sum() > 0 and m.dustbin.grad.abs() > 0
    assert bool((g1.grad[1, :, 3:] == 0).all())  # padded keypoints receive no gradient
    # padded entries (features and positions) change nothing, in training mode too (masked BN statistics)
    g1b, p1b = g1.detach().clone(), p1.clone()
    g1b[1, :, 3:] = 100.0
    p1b[1, 3:] = 31.0
    log_p2, _ = m(g1b, g2.detach(), p1b, p2, (32, 32), mask1, mask2)
    assert torch.allclose(log_p2[0], log_p[0].detach(), atol=1e-4)
    assert torch.allclose(log_p2[1, :3], log_p[1, :3].detach(), atol=1e-4)
