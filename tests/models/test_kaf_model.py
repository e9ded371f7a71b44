"""KAF layer and KAF-UNet (docs/kaf.md#model): dense-reference equality, parameter counts, padding and empty
keypoint sets, scale selection, strict checkpoint loading, the CPU preset, fine-tuning and prediction."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from medssl.config import load_config
from medssl.errors import ConfigError
from medssl.models import build_model, count_parameters, load_encoder, load_full
from medssl.models.kaf import KAFLayer, Keypoints, kaf_parameter_count

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from kaf_dense_reference import dense_kaf_forward  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _small(**options):
    opts = dict(kaf_dim=16, kaf_layers=1, max_keypoints=32, sift_upsample=2) | options
    return build_model("kaf-unet", in_channels=1, n_classes=3, features=4, **opts)


def _layer_inputs(b=3, n=24, c=8, h=16, stride=1, dtype=torch.float64, distinct=True):
    feat = torch.randn(b, c, h, h, dtype=dtype)
    size = h * stride
    if distinct:  # collision-free cells at this stride
        cells = torch.stack([torch.randperm(h * h)[:n] for _ in range(b)])
        xy = torch.stack([cells % h, cells // h], -1).to(dtype) * stride
        xy = xy + torch.rand(b, n, 2, dtype=dtype) * (stride - 1) * 0.99  # anywhere inside the cell
    else:
        xy = torch.rand(b, n, 2, dtype=dtype) * (size - 1)
    return feat, xy


# ------------------------------------------------------------------------------------------- the layer
@pytest.mark.parametrize("stride", [1, 2, 8])
@pytest.mark.parametrize("training", [True, False])
def test_layer_equals_dense_reference(stride, training):
    """Sparse diffusion (docs/kaf.md#kaf-layer) equals the dense B x D x H x W formulation (outputs, S and gradients)."""
    layer = KAFLayer(8, stride, dim=32, heads=4, n_attention=2).double().train(training)
    feat, xy = _layer_inputs(stride=stride)
    feat.requires_grad_(True)
    out, s = layer(feat, xy, torch.ones(xy.shape[:2], dtype=torch.bool))
    ref_out, ref_s = dense_kaf_forward(layer, feat, xy)
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(s, ref_s, atol=1e-10, rtol=1e-8)
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum() + s.sum(), [feat, *layer.parameters()])
    ref_grads = torch.autograd.grad((ref_out * w).sum() + ref_s.sum(), [feat, *layer.parameters()])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)


def test_collisions_add_up_like_the_dense_map_and_mean_averages():
    layer = KAFLayer(4, 2, dim=16, heads=2, n_attention=1).double().eval()
    feat, xy = _layer_inputs(b=2, n=40, c=4, h=6, stride=2, distinct=False)  # many keypoints share cells
    valid = torch.ones(2, 40, dtype=torch.bool)
    out, _ = layer(feat, xy, valid)
    torch.testing.assert_close(out, dense_kaf_forward(layer, feat, xy)[0], atol=1e-10, rtol=1e-8)
    layer.collision = "mean"
    out_mean, _ = layer(feat, xy, valid)
    assert not torch.allclose(out_mean, out)
    # mean == sum when every cell holds one keypoint
    feat2, xy2 = _layer_inputs(b=2, n=20, c=4, h=6, stride=2)
    layer.collision = "sum"
    a, _ = layer(feat2, xy2, valid[:, :20])
    layer.collision = "mean"
    torch.testing.assert_close(layer(feat2, xy2, valid[:, :20])[0], a)


def test_padding_does_not_change_valid_keypoints():
    """Fewer keypoints than the batch width: padded rows are masked out of attention, norms and scatter."""
    layer = KAFLayer(8, 1, dim=32, heads=4, n_attention=2).double()
    feat, xy = _layer_inputs(b=2, n=10)
    valid = torch.ones(2, 10, dtype=torch.bool)
    garbage = torch.rand(2, 6, 2, dtype=torch.float64) * 15
    padded_xy = torch.cat([xy, garbage], 1)
    padded_valid = torch.cat([valid, torch.zeros(2, 6, dtype=torch.bool)], 1)
    for training in (True, False):  # BatchNorm statistics over real keypoints only, in training too
        layer.train(training)
        out, s = layer(feat, xy, valid)
        out_p, s_p = layer(feat, padded_xy, padded_valid)
        torch.testing.assert_close(out_p, out)
        torch.testing.assert_close(s_p[:, :10], s)
        assert (s_p[:, 10:] == 0).all()


