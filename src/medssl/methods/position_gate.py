"""Are slice positions a usable label in these scans? The check behind PCL's, GCL's and KAF's positives.

PCL, GCL and KAF's global losses call slices of *different* scans positives when they sit at a similar
relative position along the slicing axis. That is a good label where position predicts appearance (a CT
from neck to pelvis, Hippocampus crops: position explains ~27 % of the pixel variance) and a random one where
it does not (a cine-MRI stack of ~10 thick slices: ~3 %). Pulling random pairs together is best solved by
mapping every slice to one point, and training then collapses.

:func:`position_r2` measures it on the pretraining slices: the share of the variance of an 8 x 8 thumbnail
of each slice explained by its position decile (adjusted for the number of deciles, so that a small sample
does not inflate it; 0 = position says nothing). Below
``pretrain.position_r2_min`` a method keeps positions only *within* each scan (nearby slices of the same
volume, and always the other view), never across scans, and says so. ``position_r2_min = 0`` turns the
check off.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import r2_score

MAX_SLICES = 2000  # a seeded sample of the pretraining slices is enough for the estimate
BINS = 10  # position deciles
SIDE = 8  # thumbnail side


def position_r2(images: np.ndarray, rel_pos: np.ndarray, bins: int = BINS, side: int = SIDE) -> float:
    """Adjusted R^2 of position deciles for the 8 x 8 thumbnails of ``images`` (N, H, W), ``rel_pos`` in (0, 1].

    The prediction of each slice's thumbnail is its decile's mean thumbnail; R^2 is variance-weighted over the
    thumbnail pixels (``sklearn.metrics.r2_score``), so constant padding counts for nothing, and adjusted for
    the number of deciles, so that position-independent slices score about 0 whatever the sample size."""
    rel = np.asarray(rel_pos, dtype=np.float64)
    group = np.clip(np.ceil(rel * bins).astype(int) - 1, 0, bins - 1)
    present = np.unique(group)
    n, k = len(rel), len(present)
    if k < 2 or n <= k + 1:
        return float("nan")
    thumbs = F.adaptive_avg_pool2d(torch.as_tensor(np.asarray(images, np.float32))[:, None], side)
    thumbs = thumbs.reshape(n, -1).numpy().astype(np.float64)
    if not (thumbs.std(0) > 1e-8).any():
        return 0.0
    means = np.zeros((bins, thumbs.shape[1]))
    for g in present:
        means[g] = thumbs[group == g].mean(0)
    r2 = r2_score(thumbs, means[group], multioutput="variance_weighted")
    return float(1.0 - (1.0 - r2) * (n - 1) / (n - k))


class PositionGate:
    """Mixin for methods whose positives come from slice positions: call :meth:`gate` in ``select_rows``."""

    cross_scan = True
    position_r2 = float("nan")

    def gate(self, cache, rows: np.ndarray) -> dict:
        """Measure :func:`position_r2` on (a seeded sample of) ``rows``; decide whether positives may cross scans."""
        rows = np.asarray(rows)
        sample = rows if len(rows) <= MAX_SLICES else np.sort(
            np.random.default_rng(0).choice(rows, MAX_SLICES, replace=False))
        self.position_r2 = position_r2(cache.read_images(sample), cache.rel_pos[sample])
        ids = {c: i for i, c in enumerate(sorted(set(cache.case_ids[rows])))}
        self.scan_of_row = {int(r): ids[cache.case_ids[r]] for r in rows}
        floor = float(self.cfg.position_r2_min)
        self.cross_scan = floor <= 0 or not (self.position_r2 < floor)  # nan (too few positions): keep the method
        if not self.cross_scan:
            warnings.warn(f"pretrain.method={self.name}: slice position explains {self.position_r2:.1%} of slice "
                          f"appearance in these scans (< pretrain.position_r2_min = {floor}), so slices of different "
                          "scans at the same position would be near-random positives; positives by position are "
                          "taken within each scan only", stacklevel=2)
        return {"position_r2": round(self.position_r2, 4), "positives_across_scans": self.cross_scan}

    def scans(self, batch: dict) -> torch.Tensor | None:
        """Per-item scan ids when positives must stay within a scan, else None."""
        if self.cross_scan:
            return None
        return torch.tensor([self.scan_of_row[int(r)] for r in batch["row"]])
