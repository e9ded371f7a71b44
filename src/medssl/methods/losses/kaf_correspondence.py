"""KAF's ground-truth keypoint correspondences, the "distance-based criterion" (docs/kaf.md#one-step).

Correspondences are computed on the **un-augmented** keypoints of the anchor slice s and its neighbour s′:
both are slices of one volume, so their in-plane pixel frames coincide and view-1 keypoints are already in
view-2 coordinates there (the transport into each augmented view happens afterwards). With
D_ab = |y_a − y_b| + |x_a − x_b| (Manhattan, px) and E_ab = ‖desc_a − desc_b‖₂ (SIFT descriptors):

1. a's nearest neighbour is argmin_b E_ab over {b : D_ab < R} (strict); a has none if that set is empty;
2. the same from b's side;
3. only mutual nearest neighbours are kept (ties: the lowest index wins).

After both views are augmented, a pair whose partner was dropped by the transport becomes unmatched
(:func:`surviving_matches`). :func:`match_target` turns the per-sample pairs into the boolean
(B, N1+1, N2+1) target of the local loss: matched pairs in the score block, every other valid keypoint of
view 1 in the dustbin column (set 𝓘) and of view 2 in the dustbin row (set 𝓙).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["mutual_matches", "surviving_matches", "match_target"]


def mutual_matches(pos1: Tensor, desc1: Tensor, pos2: Tensor, desc2: Tensor, radius: float) -> Tensor:
    """Mutual nearest-descriptor pairs within Manhattan distance < ``radius``: (K, 2) long (index1, index2).

    ``pos_v`` (N_v, 2) pixel positions (any consistent axis order), ``desc_v`` (N_v, C) descriptors.
    Pairs are sorted by index1. Empty inputs give an empty (0, 2) tensor.
    """
    pos1, pos2 = torch.as_tensor(pos1), torch.as_tensor(pos2)
    n1, n2 = pos1.shape[0], pos2.shape[0]
    if n1 == 0 or n2 == 0:
        return torch.zeros(0, 2, dtype=torch.long)
    d = (pos1.double()[:, None, :] - pos2.double()[None, :, :]).abs().sum(-1)  # (N1, N2) Manhattan
    e = torch.cdist(torch.as_tensor(desc1).double(), torch.as_tensor(desc2).double())  # (N1, N2) L2
    e = e.masked_fill(d >= radius, float("inf"))
    nn12 = e.argmin(1)  # first minimum on ties
    nn21 = e.argmin(0)
    has12 = torch.isfinite(e.min(1).values)
    idx1 = torch.arange(n1)
    mutual = has12 & (nn21[nn12] == idx1)
    return torch.stack([idx1[mutual], nn12[mutual]], 1)


def surviving_matches(pairs: Tensor, keep1: Tensor, keep2: Tensor, compact: bool = True) -> Tensor:
    """Pairs (K, 2) whose two keypoints both survived the transport (``keep_v`` (N_v,) bool).

    With ``compact`` the indices are renumbered into the kept keypoints' order (the positions of the
    ``True`` entries of ``keep_v``), as when the dropped keypoints are removed from the lists.
    """
    keep1, keep2 = torch.as_tensor(keep1, dtype=torch.bool), torch.as_tensor(keep2, dtype=torch.bool)
    pairs = torch.as_tensor(pairs, dtype=torch.long).reshape(-1, 2)
    ok = keep1[pairs[:, 0]] & keep2[pairs[:, 1]]
    pairs = pairs[ok]
    if compact:
        new1 = torch.cumsum(keep1.long(), 0) - 1
        new2 = torch.cumsum(keep2.long(), 0) - 1
        pairs = torch.stack([new1[pairs[:, 0]], new2[pairs[:, 1]]], 1)
    return pairs


def match_target(pairs: Sequence[Tensor], mask1: Tensor, mask2: Tensor) -> Tensor:
    """Boolean (B, N1+1, N2+1) target from per-sample pairs and validity masks ``mask_v`` (B, N_v).

    target[b, i, j] for each pair (i, j); target[b, i, N2] (dustbin column) for each valid unmatched i of
    view 1; target[b, N1, j] (dustbin row) for each valid unmatched j of view 2. Pairs on invalid keypoints
    raise ValueError.
    """
    b, n1 = mask1.shape
    n2 = mask2.shape[1]
    if len(pairs) != b:
        raise ValueError(f"match_target: {len(pairs)} pair lists for a batch of {b}")
    target = torch.zeros(b, n1 + 1, n2 + 1, dtype=torch.bool, device=mask1.device)
    for k, pr in enumerate(pairs):
        pr = torch.as_tensor(pr, dtype=torch.long, device=mask1.device).reshape(-1, 2)
        if len(pr) and (not bool(mask1[k, pr[:, 0]].all()) or not bool(mask2[k, pr[:, 1]].all())):
            raise ValueError(f"match_target: sample {k} has a match on a padded keypoint")
        if len(pr) and (pr[:, 0].unique().numel() != len(pr) or pr[:, 1].unique().numel() != len(pr)):
            raise ValueError(f"match_target: sample {k} matches a keypoint twice")
        target[k, pr[:, 0], pr[:, 1]] = True
        un1 = mask1[k].clone()
        un1[pr[:, 0]] = False
        un2 = mask2[k].clone()
        un2[pr[:, 1]] = False
        target[k, :n1, n2] = un1
        target[k, n1, :n2] = un2
    return target
