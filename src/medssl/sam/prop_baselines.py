"""Baselines for propagation from one annotated slice, and the choice of the copy window on validation data.

* ``copy`` -- the annotated mask repeated on every slice (``copy_window=k``: only on slices key-k .. key+k);
* ``slice_only`` -- the annotated slice alone.

Neither uses the ground truth beyond the annotated slice. The window k of "copy +-k" must be chosen on
**validation** volumes, never on the volumes it is reported on: :func:`choose_copy_window` takes
(annotation, ground truth) pairs of validation volumes and returns the k of a small range (default 0..8)
with the best mean 3D Dice (ties: the smaller k). :func:`window_scores` and :func:`best_k` do the same for
any per-class masks (e.g. registration propagation with at most k slices per direction).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from medssl.data.slicing import stack_slices, volume_slices
from medssl.errors import ConfigError
from medssl.sam.register import combine

if TYPE_CHECKING:
    from medssl.sam.propagate import Annotation

WINDOWS = range(0, 9)  # candidate k of copy +-k


def copy_masks(ann: Annotation, z_n: int) -> dict[int, np.ndarray]:
    """Per class: (Z, h, w) bool, the annotated mask on every slice."""
    return {c: np.broadcast_to(m, (z_n,) + m.shape).copy() for c, (_, m) in ann.keys.items()}


def window_masks(masks: dict[int, np.ndarray], ann: Annotation, k: int | None) -> dict[int, np.ndarray]:
    """Per-class (Z, h, w) masks kept only on slices key-k .. key+k of their class (None: unchanged)."""
    if k is None:
        return masks
    out = {}
    for c, m in masks.items():
        key = ann.keys[c][0]
        w = np.zeros_like(m)
        lo, hi = max(0, key - k), min(m.shape[0] - 1, key + k)
        w[lo:hi + 1] = m[lo:hi + 1]
        out[c] = w
    return out


def baselines(ann: Annotation, shape: tuple[int, ...], copy_window: int | None = None) -> dict[str, np.ndarray]:
    """``copy`` (annotated masks on every slice, or on key+-copy_window) and ``slice_only`` label volumes."""
    z_n = shape[ann.axis]
    copy = copy_masks(ann, z_n)
    flat = {c: np.zeros(z_n) for c in copy}
    return {name: np.ascontiguousarray(stack_slices(combine(window_masks(copy, ann, k), flat), ann.axis))
            for name, k in (("copy", copy_window), ("slice_only", 0))}


def class_dice(masks: dict[int, np.ndarray], gt_slices: np.ndarray) -> dict[int, float]:
    """3D Dice per class of (Z, h, w) masks against (Z, h, w) ground-truth labels (1 when both are empty)."""
    out = {}
    for c, m in masks.items():
        t = gt_slices == c
        s = int(m.sum()) + int(t.sum())
        out[c] = 1.0 if s == 0 else 2.0 * int((m & t).sum()) / s
    return out


def window_scores(volumes: Sequence[tuple[Annotation, dict[int, np.ndarray], np.ndarray]],
                  candidates: Iterable[int] = WINDOWS) -> dict[int, float]:
    """Mean Dice (over the classes of a volume, then over volumes) of each volume's per-class masks
    restricted to key+-k, for every candidate k. ``volumes``: (annotation, masks, ground-truth label volume)."""
    candidates = sorted({int(k) for k in candidates})
    if not volumes or not candidates or candidates[0] < 0:
        raise ConfigError("window_scores: needs at least one volume and candidate windows k >= 0")
    totals = dict.fromkeys(candidates, 0.0)
    for ann, masks, gt in volumes:
        gt_slices = volume_slices(np.asarray(gt), ann.axis)
        for k in candidates:
            totals[k] += float(np.mean(list(class_dice(window_masks(masks, ann, k), gt_slices).values())))
    return {k: v / len(volumes) for k, v in totals.items()}


def best_k(scores: dict[int, float]) -> int:
    """The k with the highest score; ties go to the smaller k."""
    top = max(scores.values())
    return min(k for k, v in scores.items() if v >= top - 1e-12)


def copy_window_scores(validation: Sequence[tuple[Annotation, np.ndarray]],
                       candidates: Iterable[int] = WINDOWS) -> dict[int, float]:
    """Mean validation Dice of copy +-k for every candidate k; ``validation``: (annotation, label volume)."""
    return window_scores([(ann, copy_masks(ann, np.asarray(gt).shape[ann.axis]), gt) for ann, gt in validation],
                         candidates)


def choose_copy_window(validation: Sequence[tuple[Annotation, np.ndarray]],
                       candidates: Iterable[int] = WINDOWS) -> int:
    """The copy window k (best mean Dice of copy +-k on the validation volumes; ties: smaller k)."""
    return best_k(copy_window_scores(validation, candidates))
