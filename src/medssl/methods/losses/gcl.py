"""GCL losses of Chaitanya et al. 2020 (docs/methods.md#gcl global, docs/methods.md#gcl-full local).

Global (Chaitanya's formulation, not the SupCon simplification): each positive pair
(a, b) has its own numerator,
ℓ(a, b) = −log[e^{s_ab} / (e^{s_ab} + Σ_{k∈Λ⁻(a)} e^{s_ak})], s = cos/τ, and
L_g = (1/|Λ⁺|) Σ_{(a,b)∈Λ⁺} [ℓ(a, b) + ℓ(b, a)].

Choices the paper leaves open, as implemented here:
* |Λ⁺| counts unordered pairs and both directions are summed, as in the formula, so
  G^R equals 2·NT-Xent (not 1·NT-Xent).
* G^D positives: the augmented pair of each image plus, for images i, j with the same
  partition and different volumes, all four pairs (x_i, x_j), (x̃_i, x̃_j), (x_i, x̃_j),
  (x̃_i, x_j) ("and their augmented copies").
* G^D / G^{D−} negatives of an anchor: every image of another partition; all
  same-partition images (any volume, either view, including same-volume slices,
  which are never positives) are out of the denominators.
* An anchor with no negative has denominator e^{s_ab} alone (ℓ = 0).
Local: see :func:`gcl_local_loss`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from medssl.errors import ConfigError

STRATEGIES = ("GD", "GD-", "GR")

#: (row, col) fractions of the 13 fixed region positions: 4 corners, 4 edge
#: midpoints, the centre, 4 quarter points. n_regions < 13 takes the first ones.
REGION_FRACTIONS: tuple[tuple[float, float], ...] = (
    (0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0),
    (0.0, 0.5), (0.5, 0.0), (0.5, 1.0), (1.0, 0.5),
    (0.5, 0.5),
    (0.25, 0.25), (0.25, 0.75), (0.75, 0.25), (0.75, 0.75),
)


def _masked_lse(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Row log-sum-exp over ``keep``; an empty row gives a huge negative (finite grads)."""
    return torch.logsumexp(x.masked_fill(~keep, torch.finfo(x.dtype).min / 2), dim=-1)


