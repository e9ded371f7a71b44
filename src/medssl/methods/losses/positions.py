"""Positive masks for the SupCon family: SimCLR's other view, PCL's slice positions, GCL's partitions.

Convention shared with :func:`.supcon.supcon`: the 2B embeddings are ordered as
[view 1 of items 0..B−1, view 2 of items 0..B−1], so row i and row i+B are the two
views of item i, and per-item labels (positions, partitions) are repeated for both
views.
"""

from __future__ import annotations

import torch

_EPS = 1e-6  # > float32 resolution of positions in [0, 1]


def _other_view(b: int, device: torch.device | None = None) -> torch.Tensor:
    """(2B, 2B) boolean mask with True at (i, i+B) and (i+B, i)."""
    idx = torch.arange(2 * b, device=device)
    return idx.unsqueeze(1) == ((idx + b) % (2 * b)).unsqueeze(0)


def other_view_mask(b: int, device: torch.device | None = None) -> torch.Tensor:
    """The SimCLR mask: P(i) = {the other view of i} over 2B embeddings."""
    return _other_view(b, device)


def pcl_positive_mask(pos: torch.Tensor, theta: float, scan: torch.Tensor | None = None) -> torch.Tensor:
    """PCL positives over the 2B set, from per-item positions ``pos`` (B,).

    pos = (i+1)/Z for slice i of a Z-slice volume. j ∈ P(i) iff |pos_i − pos_j| < θ
    (strictly), j ≠ i; the other view is always included, even for θ ≤ 0.
    Differences within ``_EPS`` = 1e-6 of θ count as equal to θ (not positive), so
    that float rounding (0.3 − 0.2 = 0.0999…, float32 positions) does not decide
    the strict test. With ``scan`` (B,) ids, only slices of the same scan qualify (see
    :mod:`medssl.methods.position_gate`).
    """
    pos = torch.as_tensor(pos, dtype=torch.float64).reshape(-1)
    b = pos.shape[0]
    p = torch.cat([pos, pos])
    mask = (p.unsqueeze(1) - p.unsqueeze(0)).abs() < theta - _EPS
    if scan is not None:
        s = torch.as_tensor(scan).reshape(-1).to(p.device)
        s = torch.cat([s, s])
        mask &= s.unsqueeze(1) == s.unsqueeze(0)
    mask |= _other_view(b, p.device)
    mask &= ~torch.eye(2 * b, dtype=torch.bool, device=p.device)
    return mask


def gcl_partition(slice_idx, n_slices, n_parts: int = 4):
    """GCL partition index (0-based) of slice ``slice_idx`` in a ``n_slices``-slice volume.

    q = max(1, round_half_up(Z / n_parts)); partition = min(i // q, n_parts − 1).
    round_half_up is done in integers, (2Z + n) // (2n), so 2.5 → 3 (Python's
    ``round`` would give 2). Accepts ints (returns an int) or integer tensors
    (broadcast, returns a tensor).
    """
    if n_parts < 1:
        raise ValueError(f"gcl_partition: n_parts must be >= 1, got {n_parts}")
    scalar = not torch.is_tensor(slice_idx) and not torch.is_tensor(n_slices)
    i = torch.as_tensor(slice_idx, dtype=torch.long)
    z = torch.as_tensor(n_slices, dtype=torch.long)
    if bool((z < 1).any()) or bool((i < 0).any()) or bool((i >= z).any()):
        raise ValueError(f"gcl_partition: slice index out of range (slice_idx={slice_idx}, n_slices={n_slices})")
    q = torch.clamp((2 * z + n_parts) // (2 * n_parts), min=1)
    part = torch.clamp(i // q, max=n_parts - 1)
    return int(part) if scalar else part


def partition_positive_mask(parts: torch.Tensor) -> torch.Tensor:
    """GCL ``supcon_partition`` positives over the 2B set, from per-item partitions (B,).

    j ∈ P(i) iff partition_i == partition_j (same or other volume), j ≠ i; the other
    view of i always qualifies.
    """
    parts = torch.as_tensor(parts).reshape(-1)
    b = parts.shape[0]
    p = torch.cat([parts, parts])
    mask = p.unsqueeze(1) == p.unsqueeze(0)
    mask &= ~torch.eye(2 * b, dtype=torch.bool, device=p.device)
    return mask
