"""Tests for the PolyCL UNet backbone ("polycl-unet", docs/methods.md#polycl-unet)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medssl.errors import ConfigError
from medssl.models import SegmentationModel, available_backbones, build_model, count_parameters, load_encoder
from medssl.models.polycl_unet import (
    DoubleConv,
    PolyCLDecoder,
    PolyCLEncoder,
    PolyCLProjectionHead,
    build_polycl_unet,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_parameter_counts_match_spec() -> None:
    model = build_model("polycl-unet", in_channels=1, n_classes=1)
    enc = count_parameters(model.encoder)
    assert enc == 1_178_480 and abs(enc - 1.178e6) < 0.5e3  # "encoder 1.178M parameters"
    head = PolyCLProjectionHead(model.encoder.out_channels[-1], 256)
    assert abs(enc + count_parameters(head) - 1.244e6) < 0.5e3  # "1.244M with the head"
    assert abs(count_parameters(model.decoder) - 0.784e6) < 0.5e3  # decoder 0.784M
    assert abs(count_parameters(model) - 1.96e6) < 0.005e6  # UNet 1.96M (16 -> 1 head)


def test_double_conv_layout() -> None:
    block = DoubleConv(3, 8, dropout=0.25)
    kinds = [type(m) for m in block]
    assert kinds == [nn.Conv2d, nn.InstanceNorm2d, nn.LeakyReLU] * 2 + [nn.Dropout]
    conv1, norm1, act1, conv2, norm2, _, drop = block
    assert conv1.kernel_size == (3, 3) and conv1.padding == (1, 1) and conv1.in_channels == 3
    assert conv2.in_channels == 8 and conv2.out_channels == 8
    assert norm1.num_features == norm2.num_features == 8  # the [R] bug (``in`` channels) is not reproduced
    assert not norm1.affine and not norm2.affine
    assert act1.negative_slope == pytest.approx(0.2)
    assert drop.p == pytest.approx(0.25)


def test_structure_and_widths() -> None:
    model = build_model("polycl-unet", in_channels=1, n_classes=2)
    assert isinstance(model, SegmentationModel)
    assert isinstance(model.encoder, PolyCLEncoder) and isinstance(model.decoder, PolyCLDecoder)
    assert model.encoder.out_channels == [16, 32, 64, 128, 256]
    assert [s.conv[0].in_channels for s in model.decoder.stages] == [384, 192, 96, 48]
    assert [s.conv[0].out_channels for s in model.decoder.stages] == [128, 64, 32, 16]
    ups = [s.up for s in model.decoder.stages]
    assert all(u.mode == "bilinear" and u.align_corners and u.scale_factor == 2 for u in ups)
    assert model.head.in_channels == 16 and model.head.out_channels == 2 and model.head.kernel_size == (1, 1)
    prefixes = {k.split(".", 1)[0] for k in model.state_dict()}
    assert prefixes == {"encoder", "decoder", "head"}
    wide = build_model("polycl-unet", in_channels=3, n_classes=4, features=8, dropout=0.1)
    assert wide.encoder.out_channels == [8, 16, 32, 64, 128]
    assert wide.encoder.levels[0][0].in_channels == 3 and wide.encoder.levels[0][-1].p == pytest.approx(0.1)


@pytest.mark.parametrize("size", [64, 256])
def test_forward_shapes(size: int) -> None:
    model = build_polycl_unet(in_channels=1, n_classes=3).eval()
    x = torch.randn(2, 1, size, size)
    with torch.no_grad():
        feats = model.encoder(x)
        out = model(x)
    assert [tuple(f.shape) for f in feats] == [
        (2, 16 * 2**k, size // 2**k, size // 2**k) for k in range(5)
    ]
    if size == 256:
        assert feats[-1].shape[1:] == (256, 16, 16)  # conv5 of a 256² input
    assert out.shape == (2, 3, size, size)
    assert torch.isfinite(out).all()
    z = PolyCLProjectionHead()(feats[-1])
    assert z.shape == (2, 256)


def test_dropout_active_in_train_only() -> None:
    model = build_model("polycl-unet", in_channels=1, n_classes=2)
    x = torch.randn(1, 1, 32, 32)
    model.train()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert not torch.allclose(a, b)
    model.eval()
    with torch.no_grad():
        c, d = model(x), model(x)
    assert torch.equal(c, d)
    no_drop = build_model("polycl-unet", in_channels=1, n_classes=2, dropout=0.0).train()
    with torch.no_grad():
        assert torch.equal(no_drop(x), no_drop(x))


def test_registry_and_bad_options() -> None:
    assert "polycl-unet" in available_backbones()
    with pytest.raises(ConfigError, match="bad option"):
        build_model("polycl-unet", in_channels=1, n_classes=2, width=3)
    with pytest.raises(ConfigError, match="model.dropout"):
        build_model("polycl-unet", in_channels=1, n_classes=2, dropout=1.5)
    with pytest.raises(ConfigError, match="divisible by 16"):
        build_polycl_unet().eval()(torch.randn(1, 1, 40, 40))


def test_load_encoder_between_polycl_models() -> None:
    src = build_polycl_unet(n_classes=2, features=4)
    dst = build_polycl_unet(n_classes=5, features=4)
    loaded = load_encoder(dst, src.state_dict())
    assert len(loaded) == len(dst.encoder.state_dict())
    for k, v in dst.encoder.state_dict().items():
        assert torch.equal(v, src.encoder.state_dict()[k])
    assert not torch.equal(dst.decoder.stages[0].conv[0].weight, src.decoder.stages[0].conv[0].weight)


def test_load_encoder_from_other_backbone_raises() -> None:
    polycl = build_model("polycl-unet", in_channels=1, n_classes=2)
    unet = build_model("unet", in_channels=1, n_classes=2, features=16)
    with pytest.raises(ConfigError, match="another backbone") as info:
        load_encoder(polycl, unet.state_dict())
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="another backbone") as info:
        load_encoder(unet, polycl.state_dict())
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="wrong shape"):  # same backbone, other width
        load_encoder(polycl, build_polycl_unet(features=8).state_dict())
