"""The 2D PCL UNet ("UNet(c1)", docs/methods.md#backbones) and encoder transfer helpers.

Layout shared by every backbone of the project: a :class:`SegmentationModel` holds ``.encoder``
(``forward(x) -> [skip_1, ..., skip_4, centre]``, attribute ``out_channels``), ``.decoder``
(``forward(features) -> last decoder map``) and ``.head`` (Conv 1x1 to the classes), so that state-dict keys
start with ``encoder.``, ``decoder.`` and ``head.`` and a pretrained encoder transfers with :func:`load_encoder`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from medssl.errors import ConfigError

__all__ = [
    "LEAKY_SLOPE",
    "ContractUnit",
    "UNetEncoder",
    "UNetDecoder",
    "SegmentationModel",
    "MonaiBasicUNetEncoder",
    "MonaiBasicUNetDecoder",
    "build_unet",
    "build_monai_basicunet",
    "init_kaiming",
    "check_spatial_size",
    "load_encoder",
    "load_full",
    "count_parameters",
]

LEAKY_SLOPE = 0.01
DOWNSAMPLING = 16  # four 2x2 max-pools


def check_spatial_size(x: Tensor, factor: int = DOWNSAMPLING) -> None:
    """Raise ConfigError unless ``x`` is (B, C, H, W) with H and W divisible by ``factor``."""
    if x.dim() != 4:
        raise ConfigError(f"model input: expected a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h % factor or w % factor:
        raise ConfigError(
            f"model input: H and W must be divisible by {factor}, got {h}x{w} (pad or crop the patch size)"
        )


class ContractUnit(nn.Sequential):
    """Conv3x3 (pad 1, bias) -> BatchNorm2d -> LeakyReLU(0.01)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=True),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
        )


