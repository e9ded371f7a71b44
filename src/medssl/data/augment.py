"""Training augmentation for 2D slices, built from MONAI transforms.

Spatial: flips, rotation, isotropic scaling, elastic deformation (image bilinear, label nearest).
Intensity (on normalised intensities): multiplicative and additive jitter, Gaussian noise.
Every sample is augmented with its own seed, derived from (run seed, epoch, slice row), so a
resumed or distributed run sees exactly the same augmented batches as an uninterrupted one.
"""

from __future__ import annotations

import math

import numpy as np
from monai import transforms as T

from medssl.config import AugConfig

KEYS = ("image", "label")


def build_augmentation(cfg: AugConfig) -> T.Compose | None:
    if not cfg.enabled:
        return None
    ops: list = []
    for ax in cfg.flip_axes:
        ops.append(T.RandFlipd(KEYS, prob=cfg.flip_prob, spatial_axis=int(ax)))
    if cfg.rotate_prob > 0 and cfg.rotate_deg > 0:
        r = math.radians(cfg.rotate_deg)
        ops.append(T.RandAffined(KEYS, prob=cfg.rotate_prob, rotate_range=(r,), mode=("bilinear", "nearest"),
                                 padding_mode="border"))
    if cfg.scale_prob > 0:
        lo, hi = cfg.scale_range
        # RandZoomd draws ONE factor for both axes (RandAffined's scale_range draws one per axis and,
        # given a single range, scales axis 0 only); keep_size crops/pads back to (H, W)
        ops.append(T.RandZoomd(KEYS, prob=cfg.scale_prob, min_zoom=lo, max_zoom=hi,
                               mode=("bilinear", "nearest"), padding_mode="edge", keep_size=True))
    if cfg.elastic_prob > 0:
        ops.append(T.Rand2DElasticd(KEYS, spacing=cfg.elastic_spacing, magnitude_range=tuple(cfg.elastic_magnitude),
                                    prob=cfg.elastic_prob, mode=("bilinear", "nearest"), padding_mode="border"))
    if cfg.intensity_prob > 0:
        ops.append(T.RandScaleIntensityd("image", factors=cfg.intensity_scale, prob=cfg.intensity_prob))
        ops.append(T.RandShiftIntensityd("image", offsets=cfg.intensity_shift, prob=cfg.intensity_prob))
    if cfg.noise_prob > 0:
        ops.append(T.RandGaussianNoised("image", prob=cfg.noise_prob, std=cfg.noise_std))
    return T.Compose(ops)


def sample_seed(base: int, epoch: int, row: int) -> int:
    return int((base * 1_000_003 + epoch * 100_003 + row * 7919 + 17) % (2**32 - 1))


def augment(pipeline: T.Compose | None, image: np.ndarray, label: np.ndarray, seed: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) image and label -> augmented copies (same shapes)."""
    if pipeline is None:
        return image, label
    pipeline.set_random_state(seed=seed)
    out = pipeline({"image": image[None].astype(np.float32), "label": label[None].astype(np.float32)})
    img = np.asarray(out["image"])[0].astype(np.float32)
    lab = np.rint(np.asarray(out["label"])[0]).astype(np.int64)
    return img, lab
