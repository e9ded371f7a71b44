"""PolyCL single-negative cosine InfoNCE (docs/methods.md#polycl-loss).

Per (anchor, positive, negative) triplet, with c± = cos(z, z±):

    ℓ = −log(e^{c⁺/τ} / (e^{c⁺/τ} + e^{c⁻/τ})) = softplus((c⁻ − c⁺)/τ)

averaged over the batch. One positive and one explicit negative per anchor; no
in-batch negatives. τ = 1/batch_size in the ``paper`` preset (``tau="inverse_batch"``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resolve_tau(tau: float | str, batch_size: int) -> float:
    """``tau`` as a float: ``"inverse_batch"`` gives 1/batch_size, as the released PolyCL driver."""
    if isinstance(tau, str):
        if tau != "inverse_batch":
            raise ValueError(f"polycl tau: expected a float or 'inverse_batch', got {tau!r}")
        if batch_size < 1:
            raise ValueError(f"polycl tau: batch_size must be >= 1, got {batch_size}")
        return 1.0 / batch_size
    if tau <= 0:
        raise ValueError(f"polycl tau must be > 0, got {tau}")
    return float(tau)


def polycl_infonce(
    anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, tau: float | str
) -> torch.Tensor:
    """Mean over the batch of softplus((cos(a, n) − cos(a, p))/τ); inputs (B, ...) flattened to (B, D).

    Cosine similarity needs no prior L2 normalisation. ``tau`` may be
    ``"inverse_batch"`` (τ = 1/B with B = ``anchor.shape[0]``).
    """
    if not (anchor.shape == positive.shape == negative.shape) or anchor.dim() < 2:
        raise ValueError(
            "polycl_infonce needs anchor/positive/negative of equal shape (B, ...), got "
            f"{tuple(anchor.shape)}, {tuple(positive.shape)}, {tuple(negative.shape)}"
        )
    t = resolve_tau(tau, anchor.shape[0])
    a, p, n = (x.flatten(1) for x in (anchor, positive, negative))
    c_pos = F.cosine_similarity(a, p, dim=1)
    c_neg = F.cosine_similarity(a, n, dim=1)
    return F.softplus((c_neg - c_pos) / t).mean()
