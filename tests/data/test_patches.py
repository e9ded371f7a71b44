"""Patch training (``train.patch_size``): foreground-oversampled random crops and sliding-window inference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medssl.config import load_config
from medssl.data.augment import make_generator
from medssl.data.patches import crop_at, patch_active, random_patches, sample_patch_origins
from medssl.engine.inference import segment_logits


def _blob_batch(b: int = 6, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Images with a 3x3 foreground blob near a different corner per sample (label 1 or 2)."""
    x = torch.randn(b, 1, size, size, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(b, size, size, dtype=torch.int64)
    for i in range(b):
        r, c = [(2, 3), (size - 5, 1), (7, size - 4), (size - 4, size - 4), (30, 40), (50, 9)][i % 6]
        y[i, r:r + 3, c:c + 3] = 1 + i % 2
    return x, y


def test_patch_active():
    assert not patch_active(0, 64) and not patch_active(64, 64) and patch_active(32, 64) and patch_active(48, 64)


def test_foreground_centred_crop_contains_the_blob():
    x, y = _blob_batch()
    for seed in range(5):
        xi, yi = random_patches(x, y, 32, 1.0, make_generator(seed))
        assert xi.shape == (6, 1, 32, 32) and yi.shape == (6, 32, 32) and yi.dtype == y.dtype
        for i in range(6):
            assert (yi[i] > 0).sum() == 9, f"sample {i}: the whole blob should lie in the patch"


def test_crops_are_the_canvas_at_the_origins_and_stay_inside():
    x, y = _blob_batch()
    for fg in (0.0, 0.5, 1.0):
        o = sample_patch_origins(y, 48, fg, make_generator(3))
        assert o.shape == (6, 2) and o.dtype == torch.int64
        assert (o >= 0).all() and (o <= 64 - 48).all()
        xi, yi = crop_at(x, y, o, 48)
        for i, (r, c) in enumerate(o.tolist()):
            assert torch.equal(xi[i, 0], x[i, 0, r:r + 48, c:c + 48]) and torch.equal(yi[i], y[i, r:r + 48, c:c + 48])


def test_crops_are_deterministic_for_a_seed_and_vary_across_seeds():
    x, y = _blob_batch()
    a = random_patches(x, y, 32, 0.5, make_generator(11))
    b = random_patches(x, y, 32, 0.5, make_generator(11))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = random_patches(x, y, 32, 0.5, make_generator(12))
    assert not torch.equal(a[0], c[0])
    # the same number of draws whatever the labels hold: the augmentation after it sees the same stream
    g1, g2 = make_generator(5), make_generator(5)
    sample_patch_origins(y, 32, 1.0, g1)
    sample_patch_origins(torch.zeros_like(y), 32, 1.0, g2)
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))


def test_uniform_crops_cover_the_canvas_and_empty_labels_fall_back():
    y = torch.zeros(4000, 64, 64, dtype=torch.int64)
    o = sample_patch_origins(y, 48, 1.0, make_generator(0))  # no foreground: uniform despite fg_prob 1
    assert set(o[:, 0].tolist()) == set(range(17)) and set(o[:, 1].tolist()) == set(range(17))


def test_sliding_window_with_patch_equal_to_canvas_is_the_model():
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 3, 3, padding=1)
    x = torch.randn(5, 1, 32, 32)
    with torch.no_grad():
        want = net(x)
        for patch in (0, 32, 64):
            assert torch.equal(segment_logits(net, x, patch, 0.5, "gaussian"), want)


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_sliding_window_of_a_translation_equivariant_model(mode):
    """Windows of size P at stride P/2 (overlap 0.5): a pointwise model gives the full-canvas output everywhere;
    a 3x3 convolution (zero padding) too, except on the rows/columns next to a window edge inside the canvas."""
    torch.manual_seed(0)
    x = torch.randn(3, 1, 64, 64)
    point = torch.nn.Conv2d(1, 2, 1)
    conv = torch.nn.Conv2d(1, 2, 3, padding=1)
    with torch.no_grad():
        torch.testing.assert_close(segment_logits(point, x, 32, 0.5, mode), point(x), rtol=1e-5, atol=1e-5)
        got, want = segment_logits(conv, x, 32, 0.5, mode), conv(x)
    starts = range(0, 64 - 32 + 1, 16)  # 0, 16, 32
    edges = {s for s in starts if s > 0} | {s + 31 for s in starts if s + 32 < 64}  # 16, 32, 31, 47
    keep = torch.ones(64, dtype=torch.bool)
    keep[sorted(edges)] = False
    inner = keep[:, None] & keep[None, :]
    torch.testing.assert_close(got[..., inner], want[..., inner], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[..., ~inner], want[..., ~inner], atol=1e-3)  # the edges do differ