def _double_unit(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(ContractUnit(in_channels, out_channels), ContractUnit(out_channels, out_channels))


class UNetEncoder(nn.Module):
    """Four levels of 2x contract units (widths f, 2f, 4f, 8f, max-pool after each) and a norm-free centre 16f.

    ``forward`` returns the four pre-pool skip features then the centre (H/16 x W/16) as the last element.
    """

    def __init__(self, in_channels: int = 1, features: int = 32) -> None:
        super().__init__()
        if in_channels < 1 or features < 1:
            raise ConfigError(f"model: in_channels and features must be >= 1, got {in_channels} and {features}")
        widths = [features * 2**i for i in range(4)]
        self.blocks = nn.ModuleList()
        c_in = in_channels
        for c in widths:
            self.blocks.append(_double_unit(c_in, c))
            c_in = c
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        centre = 16 * features
        self.centre = nn.Sequential(
            nn.Conv2d(c_in, centre, kernel_size=3, padding=1, bias=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(centre, centre, kernel_size=3, padding=1, bias=True),
            nn.ReLU(inplace=True),
        )
        self.in_channels = in_channels
        self.features = features
        self.out_channels: list[int] = [*widths, centre]

    def forward(self, x: Tensor) -> list[Tensor]:
        check_spatial_size(x)
        skips: list[Tensor] = []
        for block in self.blocks:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        return [*skips, self.centre(x)]


class _UpStage(nn.Module):
    """ConvTranspose2d(k=2, s=2) halving the channels, concat the skip, then 2x contract unit."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
        self.convs = _double_unit(in_channels // 2 + skip_channels, out_channels)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = self.up(x)
        if x.shape[-2:] != skip.shape[-2:]:  # PCL centre-crops the skip; a no-op for sizes divisible by 16
            dh, dw = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]
            skip = skip[..., dh // 2 : dh // 2 + x.shape[-2], dw // 2 : dw // 2 + x.shape[-1]]
        return self.convs(torch.cat([x, skip], dim=1))


class UNetDecoder(nn.Module):
    """Four up-stages (16f -> 8f -> 4f -> 2f -> f); returns the last map (f channels, full resolution).

    ``make_stage(in_channels, skip_channels)`` builds one stage (``forward(x, skip)``); the default is
    the PCL stage (transposed conv, concat, two contract units). Other UNets pass their own.
    """

    def __init__(self, encoder_channels: Sequence[int], make_stage=None) -> None:
        super().__init__()
        make_stage = make_stage or (lambda c, skip_c: _UpStage(c, skip_c, skip_c))
        *skip_channels, c = list(encoder_channels)
        if len(skip_channels) != 4:
            raise ConfigError(f"model: decoder expects 5 encoder channel counts, got {list(encoder_channels)}")
        self.stages = nn.ModuleList()
        for skip_c in reversed(skip_channels):
            self.stages.append(make_stage(c, skip_c))
            c = skip_c
        self.out_channels = c

    def forward(self, features: list[Tensor]) -> Tensor:
        *skips, x = features
        for stage, skip in zip(self.stages, reversed(skips)):
            x = stage(x, skip)
        return x


class SegmentationModel(nn.Module):
    """encoder -> decoder -> head (Conv1x1, no bias); ``forward(x)`` gives logits (B, n_classes, H, W).

    A backbone needing more than the image overrides the fine-tuning hook :meth:`prepare_batch` (kaf-unet)."""

    ddp_find_unused = False  # True: a step may leave parameters unused (multi-GPU DDP must look for them)
    canvas_batches = False  # True: prepare_batch needs whole canvases (no train.patch_size patches)

    def prepare_batch(self, batch: dict, image: Tensor, label: Tensor, augment, generator, cache):
        """Fine-tuning hook: augment a batch -> ``(image, label, keyword arguments for forward)``. Default: the
        augmentation pipeline ``augment`` (None = off) on image and label, no extra keywords."""
        if augment is not None:
            image, label = augment(image, label, generator)
        return image, label, {}

    def __init__(self, encoder: nn.Module, decoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.decoder(self.encoder(x)))


def init_kaiming(module: nn.Module, a: float = LEAKY_SLOPE) -> None:
    """PCL init: Kaiming-normal (a=0.01) on Conv2d / ConvTranspose2d weights, zero bias."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, a=a)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def build_unet(in_channels: int = 1, n_classes: int = 2, features: int = 32) -> SegmentationModel:
    """The PCL UNet(c1): 7.76M parameters for f=32, 17.46M for f=48 (in_channels=1, n_classes=8)."""
    if n_classes < 1:
        raise ConfigError(f"model: n_classes must be >= 1, got {n_classes}")
    encoder = UNetEncoder(in_channels, features)
    decoder = UNetDecoder(encoder.out_channels)
    head = nn.Conv2d(decoder.out_channels, n_classes, kernel_size=1, bias=False)
    model = SegmentationModel(encoder, decoder, head)
    init_kaiming(model)
    return model


# --------------------------------------------------------------------------------------------------------------
# MONAI BasicUNet in the same encoder / decoder / head interface (optional alternative backbone).


class MonaiBasicUNetEncoder(nn.Module):
    """MONAI BasicUNet's ``conv_0`` and ``down_1..4`` (instance norm, LeakyReLU); returns 4 skips + bottleneck."""

    def __init__(self, in_channels: int, fea: Sequence[int]) -> None:
        super().__init__()
        from monai.networks.nets.basic_unet import Down, TwoConv

        act, norm = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True}), ("instance", {"affine": True})
        self.conv_0 = TwoConv(2, in_channels, fea[0], act, norm, True, 0.0)
        self.downs = nn.ModuleList(Down(2, fea[i], fea[i + 1], act, norm, True, 0.0) for i in range(4))
        self.out_channels: list[int] = list(fea[:5])

    def forward(self, x: Tensor) -> list[Tensor]:
        check_spatial_size(x)
        feats = [self.conv_0(x)]
        for down in self.downs:
            feats.append(down(feats[-1]))
        return feats