def test_zero_and_single_keypoints_work_in_training():
    layer = KAFLayer(8, 1, dim=16, heads=2, n_attention=1).train()
    feat = torch.randn(3, 8, 16, 16, requires_grad=True)
    xy = torch.rand(3, 5, 2) * 15
    for valid in (torch.tensor([[True] * 5, [False] * 5, [True, False, True, False, False]]),  # one empty sample
                  torch.zeros(3, 5, dtype=torch.bool),  # no keypoint at all
                  torch.tensor([[True, False, False, False, False]] + [[False] * 5] * 2)):  # a single one
        out, s = layer(feat, xy, valid)
        (out.sum() + s.sum()).backward()
        assert torch.isfinite(out).all() and torch.isfinite(feat.grad).all()
        assert (s[~valid] == 0).all()
    empty = layer(feat, torch.zeros(3, 0, 2), torch.zeros(3, 0, dtype=torch.bool))
    assert empty[0].shape == (3, 16, 16, 16) and empty[1].shape == (3, 0, 16)


# ------------------------------------------------------------------------------------------- the model
@pytest.mark.parametrize(("features", "n_classes", "paper", "clean"),
                         [(32, 8, 71.7e6, 71_467_264), (48, 4, 106.8e6, 106_546_624)])
def test_parameter_counts_match_the_paper(features, n_classes, paper, clean):
    """docs/kaf.md#parameter-counts: L_att = 16 with the released code's dead parameters gives the paper's 71.7M / 106.8M."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = build_model("kaf-unet", in_channels=1, n_classes=n_classes, features=features, kaf_layers=16)
    assert count_parameters(model) == clean  # 71.47M / 106.55M: what is actually trained
    reported = kaf_parameter_count(model, legacy_dead_params=True)
    assert reported == clean + 4 * 65_793
    assert abs(reported - paper) < 0.1e6


def test_forward_without_keypoints_runs_sift_itself():
    model = _small().eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        auto = model(x)
        kp = model.encoder.detect(x)
        given = model(x, kp)
        other = model(x, Keypoints(kp.xy.flip(1), kp.valid.flip(1)))  # same set, other order: same output
    assert auto.shape == (2, 3, 32, 32) and kp.counts().min() > 0
    torch.testing.assert_close(auto, given)
    torch.testing.assert_close(other, given, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("scales", [[1, 2, 3, 4], [1, 2, 3], [1, 3], [4], []])
def test_selectable_scales(scales):
    model = _small(kaf_scales=scales)
    enc = model.encoder
    x = torch.randn(2, 1, 32, 32)
    kp = Keypoints(torch.rand(2, 7, 2) * 31, torch.ones(2, 7, dtype=torch.bool))
    feats, kp_feats = enc.forward_kaf(x, kp)
    assert [f.shape[1] for f in feats] == enc.out_channels == [8, 16, 32, 64, 128]
    assert len(kp_feats) == len(scales) and all(s.shape == (2, 7, 16) for s in kp_feats)
    assert sorted(enc.kaf.keys()) == [f"l{s}" for s in scales]
    model(x, kp).sum().backward()


def test_checkpoint_with_other_kaf_settings_fails_loudly():
    src = _small(kaf_layers=2).state_dict()
    load_encoder(_small(kaf_layers=2), src)  # same settings load
    load_full(_small(kaf_layers=2), src)
    with pytest.raises(ConfigError, match=r"kaf_layers.* 2 in the checkpoint vs 3 in the model"):
        load_encoder(_small(kaf_layers=3), src)
    with pytest.raises(ConfigError, match=r"kaf_scales.*\[1, 2, 3, 4\] in the checkpoint vs \[1, 2, 3\]"):
        load_encoder(_small(kaf_layers=2, kaf_scales=[1, 2, 3]), src)
    with pytest.raises(ConfigError, match="kaf_layers"):
        load_full(_small(kaf_layers=1), src)
    with pytest.raises(ConfigError, match="kaf_layers"):  # plain torch loading says it too
        _small(kaf_layers=1).load_state_dict(src)
    unet = build_model("unet", in_channels=1, n_classes=3, features=4).state_dict()
    with pytest.raises(ConfigError, match="not a kaf-unet"):
        load_encoder(_small(), unet)


def test_options_are_checked():
    with pytest.raises(ConfigError, match="kaf_scales"):
        _small(kaf_scales=[0, 5])
    with pytest.raises(ConfigError, match="kaf_norm"):
        _small(kaf_norm="instance")
    with pytest.raises(ConfigError, match="kaf_dim"):
        _small(kaf_dim=18, kaf_heads=4)
    with pytest.raises(ConfigError, match="bad option"):
        _small(kaf_typo=1)
    for norm in ("group", "layer"):
        _small(kaf_norm=norm)(torch.randn(2, 1, 32, 32)).sum().backward()
    _small(kaf_sampler="bilinear")(torch.randn(2, 1, 32, 32)).sum().backward()


def test_cpu_preset_builds():
    cfg = load_config("kaf_hippocampus")
    assert cfg.model.backbone == "kaf-unet" and cfg.data.size == 64
    opts = cfg.model.options
    assert opts["max_keypoints"] <= 128 and opts["kaf_layers"] <= 3 and cfg.model.features < 32
    model = build_model(cfg.model.backbone, in_channels=1, n_classes=3, features=cfg.model.features, **opts)
    assert model.encoder.keypoint_settings.upsample == 4 and model.encoder.kaf_dim == 64


def test_prepare_batch_uses_cached_keypoints_and_the_same_draws(phantom_root, tmp_path):
    """The fine-tuning hook: image and label exactly as the plain pipeline, keypoints from the slice cache's
    sidecar carried through that same warp."""
    from medssl.config import AugConfig, DataConfig
    from medssl.data.augment import BatchAugment, make_generator
    from medssl.data.cache import prepare
    from medssl.models.kaf import KeypointStore, augment_with_keypoints

    cache = prepare(DataConfig(path=str(phantom_root), size=32, cache_dir=str(tmp_path)), progress=False)
    model = _small()
    rows = torch.tensor([1, 9, 17, 30])
    x = torch.from_numpy(cache.images[rows.numpy()].copy())[:, None]
    y = torch.from_numpy(cache.labels[rows.numpy()].astype("int64"))
    aug = BatchAugment(AugConfig(elastic_prob=1.0))
    xa, ya, extra = model.prepare_batch({"row": rows}, x, y, aug, make_generator(5), cache)
    xr, yr = aug(x, y, make_generator(5))
    assert torch.equal(xa, xr) and torch.equal(ya, yr)
    kp = KeypointStore(cache, model.encoder.keypoint_settings).get(rows, with_desc=False)
    assert kp.counts().min() > 0
    _, _, want = augment_with_keypoints(aug, x, y, kp, make_generator(5))
    assert torch.equal(extra["keypoints"].xy, want.xy) and torch.equal(extra["keypoints"].valid, want.valid)
    assert not torch.allclose(want.xy, kp.xy)  # the points moved with the image
    model(xa, **extra).sum().backward()


def test_finetune_and_predict_end_to_end(phantom_root, tmp_path):
    """A real (tiny) fine-tuning run with cached, transported keypoints; then prediction computes SIFT itself."""
    from medssl.engine.checkpoint import load_checkpoint
    from medssl.engine.finetune import finetune
    from medssl.engine.inference import load_predictor

    cfg = load_config("demo", overrides=[
        "data.size=32", "model.backbone=kaf-unet", "model.features=4", "model.options.kaf_dim=16",
        "model.options.kaf_layers=1", "model.options.max_keypoints=32", "model.options.sift_upsample=2",
        "train.batch_size=4", "train.amp=off", "train.threads=1", "train.epochs=1", "train.steps_per_epoch=2",
        "split.n_folds=4", "split.val=1", "split.budget=2", "aug.elastic_prob=1",
        f"data.path={phantom_root}", f"output_dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}",
        "name=kaf"])
    run = finetune(cfg, progress=False)
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert "encoder.kaf_config" in ckpt["model"] and ckpt["meta"]["state"]["step"] == 2
    assert list((tmp_path / "cache").glob("*/keypoints-*/*.npz"))  # the sidecar keypoint cache
    predictor = load_predictor(run / "checkpoints" / "last.pt", device="cpu")
    import numpy as np

    probs = predictor.predict_slices(np.random.default_rng(0).normal(size=(3, 32, 32)).astype(np.float32))
    assert probs.shape[:2] == (3, 4) and np.isfinite(probs).all()
