"""Per-volume and per-slice embeddings for the label-budget advisor, from the slice cache.

Two feature sources, both read from the cached (normalised, fitted) slices of :mod:`medssl.data.cache`:

* **encoder** -- a pretrained medssl encoder (any method's ``last.pt``, or a fine-tuned checkpoint), loaded with
  :func:`medssl.engine.checkpoint.load_checkpoint` (``torch.load(weights_only=True)``) and
  :func:`medssl.models.load_encoder` (strict key and shape check). A slice's feature is the global average of
  the encoder's last map (the bottleneck, 16f channels for the UNet); a volume's feature is the mean and the
  standard deviation of its slices' features (2 x 16f values).
* **intensity** -- no pretraining: per volume, the 1/5/10/25/50/75/90/95/99th percentiles, mean and standard
  deviation of the voxels inside each slice's content box (the canvas padding is left out), a 16-bin histogram
  on one range for all volumes, and the log of the number of slices and of the in-plane content area.

A patient with several cases gets the mean of its cases' features. :func:`project` puts the features on one
scale for the strategies: standardised per feature, then PCA keeping 95 % of the variance.
"""

from __future__ import annotations

import numpy as np

from medssl.errors import ConfigError

PERCENTILES = (1, 5, 10, 25, 50, 75, 90, 95, 99)
HIST_BINS = 16


def _content(cache, case: str) -> np.ndarray:
    """(Z, h, w) cached slices of ``case`` cut to their content box (no canvas padding)."""
    x, _ = cache.case_volume(case)
    y0, y1, x0, x1 = (int(v) for v in cache.volume(case)["content"])
    return np.asarray(x[:, y0:y1, x0:x1], dtype=np.float32)


def _stats(values: np.ndarray) -> np.ndarray:
    return np.concatenate([np.percentile(values, PERCENTILES), [values.mean(), values.std()]])


def intensity_features(cache, cases: list[str]) -> np.ndarray:
    """(N, 29) intensity statistics of each case (see the module docstring)."""
    vols = [_content(cache, c) for c in cases]
    sample = np.concatenate([v.ravel()[:: max(1, v.size // 20000)] for v in vols])
    lo, hi = np.percentile(sample, (0.5, 99.5)) if sample.size else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    out = []
    for v in vols:
        flat = v.ravel()
        hist = np.histogram(np.clip(flat, lo, hi), bins=HIST_BINS, range=(lo, hi))[0] / max(flat.size, 1)
        size = [np.log(v.shape[0]), np.log(max(v.shape[1] * v.shape[2], 1))]
        out.append(np.concatenate([_stats(flat), hist, size]))
    return np.asarray(out, dtype=np.float64)


def slice_thumbnails(cache, case: str, grid: int = 8) -> np.ndarray:
    """(Z, grid * grid) per-slice appearance without a model: each slice's content box area-averaged down to a
    ``grid`` x ``grid`` thumbnail of its normalised intensities (where things are, not only how bright)."""
    import cv2

    v = _content(cache, case)
    return np.stack([cv2.resize(s, (grid, grid), interpolation=cv2.INTER_AREA).ravel() for s in v]).astype(np.float64)


def load_encoder_model(path: str, n_classes: int, model_cfg=None):
    """The segmentation model of the checkpoint's backbone with its pretrained encoder loaded (eval mode).

    The backbone and width come from the checkpoint's metadata (else from ``model_cfg``); a missing or unreadable
    file or an encoder that does not fit raises a one-line error naming the file.
    """
    from medssl.engine.checkpoint import load_checkpoint
    from medssl.models import build_model, load_encoder

    ckpt = load_checkpoint(path)
    spec = ckpt["meta"].get("model") or ({} if model_cfg is None else {
        "backbone": model_cfg.backbone, "features": model_cfg.features, "options": dict(model_cfg.options)})
    if not spec.get("backbone"):
        raise ConfigError(f"{path}: the checkpoint does not say its backbone; give --config with model.backbone")
    model = build_model(spec["backbone"], in_channels=1, n_classes=max(2, n_classes),
                        features=spec.get("features", 32), **(spec.get("options") or {}))
    try:
        load_encoder(model, ckpt["model"], strict=True)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return model.eval()


def slice_encoder_features(model, slices: np.ndarray, batch: int = 64) -> np.ndarray:
    """(Z, C) global average of the encoder's last map for each (h, w) slice of ``slices`` (Z, h, w)."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(slices), batch):
            x = torch.from_numpy(np.array(slices[i:i + batch], dtype=np.float32))[:, None]  # a writable copy
            feats = model.encoder(x)
            last = feats[-1] if isinstance(feats, (list, tuple)) else feats
            out.append(last.float().mean(dim=(2, 3)).cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def encoder_features(cache, cases: list[str], model, batch: int = 64) -> np.ndarray:
    """(N, 2C) mean and standard deviation over each case's cached slices of the per-slice encoder features."""
    out = []
    for case in cases:
        f = slice_encoder_features(model, np.asarray(cache.case_volume(case)[0]), batch)
        out.append(np.concatenate([f.mean(0), f.std(0)]))
    return np.asarray(out, dtype=np.float64)


def patient_features(case_features: np.ndarray, cases: list[str], patient_of: dict[str, str],
                     patients: list[str]) -> np.ndarray:
    """(P, D): the mean feature of each patient's cases, in the order of ``patients``."""
    rows = {p: [] for p in patients}
    for i, c in enumerate(cases):
        if patient_of[c] in rows:
            rows[patient_of[c]].append(i)
    missing = [p for p, r in rows.items() if not r]
    if missing:
        raise ConfigError(f"patient {missing[0]!r} has no case in the slice cache")
    return np.stack([case_features[r].mean(0) for r in rows.values()])


def project(features: np.ndarray, variance: float = 0.95) -> np.ndarray:
    """Standardise every feature (zero mean, unit variance; constant features become 0), then PCA keeping
    ``variance`` of the variance. Fewer than 3 rows or no variance at all: the standardised features."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    x = np.nan_to_num(np.asarray(features, dtype=np.float64))
    z = StandardScaler().fit_transform(x)
    if z.shape[0] < 3 or not np.any(z.var(0) > 1e-12):
        return z
    return PCA(n_components=variance, svd_solver="full").fit_transform(z)
