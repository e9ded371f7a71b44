"""Per-volume intensity normalisation (numpy; applied once per volume before slicing).

* CT: clip Hounsfield units to a window (default the abdominal window -160..240 HU) and
  scale linearly to [0, 1].
* MRI and any other non-CT modality: clip each volume to its own percentiles
  (default 0.5/99.5), computed over the non-zero voxels so that the zero background
  of skull-stripped or cropped scans does not drag the lower percentile down (all voxels
  are used when the volume is entirely zero), then either

  - ``"zscore"`` (default, as in nnU-Net): subtract the mean and divide by the
    standard deviation of the clipped volume (all voxels); a constant volume gives zeros;
  - ``"minmax"`` (PolyCL's choice): scale the clipped range to [0, 1].

Plain numpy is used rather than MONAI transforms so the exact percentile rule (non-zero
voxels) and the zero-std behaviour are explicit and identical for every caller.
"""

from __future__ import annotations

import numpy as np

from medssl.errors import ConfigError

MRI_MODES = ("zscore", "minmax")


def normalize(
    array: np.ndarray,
    modality: str,
    *,
    ct_window: tuple[float, float] = (-160.0, 240.0),
    mri_percentiles: tuple[float, float] = (0.5, 99.5),
    mri_mode: str = "zscore",
) -> np.ndarray:
    """Return a float32 copy of ``array`` normalised for ``modality`` (see module docstring)."""
    x = np.asarray(array, dtype=np.float32)
    if str(modality).strip().upper() == "CT":
        lo, hi = (float(v) for v in ct_window)
        if not hi > lo:
            raise ConfigError(f"ct_window: upper bound must exceed lower bound, got {tuple(ct_window)}")
        return ((np.clip(x, lo, hi) - lo) / (hi - lo)).astype(np.float32)

    if mri_mode not in MRI_MODES:
        raise ConfigError(f"mri_mode: expected one of {', '.join(MRI_MODES)}, got {mri_mode!r}")
    p_lo, p_hi = (float(v) for v in mri_percentiles)
    if not 0.0 <= p_lo < p_hi <= 100.0:
        raise ConfigError(f"mri_percentiles: expected 0 <= low < high <= 100, got {tuple(mri_percentiles)}")
    if x.size == 0:
        return x.copy()
    nonzero = x[x != 0]
    ref = nonzero if nonzero.size else x.ravel()
    lo, hi = (float(v) for v in np.percentile(ref, [p_lo, p_hi]))
    clipped = np.clip(x, lo, hi)
    if mri_mode == "minmax":
        if hi - lo <= 0:
            return np.zeros_like(x)
        return ((clipped - lo) / (hi - lo)).astype(np.float32)
    mean = float(clipped.mean(dtype=np.float64))
    std = float(clipped.std(dtype=np.float64))
    if std <= 0 or not np.isfinite(std):
        return np.zeros_like(x)
    return ((clipped - mean) / std).astype(np.float32)
