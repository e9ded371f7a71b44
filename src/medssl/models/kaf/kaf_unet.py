"""KAF-UNet (docs/kaf.md#kaf-unet): the PCL-style UNet with a KAF layer at selected scales, as a backbone.

Encoder block l (C_l = f·2^(l-1)): unit(c_in -> C_l) -> unit(C_l -> C_l) -> KAF_l (+C_l channels) -> concat
(2·C_l, the skip) -> max-pool; block l+1 receives 2·C_l = C_{l+1}. Centre 16f -> 32f -> 32f (ReLU, no norm).
Decoder: the PCL decoder at f' = 2f; head Conv1x1 f' -> classes (no bias).

A scale without a KAF layer (ablations "1110" etc., docs/kaf.md#ablation-rows) keeps every width: its second
unit outputs 2·C_l directly (C_l -> 2·C_l) instead of concatenating the KAF branch (our choice: the released
code's exact variant is unknown); with no KAF scale at all this is the "UNet(c2)" of docs/kaf.md#parameter-counts.

Keypoints are float (x, y) pixels in the input frame (:class:`Keypoints`). ``model(x)`` without keypoints
runs SIFT on ``x`` itself (so ``medssl predict`` and validation work unchanged); fine-tuning passes the
cached keypoints carried exactly through the augmentation (:meth:`KAFSegmentationModel.prepare_batch`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from medssl.errors import ConfigError
from medssl.models.kaf.keypoints import Keypoints, KeypointSettings, detect_batch
from medssl.models.kaf.layer import NORMS, KAFLayer
from medssl.models.unet import (
    ContractUnit,
    SegmentationModel,
    UNetDecoder,
    check_spatial_size,
    count_parameters,
    init_kaiming,
)

__all__ = ["KAFUNetEncoder", "KAFSegmentationModel", "build_kaf_unet", "kaf_parameter_count",
           "LEGACY_DEAD_PARAMS_PER_LAYER"]

CONFIG_VERSION = 1
# docs/kaf.md#parameter-counts: every SuperGlue instance of the released code owns an unused Conv1d 256->256
# and a dustbin scalar
LEGACY_DEAD_PARAMS_PER_LAYER = 256 * 256 + 256 + 1
_CONFIG_FIELDS = ("format version", "KAF width (kaf_dim)", "attention heads (kaf_heads)",
                  "attention layers per KAF layer (kaf_layers, L_att)", "KAF scales (kaf_scales)",
                  "attention-MLP norm (kaf_norm)")


def _scale_mask(scales: Sequence[int]) -> int:
    return sum(1 << (s - 1) for s in scales)


def _describe(i: int, value: int) -> str:
    if i == 4:
        return str([s for s in range(1, 5) if value >> (s - 1) & 1])
    if i == 5:
        return NORMS[value] if 0 <= value < len(NORMS) else str(value)
    return str(value)


class KAFUNetEncoder(nn.Module):
    """CNN + KAF encoder; ``forward(x, keypoints=None) -> [skip_1..skip_4, centre]`` (widths 2f..16f, 32f)."""

    def __init__(self, in_channels: int = 1, features: int = 32, *, scales: Sequence[int] = (1, 2, 3, 4),
                 dim: int = 256, heads: int = 4, n_attention: int = 16, norm: str = "batch",
                 sampler: str = "nearest", collision: str = "sum",
                 keypoints: KeypointSettings | None = None) -> None:
        super().__init__()
        if in_channels < 1 or features < 1:
            raise ConfigError(f"model: in_channels and features must be >= 1, got {in_channels} and {features}")
        scales = sorted(int(s) for s in scales)
        if len(set(scales)) != len(scales) or any(s not in (1, 2, 3, 4) for s in scales):
            raise ConfigError(f"model.options.kaf_scales must be distinct values in 1..4, got {scales}")
        if norm not in NORMS:
            raise ConfigError(f"model.options.kaf_norm must be one of {NORMS}, got {norm!r}")
        self.kaf_scales, self.kaf_dim, self.kaf_heads, self.kaf_layers = scales, dim, heads, n_attention
        self.keypoint_settings = keypoints or KeypointSettings()
        self.blocks = nn.ModuleList()
        self.kaf = nn.ModuleDict()
        c_in = in_channels
        for level in range(1, 5):
            c = features * 2 ** (level - 1)
            has_kaf = level in scales
            self.blocks.append(nn.Sequential(ContractUnit(c_in, c), ContractUnit(c, c if has_kaf else 2 * c)))
            if has_kaf:
                self.kaf[f"l{level}"] = KAFLayer(c, 2 ** (level - 1), dim=dim, heads=heads, n_attention=n_attention,
                                                 norm=norm, sampler=sampler, collision=collision)
            c_in = 2 * c
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        centre = 32 * features
        self.centre = nn.Sequential(
            nn.Conv2d(c_in, centre, kernel_size=3, padding=1, bias=True), nn.ReLU(inplace=True),
            nn.Conv2d(centre, centre, kernel_size=3, padding=1, bias=True), nn.ReLU(inplace=True))
        self.in_channels, self.features = in_channels, features
        self.out_channels: list[int] = [2 * features * 2**i for i in range(4)] + [centre]
        # stored in every checkpoint so that a load with other KAF settings fails loudly (released-code defect 7)
        config = [CONFIG_VERSION, dim, heads, n_attention, _scale_mask(scales), NORMS.index(norm)]
        self.register_buffer("kaf_config", torch.tensor(config, dtype=torch.long))

    # ------------------------------------------------------------------ keypoints
    def detect(self, x: Tensor) -> Keypoints:
        """SIFT keypoints of each input slice (CPU, OpenCV), without descriptors, on ``x``'s device."""
        return detect_batch(x, self.keypoint_settings, with_desc=False).to(x.device)

    def forward_kaf(self, x: Tensor, keypoints: Keypoints) -> tuple[list[Tensor], list[Tensor]]:
        """-> (features [skip_1..skip_4, centre], attended keypoint features per KAF scale, each (B, N, D))."""
        check_spatial_size(x)
        if keypoints.batch_size != x.shape[0]:
            raise ConfigError(f"KAF: {keypoints.batch_size} keypoint sets for a batch of {x.shape[0]}")
        xy, valid = keypoints.xy.to(x.device), keypoints.valid.to(x.device)
        skips: list[Tensor] = []
        kp_feats: list[Tensor] = []
        for level, block in enumerate(self.blocks, start=1):
            x = block(x)
            name = f"l{level}"
            if name in self.kaf:
                x, s = self.kaf[name](x, xy, valid)
                kp_feats.append(s)
            skips.append(x)
            x = self.pool(x)
        return [*skips, self.centre(x)], kp_feats

    def forward(self, x: Tensor, keypoints: Keypoints | None = None) -> list[Tensor]:
        if keypoints is None:
            check_spatial_size(x)
            keypoints = self.detect(x)
        return self.forward_kaf(x, keypoints)[0]

    # ------------------------------------------------------------------ checkpoints
    def check_state_dict(self, sd: Mapping[str, Tensor], prefix: str = "") -> None:
        """ConfigError naming the setting when ``sd`` was saved with other KAF settings (or is no KAF encoder)."""
        key = prefix + "kaf_config"
        if key not in sd:
            raise ConfigError(f"checkpoint: no '{key}' entry: not a kaf-unet encoder (another backbone?)")
        have, want = [int(v) for v in sd[key].tolist()], [int(v) for v in self.kaf_config.tolist()]
        if have != want:
            diffs = [f"{name} {_describe(i, a)} in the checkpoint vs {_describe(i, b)} in the model"
                     for i, (name, a, b) in enumerate(zip(_CONFIG_FIELDS, have, want)) if a != b]
            if len(have) != len(want):
                diffs.append(f"{len(have)} settings stored vs {len(want)}")
            raise ConfigError(f"checkpoint: KAF settings differ: {'; '.join(diffs)}")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # model.load_state_dict path
        self.check_state_dict(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class KAFSegmentationModel(SegmentationModel):
    """encoder (KAF) -> decoder -> head; ``forward(x, keypoints=None)`` (SIFT on ``x`` when None)."""

    ddp_find_unused = True  # a batch without keypoints on one rank skips that rank's attention layers
    canvas_batches = True  # its cached keypoints live in canvas coordinates

    def forward(self, x: Tensor, keypoints: Keypoints | None = None) -> Tensor:
        return self.head(self.decoder(self.encoder(x, keypoints)))

    def check_state_dict(self, sd: Mapping[str, Tensor], prefix: str = "") -> None:
        self.encoder.check_state_dict(sd, prefix + "encoder.")

    def prepare_batch(self, batch: dict, image: Tensor, label: Tensor, augment, generator, cache):
        """Fine-tuning hook: the batch's cached keypoints (by cache row), carried exactly through the same
        augmentation as the image -> (image, label, {"keypoints": Keypoints}) for ``forward``."""
        from medssl.models.kaf.store import KeypointStore
        from medssl.models.kaf.transport import augment_with_keypoints

        store = getattr(self, "_kp_store", None)
        if store is None or store.cache is not cache:
            store = KeypointStore(cache, self.encoder.keypoint_settings)
            self._kp_store = store  # a plain attribute: not a submodule, not in the state dict
        kp = store.get(batch["row"], with_desc=False).to(image.device)
        image, label, kp = augment_with_keypoints(augment, image, label, kp, generator)
        return image, label, {"keypoints": kp}


def build_kaf_unet(in_channels: int = 1, n_classes: int = 2, features: int = 32, *,
                   kaf_scales: Sequence[int] = (1, 2, 3, 4), kaf_dim: int = 256, kaf_heads: int = 4,
                   kaf_layers: int = 16, kaf_norm: str = "batch", kaf_sampler: str = "nearest",
                   kaf_collision: str = "sum", max_keypoints: int = 0, sift_upsample: int = 1,
                   dedupe_keypoints: bool = False) -> KAFSegmentationModel:
    """KAF-UNet; paper settings (f=32, 8 classes / f=48, 4 classes, L_att=16) give 71.47M / 106.55M
    parameters, 71.73M / 106.81M with the released code's dead parameters (:func:`kaf_parameter_count`)."""
    if n_classes < 1:
        raise ConfigError(f"model: n_classes must be >= 1, got {n_classes}")
    kp = KeypointSettings(max_keypoints=int(max_keypoints), upsample=int(sift_upsample),
                          dedupe=bool(dedupe_keypoints))
    encoder = KAFUNetEncoder(in_channels, features, scales=kaf_scales, dim=kaf_dim, heads=kaf_heads,
                             n_attention=kaf_layers, norm=kaf_norm, sampler=kaf_sampler, collision=kaf_collision,
                             keypoints=kp)
    decoder = UNetDecoder(encoder.out_channels)
    head = nn.Conv2d(decoder.out_channels, n_classes, kernel_size=1, bias=False)
    model = KAFSegmentationModel(encoder, decoder, head)
    init_kaiming(model)  # Conv2d / ConvTranspose2d only; the point-wise (Conv1d) layers keep PyTorch defaults
    return model


def kaf_parameter_count(model: nn.Module, *, legacy_dead_params: bool = False) -> int:
    """Parameters of a KAF model; ``legacy_dead_params`` adds the 65,793 unused parameters per KAF layer that
    the released code owns (docs/kaf.md#parameter-counts; reporting only)."""
    n = count_parameters(model)
    if legacy_dead_params:
        n += LEGACY_DEAD_PARAMS_PER_LAYER * sum(isinstance(m, KAFLayer) for m in model.modules())
    return n
