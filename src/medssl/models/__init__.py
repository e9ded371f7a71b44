"""Segmentation backbones (encoder / decoder / head) and the backbone registry."""

from __future__ import annotations

from medssl.models.registry import available_backbones, build_model, register_backbone
from medssl.models.unet import (
    SegmentationModel,
    UNetDecoder,
    UNetEncoder,
    build_unet,
    count_parameters,
    load_encoder,
    load_full,
)

__all__ = [
    "SegmentationModel",
    "UNetDecoder",
    "UNetEncoder",
    "available_backbones",
    "build_model",
    "build_unet",
    "count_parameters",
    "load_encoder",
    "load_full",
    "register_backbone",
]
