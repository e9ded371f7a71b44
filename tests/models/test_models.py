"""Tests for the PCL UNet backbone, weight transfer and the backbone registry."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medssl.errors import ConfigError
from medssl.models import (
    SegmentationModel,
    UNetDecoder,
    UNetEncoder,
    available_backbones,
    build_model,
    count_parameters,
    load_encoder,
    load_full,
)

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _small(features: int = 4, n_classes: int = 3, in_channels: int = 1) -> SegmentationModel:
    return build_model("unet", in_channels=in_channels, n_classes=n_classes, features=features)


@pytest.mark.parametrize("hw", [(64, 64), (128, 96)])
def test_forward_shape(hw: tuple[int, int]) -> None:
    model = _small(features=4, n_classes=3, in_channels=2).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 2, *hw))
    assert out.shape == (2, 3, *hw)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(("features", "expected"), [(32, 7.76e6), (48, 17.46e6)])
def test_parameter_count_matches_paper(features: int, expected: float) -> None:
    model = build_model("unet", in_channels=1, n_classes=8, features=features)
    assert abs(count_parameters(model) - expected) < 0.05e6
    # exact analytic values (docs/kaf.md#parameter-counts: UNet(c1) 7.76M / 17.46M)
    assert count_parameters(model) == {32: 7_763_584, 48: 17_462_208}[features]


def test_default_features_is_32() -> None:
    model = build_model("unet", in_channels=1, n_classes=8)
    assert model.encoder.out_channels == [32, 64, 128, 256, 512]


def test_encoder_outputs_channels_and_resolutions() -> None:
    model = _small(features=8)
    assert isinstance(model.encoder, UNetEncoder) and isinstance(model.decoder, UNetDecoder)
    assert model.encoder.out_channels == [8, 16, 32, 64, 128]
    feats = model.encoder(torch.randn(1, 1, 64, 96))
    assert [f.shape[1] for f in feats] == model.encoder.out_channels
    assert [tuple(f.shape[-2:]) for f in feats] == [(64, 96), (32, 48), (16, 24), (8, 12), (4, 6)]
    dec = model.decoder(feats)
    assert dec.shape == (1, 8, 64, 96)
    # centre has no normalisation and ends with ReLU
    assert (feats[-1] >= 0).all()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.encoder.centre.modules())


def test_structure_and_init() -> None:
    model = _small(features=8)
    keys = model.state_dict().keys()
    assert {k.split(".")[0] for k in keys} == {"encoder", "decoder", "head"}
    assert model.head.bias is None and model.head.kernel_size == (1, 1)
    convs = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert all(m.bias is None or torch.count_nonzero(m.bias) == 0 for m in convs)
    lrelu = [m for m in model.modules() if isinstance(m, torch.nn.LeakyReLU)]
    assert len(lrelu) == 16 and all(m.negative_slope == 0.01 for m in lrelu)
    assert sum(isinstance(m, torch.nn.ConvTranspose2d) for m in model.modules()) == 4
    # Kaiming-normal (a=0.01, fan_in): std = gain / sqrt(fan_in)
    w = model.encoder.centre[2].weight  # 128 -> 128, 3x3
    expected = (2.0 / (1 + 0.01**2)) ** 0.5 / (128 * 9) ** 0.5
    assert abs(w.std().item() / expected - 1) < 0.02


def test_bad_spatial_size_raises() -> None:
    model = _small()
    with pytest.raises(ConfigError, match="divisible by 16"):
        model(torch.randn(1, 1, 72, 64))
    with pytest.raises(ConfigError, match=r"\(B, C, H, W\)"):
        model.encoder(torch.randn(1, 64, 64))


def test_load_encoder_transfers_exactly() -> None:
    src = _small(features=8)
    dst = _small(features=8, n_classes=5)  # a different head must not matter
    # perturb BN running stats in the source so buffers are checked too
    src.train()
    src(torch.randn(2, 1, 32, 32))
    dec_before = {k: v.clone() for k, v in dst.decoder.state_dict().items()}
    head_before = dst.head.weight.clone()
    state = src.state_dict()
    state["proj_head.0.weight"] = torch.zeros(3)  # pretraining-head keys are ignored
    loaded = load_encoder(dst, state, strict=True)
    assert len(loaded) == len(src.encoder.state_dict())
    for k, v in src.encoder.state_dict().items():
        assert torch.equal(dst.encoder.state_dict()[k], v), k
    for k, v in dst.decoder.state_dict().items():
        assert torch.equal(v, dec_before[k]), k
    assert torch.equal(dst.head.weight, head_before)
    assert not torch.equal(dst.decoder.stages[0].up.weight, src.decoder.stages[0].up.weight)


def test_load_encoder_accepts_checkpoint_wrappers() -> None:
    src, dst = _small(), _small()
    wrapped = {"model": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}
    load_encoder(dst, wrapped)
    assert torch.equal(dst.encoder.centre[0].weight, src.encoder.centre[0].weight)


def test_load_encoder_fails_loudly_on_other_width() -> None:
    other = build_model("unet", in_channels=1, n_classes=3, features=8)
    model = _small(features=4)
    with pytest.raises(ConfigError, match="wrong shape") as info:
        load_encoder(model, other.state_dict())
    assert "\n" not in str(info.value) and "encoder.blocks.0.0.0.weight" in str(info.value)


def test_load_encoder_fails_on_other_backbone_and_missing_keys() -> None:
    model = _small(features=32)
    basic = build_model("monai-basicunet", in_channels=1, n_classes=3)
    with pytest.raises(ConfigError, match="do not match|wrong shape"):
        load_encoder(model, basic.state_dict())
    partial = {k: v for k, v in model.state_dict().items() if "centre" not in k}
    with pytest.raises(ConfigError, match="missing"):
        load_encoder(model, partial)
    assert load_encoder(model, partial, strict=False)  # non-strict loads what matches
    with pytest.raises(ConfigError, match="no 'encoder"):
        load_encoder(model, {"decoder.x": torch.zeros(1)})


def test_load_full_roundtrip_and_mismatch() -> None:
    src, dst = _small(n_classes=3), _small(n_classes=3)
    load_full(dst, src.state_dict())
    x = torch.randn(1, 1, 32, 32)
    assert torch.equal(src.eval()(x), dst.eval()(x))
    with pytest.raises(ConfigError, match="head.weight"):
        load_full(_small(n_classes=4), src.state_dict())


def test_registry() -> None:
    assert {"unet", "monai-basicunet"} <= set(available_backbones())
    with pytest.raises(ConfigError, match="available: .*unet") as info:
        build_model("resnet-unet", in_channels=1, n_classes=2)
    assert "resnet-unet" in str(info.value)
    with pytest.raises(ConfigError, match="bad option"):
        build_model("unet", in_channels=1, n_classes=2, width=3)


def test_backward_gives_finite_grads() -> None:
    model = _small(features=4, n_classes=3).train()
    x = torch.randn(2, 1, 32, 48)
    y = torch.randint(0, 3, (2, 32, 48))
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.encoder.blocks[0][0][0].weight.grad.abs().sum() > 0


def test_monai_basicunet_wrapper_equals_monai() -> None:
    from monai.networks.nets import BasicUNet

    ref = BasicUNet(spatial_dims=2, in_channels=1, out_channels=3, features=(4, 4, 8, 16, 32, 4)).eval()
    ours = build_model("monai-basicunet", in_channels=1, n_classes=3, features=(4, 4, 8, 16, 32, 4)).eval()
    rename = {"conv_0": "encoder.conv_0", "final_conv": "head"}
    rename |= {f"down_{i}": f"encoder.downs.{i - 1}" for i in range(1, 5)}
    rename |= {f"upcat_{i}": f"decoder.ups.{4 - i}" for i in range(1, 5)}
    sd = {}
    for k, v in ref.state_dict().items():
        first, rest = k.split(".", 1)
        sd[f"{rename[first]}.{rest}"] = v
    load_full(ours, sd, strict=True)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=1e-6)
    assert count_parameters(ours) == count_parameters(ref)


def test_import_does_not_pull_torchvision_or_timm() -> None:
    code = "import sys, medssl.models; print(sorted(m for m in ('torchvision', 'timm') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": str(SRC)}, check=True
    )
    assert out.stdout.strip() == "[]"