# ------------------------------------------------------------------ fine-tuning
BASE = ["model.features=4", "train.batch_size=4", "train.amp=off", "train.threads=1", "aug.elastic_prob=0",
        "split.n_folds=4", "split.val=1", "split.budget=2", "train.epochs=1", "train.steps_per_epoch=3"]


def _cfg(root, tmp_path, *extra):
    return load_config("demo", overrides=[*BASE, f"data.path={root}", f"output_dir={tmp_path}",
                                          f"data.cache_dir={tmp_path / 'cache'}", *extra])


def test_finetune_on_patches_then_evaluate(phantom_root, tmp_path, monkeypatch):
    from medssl.engine import finetune as ft
    from medssl.engine.checkpoint import load_checkpoint
    from medssl.engine.inference import load_predictor
    from medssl.evaluation.evaluate import evaluate_run

    seen = {"train": [], "val": []}

    def crops(x, y, *args):
        out = random_patches(x, y, *args)
        seen["train"].append((tuple(x.shape), tuple(out[0].shape), tuple(out[1].shape)))
        return out

    def logits(model, x, *args, **kw):
        seen["val"].append((tuple(x.shape), args))
        return segment_logits(model, x, *args, **kw)

    monkeypatch.setattr(ft, "random_patches", crops)
    monkeypatch.setattr(ft, "segment_logits", logits)
    run = ft.finetune(_cfg(phantom_root, tmp_path, "name=patch", "data.size=64", "train.patch_size=32",
                           "eval.sw_mode=constant", "eval.sw_overlap=0.25"), progress=False)
    assert seen["train"] == [((4, 1, 64, 64), (4, 1, 32, 32), (4, 32, 32))] * 3
    assert seen["val"] and all(s[1:] == (1, 64, 64) and a == (32, 0.25, "constant") for s, a in seen["val"])
    meta = load_checkpoint(run / "checkpoints" / "best.pt")["meta"]
    assert meta["train_patch"] == 32 and meta["sw"] == {"overlap": 0.25, "mode": "constant"}
    predictor = load_predictor(run / "checkpoints" / "best.pt", device="cpu")
    assert (predictor.patch, predictor.sw_overlap, predictor.sw_mode) == (32, 0.25, "constant")
    probs = predictor.predict_slices(np.random.default_rng(0).normal(size=(2, 64, 64)).astype(np.float32))
    assert probs.shape == (2, 4, 64, 64) and np.allclose(probs.sum(1), 1, atol=1e-5)
    summary = evaluate_run(run, progress=False)
    assert math.isfinite(summary["dice_mean"])


def test_patch_equal_to_canvas_is_todays_training(phantom_root, tmp_path):
    from medssl.engine.checkpoint import load_checkpoint
    from medssl.engine.finetune import finetune

    runs = [finetune(_cfg(phantom_root, tmp_path, f"name=p{p}", "data.size=32", f"train.patch_size={p}",
                          "train.deterministic=true"), progress=False) for p in (0, 32)]
    a, b = (load_checkpoint(r / "checkpoints" / "last.pt")["model"] for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_kaf_unet_with_patches_is_refused_before_the_run_folder(phantom_root, tmp_path):
    from medssl.engine.finetune import finetune
    from medssl.errors import ConfigError

    cfg = _cfg(phantom_root, tmp_path, "name=kafpatch", "data.size=64", "train.patch_size=32",
               "model.backbone=kaf-unet", "model.options.kaf_dim=16", "model.options.kaf_layers=1")
    with pytest.raises(ConfigError, match="train.patch_size is not supported with backbone kaf-unet"):
        finetune(cfg, progress=False)
    assert not (tmp_path / "kafpatch").exists()


def test_foreground_patches_balance_the_classes():
    """A tiny class next to a large one is the patch centre about half of the time, not in proportion to size."""
    lab = torch.zeros(400, 64, 64, dtype=torch.long)
    lab[:, 5:40, 5:40] = 1  # 1225 voxels
    lab[:, 58:60, 58:60] = 2  # 4 voxels, far from class 1
    g = torch.Generator().manual_seed(0)
    origins = sample_patch_origins(lab, 16, 1.0, g)
    hits_small = ((origins[:, 0] == 64 - 16) & (origins[:, 1] == 64 - 16)).float().mean().item()
    assert 0.35 < hits_small < 0.65, hits_small
