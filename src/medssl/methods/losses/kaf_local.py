"""KAF's losses (docs/kaf.md#one-step): the global positional contrastive loss and the local matching loss.

* :func:`kaf_global_loss`: PCL's SupCon (τ, τ_b, positives |pos_i − pos_j| < θ plus the other view) over
  the 2B embeddings [view 1; view 2], restricted to the items marked ``valid`` (an item whose view has no
  keypoint has no z_kp: both of its rows leave the loss instead of turning it into NaN).
* :func:`kaf_local_loss`: from the Sinkhorn log-assignment log P (B, N1+1, N2+1) and the boolean target of
  :func:`.kaf_correspondence.match_target` (matched pairs 𝓜 in the score block, unmatched keypoints 𝓘 / 𝓙
  in the dustbin column / row):

  - ``form="code"`` (the released code; both presets): clamp log P to [−100, 0]; per sample pos = mean over
    𝓜 of −log P, neg = mean over 𝓘 ∪ 𝓙 of −log P; pos and neg are each averaged over the samples that have
    such terms; L = pos_weight·pos + neg_weight·neg (0.45, 1.0). A batch without any match gives neg only.
  - ``form="paper"`` (eq. 2): per sample −Σ_𝓜 log P − Σ_𝓘 log P − Σ_𝓙 log P, averaged over the samples.

  Samples with no target at all (no valid keypoint in either view) are left out; if none is left the loss
  is 0, still attached to the graph.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .positions import pcl_positive_mask
from .supcon import supcon

__all__ = ["kaf_global_loss", "kaf_local_loss", "local_terms"]


def kaf_global_loss(z: Tensor, rel_pos: Tensor, theta: float, tau: float, base_tau: float = 0.07,
                    valid: Tensor | None = None, scan: Tensor | None = None) -> Tensor:
    """SupCon with PCL positives on ``z`` (2B, D) = [view 1; view 2]; ``valid`` (B,) keeps items (default all);
    ``scan`` (B,) ids keep positives within each scan."""
    b = z.shape[0] // 2
    if z.shape[0] != 2 * b or torch.as_tensor(rel_pos).numel() != b:
        raise ValueError(f"kaf_global_loss: z must stack two views of the {torch.as_tensor(rel_pos).numel()} items, "
                         f"got {tuple(z.shape)}")
    pos = torch.as_tensor(rel_pos, dtype=torch.float64).reshape(-1).cpu()
    if valid is not None:
        keep = torch.as_tensor(valid, dtype=torch.bool).reshape(-1).cpu()
        if int(keep.sum()) < 1:
            return z.sum() * 0.0
        idx = torch.nonzero(keep).reshape(-1)
        z = torch.cat([z[: b][idx.to(z.device)], z[b:][idx.to(z.device)]])
        pos = pos[idx]
        scan = None if scan is None else torch.as_tensor(scan).reshape(-1).cpu()[idx]
    return supcon(z, pcl_positive_mask(pos, theta, scan).to(z.device), tau, base_tau)


def local_terms(log_p: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Boolean masks (B, N1+1, N2+1) of the positive (score-block) and dustbin target entries."""
    pos = target.clone()
    pos[:, -1, :] = False
    pos[:, :, -1] = False
    neg = target & ~pos
    neg[:, -1, -1] = False  # the dustbin-dustbin corner is never a target
    return pos, neg


def kaf_local_loss(log_p: Tensor, target: Tensor, form: str = "code", pos_weight: float = 0.45,
                   neg_weight: float = 1.0, clamp: float = -100.0) -> tuple[Tensor, dict]:
    """Local matching loss and logs {n_matches, n_unmatched, pos, neg} (see the module docstring)."""
    if log_p.shape != target.shape:
        raise ValueError(f"kaf_local_loss: log_p {tuple(log_p.shape)} and target {tuple(target.shape)} differ")
    pos_m, neg_m = local_terms(log_p, target.to(log_p.device))
    nll = -log_p.clamp(min=clamp, max=0.0) if form == "code" else -log_p
    zero = log_p.new_zeros(())
    pos_sum = torch.where(pos_m, nll, zero).sum((1, 2))
    neg_sum = torch.where(neg_m, nll, zero).sum((1, 2))
    n_pos = pos_m.sum((1, 2)).to(log_p.dtype)
    n_neg = neg_m.sum((1, 2)).to(log_p.dtype)
    logs = {"n_matches": float(n_pos.sum()), "n_unmatched": float(n_neg.sum())}
    if form == "paper":
        has = (n_pos + n_neg) > 0
        loss = (pos_sum + neg_sum)[has].mean() if bool(has.any()) else log_p.sum() * 0.0
        return loss, logs
    if form != "code":
        raise ValueError(f"kaf_local_loss: form must be 'code' or 'paper', got {form!r}")
    has_pos, has_neg = n_pos > 0, n_neg > 0
    pos = (pos_sum[has_pos] / n_pos[has_pos]).mean() if bool(has_pos.any()) else None
    neg = (neg_sum[has_neg] / n_neg[has_neg]).mean() if bool(has_neg.any()) else None
    loss = log_p.sum() * 0.0
    if pos is not None:
        loss = loss + pos_weight * pos
        logs["pos"] = float(pos.detach())
    if neg is not None:
        loss = loss + neg_weight * neg
        logs["neg"] = float(neg.detach())
    return loss, logs
