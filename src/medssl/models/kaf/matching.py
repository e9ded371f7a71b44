"""KAF's keypoint matcher and the log-domain Sinkhorn with a dustbin (docs/kaf.md#one-step,
docs/kaf.md#sinkhorn-with-a-dustbin).

The matcher is a second SuperGlue-style module on top of the per-keypoint features G of the two views:

    x_v = G_v + MLP_kp(u_v)                        u = (x, y) keypoints normalised by the input size
    for kind in layers ("self", "cross", ...):     residual MHA + MLP([x ‖ m]) updates, both views
    f_v = Conv1d(D→D)(x_v)                         one shared final projection
    S_ab = <f1_a, f2_b> / sqrt(D)                  score matrix (B, N1, N2)
    log P = log_sinkhorn(S, α, T_s)                (B, N1+1, N2+1); α: learnable dustbin score (init 1.0)

Keypoint counts vary per slice, so every function takes per-view validity masks (B, N) and padded
keypoints are ignored everywhere: as attention keys, in the BatchNorm statistics (:class:`MaskedBatchNorm1d`)
and in the Sinkhorn marginals, where each sample gets its own n = −log(N1_b + N2_b). A view with no valid
keypoint never produces NaN (masking uses a large finite negative, not −inf).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medssl.models.kaf.layer import attention, normalise_positions

__all__ = ["MaskedBatchNorm1d", "AttentionLayer", "KeypointEncoder", "KeypointMatcher", "log_sinkhorn"]

NEG = -1e9  # attention: "minus infinity" for masked keys that keeps the softmax and its gradient finite
# Sinkhorn: log-potential of rows/columns without mass (padding, an empty view's dustbin). exp() of it is 0 in
# float32, and at this magnitude float32 still resolves O(1) differences, so nothing cancels into garbage
SINKHORN_NEG = -1e4


def _norm1d(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return MaskedBatchNorm1d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels), channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    raise ValueError(f"matcher norm must be 'batch', 'group' or 'layer', got {kind!r}")


def _apply_norm(norm: nn.Module, x: Tensor, mask: Tensor | None) -> Tensor:
    return norm(x, mask) if isinstance(norm, MaskedBatchNorm1d) else norm(x)


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d over (B, C, N) whose statistics use only the valid positions ``mask`` (B, N).

    With no mask (or all valid) it is exactly ``nn.BatchNorm1d``. Padded positions are returned as 0.
    In training mode with fewer than 2 valid positions the running statistics are used (and not updated).
    """

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:  # type: ignore[override]
        if mask is None or bool(mask.all()):
            return super().forward(x)
        flat = x.transpose(1, 2)[mask]  # (M, C)
        training = self.training and flat.shape[0] > 1
        momentum = 0.0 if self.momentum is None else self.momentum
        if training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        y = F.batch_norm(flat, self.running_mean, self.running_var, self.weight, self.bias, training,
                         momentum, self.eps)
        out = x.new_zeros(x.shape[0], x.shape[2], x.shape[1])
        out = out.masked_scatter(mask.unsqueeze(-1), y)
        return out.transpose(1, 2)


def _mlp(channels: Sequence[int], norm: str) -> nn.ModuleList:
    """Conv1d stack with norm + ReLU between layers and nothing after the last (last bias 0)."""
    layers = nn.ModuleList()
    for i in range(1, len(channels)):
        layers.append(nn.Conv1d(channels[i - 1], channels[i], kernel_size=1, bias=True))
        if i < len(channels) - 1:
            layers.append(_norm1d(norm, channels[i]))
            layers.append(nn.ReLU())
    nn.init.zeros_(layers[-1].bias)
    return layers


def _run_mlp(layers: nn.ModuleList, x: Tensor, mask: Tensor | None) -> Tensor:
    for layer in layers:
        x = _apply_norm(layer, x, mask) if not isinstance(layer, (nn.Conv1d, nn.ReLU)) else layer(x)
    return x


