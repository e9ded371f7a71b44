"""KAF (keypoint-augmented fusion, docs/kaf.md): SIFT keypoints, exact coordinate transport, the KAF layer and
the KAF-UNet backbone (``kaf-unet``). The pretraining matcher lives in :mod:`medssl.models.kaf.matching`."""

from __future__ import annotations

from medssl.models.kaf.kaf_unet import (
    KAFSegmentationModel,
    KAFUNetEncoder,
    build_kaf_unet,
    kaf_parameter_count,
)
from medssl.models.kaf.keypoints import DESC_DIM, Keypoints, KeypointSettings, detect_batch, detect_keypoints
from medssl.models.kaf.layer import KAFLayer, normalise_positions
from medssl.models.kaf.store import KeypointStore
from medssl.models.kaf.transport import (
    augment_with_keypoints,
    crop_points,
    fit_points,
    flip_points,
    pad_points,
    transport_points,
)

__all__ = [
    "DESC_DIM",
    "KAFLayer",
    "KAFSegmentationModel",
    "KAFUNetEncoder",
    "KeypointSettings",
    "KeypointStore",
    "Keypoints",
    "augment_with_keypoints",
    "build_kaf_unet",
    "crop_points",
    "detect_batch",
    "detect_keypoints",
    "fit_points",
    "flip_points",
    "kaf_parameter_count",
    "normalise_positions",
    "pad_points",
    "transport_points",
]
