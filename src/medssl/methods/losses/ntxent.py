"""NT-Xent, the SimCLR loss (docs/methods.md#simclr).

For 2N L2-normalised projections with s_ij = z_i·z_j/τ,
ℓ(i, j) = −log(exp(s_ij) / Σ_{k≠i} exp(s_ik)) and L is the mean of ℓ over the 2N
(anchor, partner) pairs. Written as one cross-entropy over the logit matrix Z Zᵀ/τ
whose diagonal is −∞ (no Python loop over the batch, unlike the PolyCL code; the
graph is kept, so the loss is differentiable).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """NT-Xent of two views ``z1``, ``z2`` of shape (N, D); row k of each is item k.

    The projections are L2-normalised here. Rows 0..N−1 of the stacked matrix are
    view 1, rows N..2N−1 view 2; the target of row i is its partner (i ± N).
    Returns the mean over the 2N rows (= (1/2N) Σ_k [ℓ(k, k′) + ℓ(k′, k)]).
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"nt_xent needs two (N, D) tensors of equal shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if tau <= 0:
        raise ValueError(f"nt_xent: tau must be > 0, got {tau}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2], dim=0), dim=1)
    logits = (z @ z.t()) / tau
    eye = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))
    idx = torch.arange(n, device=z.device)
    target = torch.cat([idx + n, idx])
    return F.cross_entropy(logits, target)
