"""A tiny backbone registry: ``@register_backbone(name)`` builders and :func:`build_model`.

A builder takes ``in_channels`` and ``n_classes`` as keywords plus its own options and returns a
:class:`~medssl.models.unet.SegmentationModel`. New backbones register with one decorated function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from medssl.errors import ConfigError
from medssl.models.kaf.kaf_unet import build_kaf_unet
from medssl.models.polycl_unet import build_polycl_unet
from medssl.models.unet import SegmentationModel, build_monai_basicunet, build_unet
from medssl.registry import Registry

__all__ = ["register_backbone", "build_model", "available_backbones"]

Builder = Callable[..., SegmentationModel]
_BACKBONES: Registry[Builder] = Registry("backbone")


def register_backbone(name: str) -> Callable[[Builder], Builder]:
    """Decorator registering ``fn(*, in_channels, n_classes, **kwargs) -> SegmentationModel`` under ``name``."""
    return _BACKBONES.register(name)


def available_backbones() -> list[str]:
    """Registered backbone names, sorted."""
    return _BACKBONES.names()


def build_model(name: str, *, in_channels: int, n_classes: int, **kwargs: Any) -> SegmentationModel:
    """Build the registered backbone ``name``; ConfigError for an unknown name or option."""
    builder = _BACKBONES.get(name, what="model.backbone")
    try:
        return builder(in_channels=in_channels, n_classes=n_classes, **kwargs)
    except TypeError as exc:
        if "keyword argument" not in str(exc):
            raise
        raise ConfigError(f"model: bad option for backbone {name!r}: {exc}") from None


@register_backbone("unet")
def _unet(*, in_channels: int, n_classes: int, features: int = 32) -> SegmentationModel:
    return build_unet(in_channels=in_channels, n_classes=n_classes, features=features)


@register_backbone("monai-basicunet")
def _monai_basicunet(
    *, in_channels: int, n_classes: int, features: int | tuple[int, ...] = (32, 32, 64, 128, 256, 32)
) -> SegmentationModel:
    if isinstance(features, int):  # model.features=f gives MONAI's pattern (f, f, 2f, 4f, 8f, f)
        f = features
        features = (f, f, 2 * f, 4 * f, 8 * f, f)
    return build_monai_basicunet(in_channels=in_channels, n_classes=n_classes, features=tuple(features))


@register_backbone("polycl-unet")
def _polycl_unet(*, in_channels: int, n_classes: int, features: int = 16, dropout: float = 0.25) -> SegmentationModel:
    return build_polycl_unet(in_channels=in_channels, n_classes=n_classes, features=features, dropout=dropout)


@register_backbone("kaf-unet")
def _kaf_unet(*, in_channels: int, n_classes: int, features: int = 32, **options: Any) -> SegmentationModel:
    """KAF-UNet (docs/kaf.md#kaf-unet); options: kaf_scales, kaf_dim, kaf_heads, kaf_layers, kaf_norm, kaf_sampler,
    kaf_collision, max_keypoints, sift_upsample, dedupe_keypoints (see docs/kaf.md)."""
    return build_kaf_unet(in_channels=in_channels, n_classes=n_classes, features=features, **options)
