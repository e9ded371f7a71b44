"""The SupCon form shared by PCL and the PCL-code SimCLR/GCL (docs/methods.md#the-supcon-loss).

Over the 2B embeddings (two views per item) with cosine similarity sim,

    L = mean_i −(τ/τ_b)·(1/|P(i)|) Σ_{j∈P(i)} [ sim_ij/τ − log Σ_{k≠i} exp(sim_ik/τ) ]

With P(i) = {other view of i} this is (τ/τ_b)·NT-Xent. The positive mask
decides the method: identity/other-view (SimCLR), |pos_i − pos_j| < θ (PCL),
same partition (GCL ``supcon_partition``); see :mod:`.positions`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def supcon(
    z: torch.Tensor, positive_mask: torch.Tensor, tau: float, base_tau: float = 0.07
) -> torch.Tensor:
    """SupCon loss of ``z`` (M, D) with a boolean ``positive_mask`` (M, M).

    * ``z`` is L2-normalised here (sim = cosine).
    * The diagonal of ``positive_mask`` is ignored (self is never a positive, and
      self is excluded from the denominator: k ≠ i).
    * **Rows with no positive** (|P(i)| = 0) contribute nothing and are left out of
      the mean: the loss is the mean over the rows with |P(i)| ≥ 1. This equals the
      (1/2B) Σ_i of the definition whenever every row has a positive, which holds for every
      mask built in :mod:`.positions` (they always contain the other view). If no
      row has a positive the loss is ``0`` (still attached to the graph of ``z``).
      The reference SupCon code divides by |P(i)| = 0 there and returns NaN.
    """
    if z.dim() != 2:
        raise ValueError(f"supcon needs z of shape (M, D), got {tuple(z.shape)}")
    m = z.shape[0]
    if positive_mask.shape != (m, m):
        raise ValueError(f"supcon: positive_mask must be ({m}, {m}), got {tuple(positive_mask.shape)}")
    if tau <= 0 or base_tau <= 0:
        raise ValueError(f"supcon: tau and base_tau must be > 0, got {tau}, {base_tau}")
    if m < 2:
        raise ValueError("supcon needs at least 2 embeddings")
    zn = F.normalize(z, dim=1)
    logits = (zn @ zn.t()) / tau
    eye = torch.eye(m, dtype=torch.bool, device=z.device)
    log_den = torch.logsumexp(logits.masked_fill(eye, float("-inf")), dim=1, keepdim=True)
    log_prob = logits - log_den  # finite everywhere (the diagonal of logits is not −∞ here)
    pos = positive_mask.to(device=z.device, dtype=torch.bool) & ~eye
    n_pos = pos.sum(dim=1)
    valid = n_pos > 0
    if not bool(valid.any()):
        return zn.sum() * 0.0
    mean_log_prob = torch.where(pos, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    mean_log_prob = mean_log_prob[valid] / n_pos[valid].to(log_prob.dtype)
    return -(tau / base_tau) * mean_log_prob.mean()
