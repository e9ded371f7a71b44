"""The PolyCL UNet (docs/methods.md#polycl-unet): a 5-level ``double_conv`` encoder and a bilinear-upsampling decoder.

Same layout as every backbone of the project (see :mod:`medssl.models.unet`): a :class:`SegmentationModel` with
``.encoder`` (returns ``[l1, l2, l3, l4, l5]``, attribute ``out_channels``), ``.decoder`` and ``.head``, so that
:func:`~medssl.models.unet.load_encoder` transfers a pretrained PolyCL encoder.

Sizes for ``features=16``, one input channel: encoder 1,178,480 parameters (paper: 1.178M), projection head
65,792 (1.244M together), decoder 783,840 (paper: 0.784M), the whole UNet with a 16->1 head 1,962,337 (paper: 1.96M).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from medssl.errors import ConfigError
from medssl.models.unet import SegmentationModel, UNetDecoder, check_spatial_size

__all__ = [
    "POLYCL_LEAKY_SLOPE",
    "DoubleConv",
    "PolyCLEncoder",
    "PolyCLDecoder",
    "PolyCLProjectionHead",
    "build_polycl_unet",
]

POLYCL_LEAKY_SLOPE = 0.2
LEVELS = 5


class DoubleConv(nn.Sequential):
    """PolyCL ``double_conv``: 2x [Conv3x3 (pad 1, bias) -> InstanceNorm2d(out, affine=False) -> LeakyReLU(0.2)]
    then element-wise ``nn.Dropout(p)`` (not Dropout2d; which one the original used could not be checked).

    The reference builds the second InstanceNorm with ``in`` channels; harmless with affine=False, we use ``out``.
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.25) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.InstanceNorm2d(out_channels, affine=False),
            nn.LeakyReLU(POLYCL_LEAKY_SLOPE, inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
            nn.InstanceNorm2d(out_channels, affine=False),
            nn.LeakyReLU(POLYCL_LEAKY_SLOPE, inplace=True),
            nn.Dropout(p=dropout),
        )


def _check_options(in_channels: int, features: int, dropout: float) -> None:
    if in_channels < 1 or features < 1:
        raise ConfigError(f"model: in_channels and features must be >= 1, got {in_channels} and {features}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ConfigError(f"model.dropout: must be in [0, 1), got {dropout}")


class PolyCLEncoder(nn.Module):
    """Five ``double_conv`` levels of widths f, 2f, 4f, 8f, 16f with MaxPool2d(2) between levels.

    ``forward`` returns every level's output ``[l1, ..., l5]``; l5 (conv5) is at H/16 x W/16
    (a 1x256x256 input gives 256x16x16 for f=16).
    """

    def __init__(self, in_channels: int = 1, features: int = 16, dropout: float = 0.25) -> None:
        super().__init__()
        _check_options(in_channels, features, dropout)
        widths = [features * 2**k for k in range(LEVELS)]
        self.levels = nn.ModuleList()
        c_in = in_channels
        for c in widths:
            self.levels.append(DoubleConv(c_in, c, dropout))
            c_in = c
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.in_channels = in_channels
        self.features = features
        self.dropout = float(dropout)
        self.out_channels: list[int] = widths

    def forward(self, x: Tensor) -> list[Tensor]:
        check_spatial_size(x)
        feats: list[Tensor] = []
        for i, level in enumerate(self.levels):
            x = level(x if i == 0 else self.pool(x))
            feats.append(x)
        return feats


class _UpStage(nn.Module):
    """Bilinear x2 upsampling (align_corners=True) -> concat skip -> ``double_conv(in + skip, skip)``."""

    def __init__(self, in_channels: int, skip_channels: int, dropout: float) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv = DoubleConv(in_channels + skip_channels, skip_channels, dropout)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class PolyCLDecoder(UNetDecoder):
    """Four bilinear up-stages (16f+8f -> 8f), (8f+4f -> 4f), (4f+2f -> 2f), (2f+f -> f) (docs/methods.md#polycl-unet).

    The upsampling has no parameters, so the channel count is not halved before the concat (the standard
    "bilinear UNet": 256+128 -> 128, ... for f=16). The stages reuse ``double_conv``, dropout included.
    """

    def __init__(self, encoder_channels: Sequence[int], dropout: float = 0.25) -> None:
        super().__init__(encoder_channels, make_stage=lambda c, skip_c: _UpStage(c, skip_c, dropout))


class PolyCLProjectionHead(nn.Module):
    """Pretraining head on conv5: MaxPool2d(2) -> AdaptiveAvgPool2d(1) -> one Linear(c, out_dim), no non-linearity."""

    def __init__(self, in_channels: int = 256, out_dim: int = 256) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, out_dim)

    def forward(self, conv5: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.avg(self.pool(conv5)), 1))


def build_polycl_unet(
    in_channels: int = 1, n_classes: int = 2, features: int = 16, dropout: float = 0.25
) -> SegmentationModel:
    """PolyCL UNet: encoder + bilinear decoder + Conv1x1 head (f -> n_classes, with bias); PyTorch default init."""
    if n_classes < 1:
        raise ConfigError(f"model: n_classes must be >= 1, got {n_classes}")
    encoder = PolyCLEncoder(in_channels, features, dropout)
    decoder = PolyCLDecoder(encoder.out_channels, dropout)
    head = nn.Conv2d(decoder.out_channels, n_classes, kernel_size=1)
    return SegmentationModel(encoder, decoder, head)
