"""Contrastive views (docs/methods.md#contrastive-views) and GCL-full's two stages and decoder transfer."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from medssl.config import AugConfig, PretrainConfig, ViewAugConfig, load_config
from medssl.data.augment import make_generator
from medssl.data.views import ContrastiveViews
from medssl.engine.checkpoint import load_checkpoint
from medssl.engine.finetune import finetune
from medssl.engine.pretrain import pretrain
from medssl.errors import ConfigError

OFF = dict(flip_prob=0, rotate_prob=0, intensity_prob=0, gamma_prob=0, noise_prob=0, blur_prob=0)


def _dot_image(h=48, w=64):
    x = torch.zeros(1, 1, h, w)
    x[0, 0, 20, 40] = 1.0
    return x


def test_identity_when_everything_is_off():
    cfg = ViewAugConfig(crop_scale=[1.0, 1.0], crop_ratio=[1.0, 1.0], **OFF)
    x = torch.randn(3, 1, 32, 48)
    y = ContrastiveViews(cfg)(x, make_generator(0))
    assert torch.allclose(x, y, atol=1e-5)


def test_flip_only_mirrors_columns():
    cfg = ViewAugConfig(crop_scale=[1.0, 1.0], crop_ratio=[1.0, 1.0], **{**OFF, "flip_prob": 1.0},
                        flip_axes=[1])
    x = torch.randn(2, 1, 32, 32)
    y = ContrastiveViews(cfg)(x, make_generator(1))
    assert torch.allclose(y, x.flip(-1), atol=1e-5)


def test_crop_zooms_in_and_keeps_size():
    """A crop of area fraction 1/4 magnifies by 2: a small square becomes about 4x larger in area."""
    cfg = ViewAugConfig(crop_scale=[0.25, 0.25], crop_ratio=[1.0, 1.0], **OFF)
    x = torch.zeros(64, 1, 64, 64)
    x[:, :, 28:36, 28:36] = 1.0  # 64 px square at the centre; the crop may move it but usually keeps it
    y = ContrastiveViews(cfg)(x, make_generator(2))
    assert y.shape == x.shape
    area = (y > 0.5).flatten(1).sum(1).float()
    full = area[area > 0]
    assert len(full) > 0 and float(full.max()) == pytest.approx(256, rel=0.15)


def test_intensity_ops_are_applied_on_rescaled_values_and_blur_smooths():
    cfg = ViewAugConfig(crop_scale=[1.0, 1.0], crop_ratio=[1.0, 1.0], **{**OFF, "blur_prob": 1.0},
                        blur_sigma=[1.0, 1.0])
    x = _dot_image()
    y = ContrastiveViews(cfg)(x, make_generator(3))
    assert float(y.max()) < 0.5 and float(y.sum()) == pytest.approx(float(x.sum()), rel=1e-4)
    z = torch.randn(4, 1, 32, 32) * 100 - 1000  # raw-HU-like values keep their range under contrast jitter
    cfg2 = ViewAugConfig(crop_scale=[1.0, 1.0], crop_ratio=[1.0, 1.0], **{**OFF, "intensity_prob": 1.0})
    v = ContrastiveViews(cfg2)(z, make_generator(4))
    assert float(v.min()) > -1000 - 600 and float(v.max()) < 0  # never clipped to [0, 1]
    assert not torch.allclose(v, z)


def test_views_are_seeded():
    x = torch.randn(4, 1, 32, 32)
    a = ContrastiveViews(ViewAugConfig())(x, make_generator(5))
    b = ContrastiveViews(ViewAugConfig())(x, make_generator(5))
    assert torch.equal(a, b)


TINY = ["data.size=32", "model.features=8", "train.batch_size=8", "train.amp=off", "train.threads=1",
        "split.n_folds=4", "split.val=1", "split.budget=2", "pretrain.proj_dim=16"]


def _cfg(tmp_path, root, *extra):
    return load_config("demo", overrides=[*TINY, f"data.path={root}", f"output_dir={tmp_path}",
                                          f"data.cache_dir={tmp_path / 'cache'}", *extra])


def test_gcl_full_stages_and_decoder_transfer(phantom_root, tmp_path):
    run = pretrain(_cfg(tmp_path, phantom_root, "pretrain.method=gcl-full", "name=pre", "train.epochs=2",
                        "train.steps_per_epoch=3", "pretrain.gcl_local_fraction=0.5", "pretrain.gcl_local_blocks=2"),
                   progress=False)
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["meta"]["transfer_decoder_stages"] == [0, 1]
    import json
    logs = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["train_loss"]) for r in logs)

    ft = finetune(_cfg(tmp_path, phantom_root, "name=ft", "train.epochs=1", "train.steps_per_epoch=1",
                       f"train.init={run / 'checkpoints' / 'last.pt'}", "train.lr=1e-12", "train.min_lr=0",
                       "aug.enabled=false"), progress=False)
    tuned = load_checkpoint(ft / "checkpoints" / "last.pt")["model"]
    pre = ckpt["model"]
    for k, v in pre.items():
        if (k.startswith("encoder.") or k.startswith("decoder.stages.0.") or k.startswith("decoder.stages.1.")) \
                and v.dim() >= 2:
            assert torch.allclose(tuned[k], v, atol=1e-6), k
    # the same fine-tuning run without --init: its stage 0 differs (pretraining trained it), stage 3 equals
    # (not transferred, same seed)
    plain = finetune(_cfg(tmp_path, phantom_root, "name=plain", "train.epochs=1", "train.steps_per_epoch=1",
                          "train.lr=1e-12", "train.min_lr=0", "aug.enabled=false"), progress=False)
    fresh = load_checkpoint(plain / "checkpoints" / "last.pt")["model"]
    k0 = next(k for k in pre if k.startswith("decoder.stages.0.") and pre[k].dim() >= 2)
    k3 = next(k for k in pre if k.startswith("decoder.stages.3.") and pre[k].dim() >= 2)
    assert not torch.allclose(fresh[k0], tuned[k0])
    assert torch.allclose(fresh[k3], tuned[k3], atol=1e-6)


def test_gcl_full_local_stage_freezes_encoder():
    from medssl.methods import build_method
    from medssl.models import build_model

    seg = build_model("unet", in_channels=1, n_classes=2, features=8)
    m = build_method("gcl-full", seg.encoder, PretrainConfig(proj_dim=8), AugConfig(), decoder=seg.decoder)
    m.set_step(9, 10)
    assert m.local_stage
    batch = {"image": torch.randn(4, 1, 32, 32), "slice": torch.arange(4), "n_slices": torch.full((4,), 8),
             "row": torch.arange(4)}
    loss, logs = m.loss(batch, make_generator(0))
    loss.backward()
    assert logs["stage"] == 2.0 and torch.isfinite(loss)
    assert all(p.grad is None for p in m.encoder.parameters())
    assert any(p.grad is not None for p in m.decoder.stages[0].parameters())
    assert all(p.grad is None for p in m.decoder.stages[3].parameters())


def test_bad_view_config_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="crop_scale"):
        load_config("demo", overrides=["pretrain.views.crop_scale=[0.9, 0.5]"])
    with pytest.raises(ConfigError, match="view_aug"):
        load_config("demo", overrides=["pretrain.view_aug=weird"])
    assert dataclasses.asdict(ViewAugConfig())["crop_scale"] == [0.5, 1.0]


def test_freeze_encoder_keeps_encoder_weights_and_statistics(phantom_root, tmp_path):
    run = pretrain(_cfg(tmp_path, phantom_root, "pretrain.method=pcl", "name=pre", "train.epochs=1",
                        "train.steps_per_epoch=2"), progress=False)
    pre = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    ft = finetune(_cfg(tmp_path, phantom_root, "name=frozen", "train.epochs=1", "train.steps_per_epoch=3",
                       f"train.init={run / 'checkpoints' / 'last.pt'}", "train.freeze_encoder=true"), progress=False)
    tuned = load_checkpoint(ft / "checkpoints" / "last.pt")["model"]
    enc = [k for k in tuned if k.startswith("encoder.")]
    assert enc and all(torch.equal(tuned[k], pre[k]) for k in enc)  # weights and BN running stats
    # the optimiser holds exactly the decoder and head parameters
    opt = load_checkpoint(ft / "checkpoints" / "last.pt")["optimizer"]
    from medssl.models import build_model
    seg = build_model("unet", in_channels=1, n_classes=4, features=8)
    n_trainable = len(list(seg.decoder.parameters())) + len(list(seg.head.parameters()))
    assert len(opt["param_groups"][0]["params"]) == n_trainable