class KeypointEncoder(nn.Module):
    """MLP_kp: Conv1d 2→32→64→128→256→D on normalised positions (B, 2, N), norm + ReLU between layers."""

    def __init__(self, dim: int, hidden: Sequence[int] = (32, 64, 128, 256), norm: str = "batch"):
        super().__init__()
        self.layers = _mlp([2, *hidden, dim], norm)

    def forward(self, u: Tensor, mask: Tensor | None = None) -> Tensor:
        return _run_mlp(self.layers, u, mask)


class AttentionLayer(nn.Module):
    """x ← x + MLP([x ‖ MHA(x, src, src)]); q/k/v/merge Conv1d D→D, contiguous heads, scores / sqrt(D/h)."""

    def __init__(self, dim: int, heads: int, norm: str = "batch"):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q, self.k, self.v, self.merge = (nn.Conv1d(dim, dim, kernel_size=1) for _ in range(4))
        self.mlp = _mlp([2 * dim, 2 * dim, dim], norm)

    def message(self, x: Tensor, src: Tensor, src_mask: Tensor | None) -> Tensor:
        b, d, n = x.shape
        h = self.heads

        def split(t: Tensor) -> Tensor:  # (B, D, N) -> (B, h, N, D/h)
            return t.view(b, h, d // h, t.shape[-1]).transpose(2, 3)

        q, k, v = split(self.q(x)), split(self.k(src)), split(self.v(src))
        bias = None
        if src_mask is not None:
            bias = torch.zeros(src_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~src_mask, NEG)
            bias = bias[:, None, None, :]
        m = attention(q, k, v, bias)  # (B, h, N, D/h)
        m = self.merge(m.transpose(2, 3).reshape(b, d, n))
        if src_mask is not None:  # no valid key at all: no message (instead of an average of padding)
            m = m * src_mask.any(1).to(m.dtype)[:, None, None]
        return m

    def forward(self, x: Tensor, src: Tensor, x_mask: Tensor | None = None, src_mask: Tensor | None = None) -> Tensor:
        m = self.message(x, src, src_mask)
        return x + _run_mlp(self.mlp, torch.cat([x, m], dim=1), x_mask)


def log_sinkhorn(scores: Tensor, alpha: Tensor | float, iters: int, mask1: Tensor | None = None,
                 mask2: Tensor | None = None) -> Tensor:
    """Log-domain Sinkhorn with a dustbin row and column (docs/kaf.md#sinkhorn-with-a-dustbin).

    ``scores`` (B, N1, N2); ``alpha`` the dustbin score; ``mask1`` (B, N1) / ``mask2`` (B, N2) mark valid
    keypoints (default: all). Per sample, with n1, n2 valid keypoints and n = −log(n1 + n2):
    Z = [[S, α·1], [α·1ᵀ, α]], log μ = (n, …, n, log n2 + n), log ν = (n, …, n, log n1 + n);
    u = v = 0, then ``iters`` times u = log μ − LSE_j(Z + v), v = log ν − LSE_i(Z + u);
    returns log P = Z + u + v − n, (B, N1+1, N2+1): valid rows sum to 1, valid columns sum to 1, the dustbin
    row to n2 and the dustbin column to n1 (at convergence). Padded rows/columns carry ≈ −1e4 (mass 0).
    """
    b, n1, n2 = scores.shape
    dev, dt = scores.device, scores.dtype
    m1 = torch.ones(b, n1, dtype=torch.bool, device=dev) if mask1 is None else mask1.to(dev, torch.bool)
    m2 = torch.ones(b, n2, dtype=torch.bool, device=dev) if mask2 is None else mask2.to(dev, torch.bool)
    alpha = torch.as_tensor(alpha, dtype=dt, device=dev)
    z = torch.cat([torch.cat([scores, alpha.expand(b, n1, 1)], 2),
                   alpha.expand(b, 1, n2 + 1)], 1)
    c1 = m1.sum(1)
    c2 = m2.sum(1)
    norm = -torch.log((c1 + c2).clamp(min=1).to(dt))  # (B,)
    rows = torch.cat([m1, (c2 > 0)[:, None]], 1)  # rows / columns that carry mass
    cols = torch.cat([m2, (c1 > 0)[:, None]], 1)
    log_mu = torch.cat([norm[:, None].expand(b, n1), (torch.log(c2.clamp(min=1).to(dt)) + norm)[:, None]], 1)
    log_nu = torch.cat([norm[:, None].expand(b, n2), (torch.log(c1.clamp(min=1).to(dt)) + norm)[:, None]], 1)
    neg = torch.full((), SINKHORN_NEG, dtype=dt, device=dev)
    u = torch.where(rows, 0.0, neg)
    v = torch.where(cols, 0.0, neg)
    for _ in range(iters):  # rows / columns without mass keep a fixed, very negative potential
        u = torch.where(rows, log_mu - torch.logsumexp(z + v[:, None, :], dim=2), neg)
        v = torch.where(cols, log_nu - torch.logsumexp(z + u[:, :, None], dim=1), neg)
    return z + u[:, :, None] + v[:, None, :] - norm[:, None, None]


class KeypointMatcher(nn.Module):
    """The pretraining matcher: attention over both views' keypoint features, scores, dustbin, Sinkhorn.

    ``forward(g1, g2, p1, p2, image_size, mask1, mask2) -> (log P (B, N1+1, N2+1), scores (B, N1, N2))``;
    g_v (B, in_dim, N_v) keypoint features, p_v (B, N_v, 2) keypoint positions (x, y) in input pixels (the
    project's keypoint order, :mod:`medssl.models.kaf.keypoints`), normalised as in the KAF layers.
    """

    def __init__(self, in_dim: int = 256, dim: int = 256, heads: int = 4,
                 layers: Sequence[str] = ("self", "cross", "self", "cross"), sinkhorn_iters: int = 100,
                 dustbin_init: float = 1.0, norm: str = "batch"):
        super().__init__()
        for kind in layers:
            if kind not in ("self", "cross"):
                raise ValueError(f"matcher layer kinds are 'self' or 'cross', got {kind!r}")
        self.kinds = list(layers)
        self.dim, self.sinkhorn_iters = dim, sinkhorn_iters
        self.inp = nn.Identity() if in_dim == dim else nn.Conv1d(in_dim, dim, kernel_size=1)
        self.kenc = KeypointEncoder(dim, norm=norm)
        self.layers = nn.ModuleList(AttentionLayer(dim, heads, norm) for _ in self.kinds)
        self.final_proj = nn.Conv1d(dim, dim, kernel_size=1)
        self.dustbin = nn.Parameter(torch.tensor(float(dustbin_init)))

    def forward(self, g1: Tensor, g2: Tensor, p1: Tensor, p2: Tensor, image_size: tuple[int, int],
                mask1: Tensor | None = None, mask2: Tensor | None = None) -> tuple[Tensor, Tensor]:
        h, w = image_size
        x1 = self.inp(g1) + self.kenc(normalise_positions(p1, h, w).transpose(1, 2), mask1)
        x2 = self.inp(g2) + self.kenc(normalise_positions(p2, h, w).transpose(1, 2), mask2)
        for kind, layer in zip(self.kinds, self.layers):
            if kind == "self":
                x1, x2 = layer(x1, x1, mask1, mask1), layer(x2, x2, mask2, mask2)
            else:
                x1, x2 = layer(x1, x2, mask1, mask2), layer(x2, x1, mask2, mask1)
        f1, f2 = self.final_proj(x1), self.final_proj(x2)
        scores = torch.einsum("bdn,bdm->bnm", f1, f2).float() / math.sqrt(self.dim)
        with torch.autocast(device_type=scores.device.type, enabled=False):  # Sinkhorn always in float32
            log_p = log_sinkhorn(scores, self.dustbin.float(), self.sinkhorn_iters, mask1, mask2)
        return log_p, scores