def gcl_global_loss(
    z: torch.Tensor,
    z_aug: torch.Tensor,
    parts: torch.Tensor,
    vol_ids: torch.Tensor,
    tau: float = 0.1,
    strategy: str = "GD",
) -> torch.Tensor:
    """Global GCL loss of projections ``z`` (N, D) and of their augmented copies ``z_aug`` (N, D).

    ``parts`` (N,) are partition indices (:func:`.positions.gcl_partition`), ``vol_ids``
    (N,) volume ids. ``strategy``: "GR" (positive = augmented copy, negatives = all
    else), "GD-" (as GR, same-partition images out of the negatives) or "GD" (GD- plus
    same-partition other-volume positives).
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"gcl strategy: unknown value {strategy!r} (expected one of {', '.join(STRATEGIES)})")
    if z.shape != z_aug.shape or z.dim() != 2:
        raise ValueError(f"gcl_global_loss needs z, z_aug of equal shape (N, D), got {tuple(z.shape)}, {tuple(z_aug.shape)}")
    n = z.shape[0]
    parts = torch.as_tensor(parts, device=z.device).reshape(-1)
    vol_ids = torch.as_tensor(vol_ids, device=z.device).reshape(-1)
    if parts.shape[0] != n or vol_ids.shape[0] != n:
        raise ValueError(f"gcl_global_loss: parts and vol_ids need {n} entries")
    if tau <= 0:
        raise ValueError(f"gcl_global_loss: tau must be > 0, got {tau}")
    u = F.normalize(torch.cat([z, z_aug], dim=0), dim=1)
    s = (u @ u.t()) / tau
    idx = torch.arange(2 * n, device=z.device)
    eye = idx.unsqueeze(1) == idx.unsqueeze(0)
    partner = idx.unsqueeze(1) == ((idx + n) % (2 * n)).unsqueeze(0)
    p, v = torch.cat([parts, parts]), torch.cat([vol_ids, vol_ids])
    same_part = p.unsqueeze(1) == p.unsqueeze(0)
    if strategy == "GR":
        pos, neg = partner, ~(eye | partner)
    else:
        pos, neg = partner, ~same_part
        if strategy == "GD":
            pos = pos | (same_part & (v.unsqueeze(1) != v.unsqueeze(0)))
    log_neg = _masked_lse(s, neg).unsqueeze(1)  # (2N, 1)
    ell = torch.logaddexp(s, log_neg) - s  # ℓ(a, b) for every (a, b)
    n_pairs = pos.sum() / 2  # pos is symmetric: directed entries = 2·|Λ⁺|
    return torch.where(pos, ell, torch.zeros_like(ell)).sum() / n_pairs


def region_coords(h: int, w: int, region_size: int = 3, n_regions: int = 13) -> list[tuple[int, int]]:
    """Top-left (row, col) of the ``n_regions`` K×K regions of an h×w map.

    A fraction t maps to start = floor(t·(size − K) + ½), so t = 0 / 1 touch the
    borders and t = ½ is centred (the original pixel offsets were not checked).
    Depends on the map shape only, so spatially aligned views share the coordinates.
    """
    if not 2 <= n_regions <= len(REGION_FRACTIONS):
        raise ConfigError(f"gcl.local.n_regions: must be in 2..{len(REGION_FRACTIONS)}, got {n_regions}")
    if region_size < 1 or region_size > min(h, w):
        raise ValueError(f"gcl local: region_size {region_size} does not fit a {h}x{w} feature map")
    return [
        (math.floor(fr * (h - region_size) + 0.5), math.floor(fc * (w - region_size) + 0.5))
        for fr, fc in REGION_FRACTIONS[:n_regions]
    ]


def region_neighbours(n_regions: int = 13, n_neg: int = 5) -> torch.Tensor:
    """(n_regions, n_neg) indices of the ``n_neg`` regions nearest to each region.

    Distance between the fractional positions (independent of the map size); ties
    go to the lower region index (the code's exact neighbour lists were not checked).
    """
    if not 1 <= n_neg <= n_regions - 1:
        raise ConfigError(f"gcl.local.n_neg: must be in 1..{n_regions - 1}, got {n_neg}")
    fr = REGION_FRACTIONS[:n_regions]
    out = []
    for a, (ra, ca) in enumerate(fr):
        others = sorted((round((ra - rb) ** 2 + (ca - cb) ** 2, 12), b) for b, (rb, cb) in enumerate(fr) if b != a)
        out.append([b for _, b in others[:n_neg]])
    return torch.tensor(out, dtype=torch.long)


def extract_regions(f: torch.Tensor, coords: list[tuple[int, int]], region_size: int) -> torch.Tensor:
    """Flattened K×K blocks of ``f`` (B, C, H, W) at ``coords``: (B, n_regions, C·K·K)."""
    k = torch.arange(region_size, device=f.device)
    top = torch.tensor([c[0] for c in coords], device=f.device)
    left = torch.tensor([c[1] for c in coords], device=f.device)
    rows = (top[:, None, None] + k[None, :, None]).expand(-1, region_size, region_size)
    cols = (left[:, None, None] + k[None, None, :]).expand(-1, region_size, region_size)
    blocks = f[:, :, rows, cols]  # (B, C, U, K, K)
    return blocks.permute(0, 2, 1, 3, 4).flatten(2)


def gcl_local_loss(
    f: torch.Tensor,
    f_aug: torch.Tensor,
    region_size: int = 3,
    n_regions: int = 13,
    n_neg: int = 5,
    tau: float = 0.1,
) -> torch.Tensor:
    """Local GCL loss (strategy L^R) on aligned decoder feature maps ``f``, ``f_aug`` (B, C, H, W).

    Per image and region u: positive = region u of the other view; negatives = the
    ``n_neg`` nearest other regions u′ of **both** views (f^{u′} and f̃^{u′}); cosine
    similarity of the flattened K×K×C blocks over τ. Both directions (anchor in f, in
    f̃) are computed and the mean over directions, regions and images is returned.
    """
    if f.shape != f_aug.shape or f.dim() != 4:
        raise ValueError(f"gcl_local_loss needs f, f_aug of equal shape (B, C, H, W), got {tuple(f.shape)}, {tuple(f_aug.shape)}")
    if tau <= 0:
        raise ValueError(f"gcl_local_loss: tau must be > 0, got {tau}")
    coords = region_coords(f.shape[2], f.shape[3], region_size, n_regions)
    nb = region_neighbours(n_regions, n_neg).to(f.device)
    r = torch.cat([extract_regions(f, coords, region_size), extract_regions(f_aug, coords, region_size)], dim=1)
    r = F.normalize(r, dim=-1)  # (B, 2U, D): rows 0..U−1 view 1, U..2U−1 view 2
    s = r @ r.transpose(1, 2) / tau  # (B, 2U, 2U)
    u = n_regions
    idx = torch.arange(2 * u, device=f.device)
    partner = (idx + u) % (2 * u)
    neg = torch.zeros(2 * u, 2 * u, dtype=torch.bool, device=f.device)
    region_nb = nb[idx % u]  # (2U, n_neg)
    neg.scatter_(1, region_nb, True)
    neg.scatter_(1, region_nb + u, True)
    keep = neg.clone()
    keep[idx, partner] = True
    s_pos = s[:, idx, partner]  # (B, 2U)
    return (_masked_lse(s, keep.expand_as(s)) - s_pos).mean()