class MonaiBasicUNetDecoder(nn.Module):
    """MONAI BasicUNet's ``upcat_4..1`` (deconv upsampling); returns the last map (``fea[5]`` channels)."""

    def __init__(self, fea: Sequence[int]) -> None:
        super().__init__()
        from monai.networks.nets.basic_unet import UpCat

        act, norm = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True}), ("instance", {"affine": True})
        self.ups = nn.ModuleList(
            [
                UpCat(2, fea[4], fea[3], fea[3], act, norm, True, 0.0, "deconv"),
                UpCat(2, fea[3], fea[2], fea[2], act, norm, True, 0.0, "deconv"),
                UpCat(2, fea[2], fea[1], fea[1], act, norm, True, 0.0, "deconv"),
                UpCat(2, fea[1], fea[0], fea[5], act, norm, True, 0.0, "deconv", halves=False),
            ]
        )
        self.out_channels = fea[5]

    def forward(self, features: list[Tensor]) -> Tensor:
        *skips, x = features
        for up, skip in zip(self.ups, reversed(skips)):
            x = up(x, skip)
        return x


def build_monai_basicunet(
    in_channels: int = 1, n_classes: int = 2, features: Sequence[int] = (32, 32, 64, 128, 256, 32)
) -> SegmentationModel:
    """MONAI's BasicUNet (2D, its default norm / activation / init) split into encoder / decoder / head."""
    fea = tuple(int(c) for c in features)
    if len(fea) != 6 or min(fea) < 1:
        raise ConfigError(f"model: monai-basicunet 'features' must be 6 positive ints, got {list(features)}")
    encoder = MonaiBasicUNetEncoder(in_channels, fea)
    decoder = MonaiBasicUNetDecoder(fea)
    head = nn.Conv2d(fea[5], n_classes, kernel_size=1)
    return SegmentationModel(encoder, decoder, head)


# --------------------------------------------------------------------------------------------------------------
# Weight transfer.


def _unwrap(state_dict: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """Accept a bare state dict, a checkpoint {'state_dict'|'model': ...} and DataParallel 'module.' prefixes."""
    if not isinstance(state_dict, Mapping):
        raise ConfigError(f"checkpoint: expected a state dict (mapping), got {type(state_dict).__name__}")
    for key in ("state_dict", "model"):
        inner = state_dict.get(key)
        if isinstance(inner, Mapping):
            state_dict = inner
            break
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict


def _load_strictly(
    target: nn.Module, sd: Mapping[str, Tensor], what: str, prefix: str, strict: bool
) -> list[str]:
    check = getattr(target, "check_state_dict", None)  # backbones with settings to compare (kaf-unet)
    if callable(check):
        check(sd)
    own = target.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{prefix}{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if shapes:
        raise ConfigError(
            f"checkpoint: {len(shapes)} {what} tensor(s) have the wrong shape, e.g. {shapes[0]} "
            "(a checkpoint of another backbone or width?)"
        )
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {prefix}{missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {prefix}{unexpected[0]})")
        raise ConfigError(f"checkpoint: {what} keys do not match: {'; '.join(parts)} (another backbone?)")
    target.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return [k for k in own if k in sd]


def load_encoder(model: SegmentationModel, state_dict: Mapping[str, Tensor], strict: bool = True) -> list[str]:
    """Load the ``encoder.*`` subset of ``state_dict`` into ``model.encoder``; return the loaded keys.

    Other keys (decoder, head, pretraining heads) are ignored. Raises ConfigError when there is no ``encoder.``
    key, on any mis-shaped tensor, and (``strict``) on missing or unexpected encoder keys.
    """
    sd = _unwrap(state_dict)
    enc = {k[len("encoder.") :]: v for k, v in sd.items() if k.startswith("encoder.")}
    if not enc:
        raise ConfigError("checkpoint: no 'encoder.*' keys found (not a medssl model or pretraining checkpoint?)")
    return [f"encoder.{k}" for k in _load_strictly(model.encoder, enc, "encoder", "encoder.", strict)]


def load_full(model: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = True) -> list[str]:
    """Load a whole-model state dict (encoder, decoder and head); ConfigError on mismatch. Returns loaded keys."""
    return _load_strictly(model, _unwrap(state_dict), "model", "", strict)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
