"""SliceFit (exact, invertible fit to the network size), batched augmentation and the epoch sampler."""

from __future__ import annotations

import numpy as np
import pytest

from medssl.config import AugConfig
from medssl.data.augment import augment, build_augmentation, sample_seed
from medssl.data.slicing import SliceFit, stack_slices, volume_slices
from medssl.data.torch_data import EpochSampler


def _blocky_label(h: int, w: int, n_classes: int = 3, seed: int = 0) -> np.ndarray:
    """A label map of a few axis-aligned rectangles (values 0..n_classes-1)."""
    rng = np.random.default_rng(seed)
    lab = np.zeros((h, w), np.uint8)
    for c in range(1, n_classes):
        for _ in range(2):
            y0, x0 = rng.integers(0, h - 4), rng.integers(0, w - 4)
            lab[y0:y0 + rng.integers(3, max(4, h // 2)), x0:x0 + rng.integers(3, max(4, w // 2))] = c
    assert len(np.unique(lab)) == n_classes
    return lab


def _onehot(lab: np.ndarray, n: int) -> np.ndarray:
    return (np.arange(n)[:, None, None] == lab[None]).astype(np.float32)


def _round_trip(fit: SliceFit, lab: np.ndarray, n: int = 3) -> np.ndarray:
    fwd = fit.forward(lab, label=True)
    assert fwd.shape == (fit.size, fit.size)
    back = fit.inverse(_onehot(fwd, n))
    assert back.shape == (n, fit.h, fit.w)
    return back.argmax(0)


# ------------------------------------------------------------------ slicing
def test_volume_slices_round_trip():
    vol = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    for axis in range(3):
        sl = volume_slices(vol, axis)
        assert sl.shape[0] == vol.shape[axis]
        np.testing.assert_array_equal(stack_slices(sl, axis), vol)
    np.testing.assert_array_equal(volume_slices(vol, 2)[3], vol[:, :, 3])


@pytest.mark.parametrize("hw", [(20, 12), (32, 32), (7, 31), (31, 7)])
def test_pad_mode_is_exact(hw):
    h, w = hw
    lab = _blocky_label(h, w)
    fit = SliceFit(h, w, 32, "pad")
    assert fit.scale == 1.0 and fit.scaled_shape == (h, w)
    fwd = fit.forward(lab, label=True)
    oy, ox = fit.offsets
    assert (oy, ox) == ((32 - h) // 2, (32 - w) // 2)
    np.testing.assert_array_equal(fwd[oy:oy + h, ox:ox + w], lab)
    assert fwd.sum() == lab.sum()  # padding is background
    np.testing.assert_array_equal(_round_trip(fit, lab), lab)
    # image: padded with the fill value, content untouched
    img = np.random.default_rng(1).normal(size=(h, w)).astype(np.float32)
    out = fit.forward(img, fill=-5.0)
    np.testing.assert_array_equal(out[oy:oy + h, ox:ox + w], img)
    assert (out == -5.0).sum() == 32 * 32 - h * w


@pytest.mark.parametrize("hw,scaled", [((16, 16), (32, 32)), ((16, 8), (32, 16)), ((8, 16), (16, 32))])
def test_resize_mode_integer_upscale_inverts(hw, scaled):
    lab = _blocky_label(*hw)
    fit = SliceFit(*hw, 32, "resize")
    assert fit.scale == 2.0 and fit.scaled_shape == scaled
    back_probs = fit.inverse(_onehot(fit.forward(lab, label=True), 3))
    np.testing.assert_allclose(back_probs, _onehot(lab, 3), atol=1e-5)  # nearly exact
    np.testing.assert_array_equal(back_probs.argmax(0), lab)
    img = np.random.default_rng(2).normal(size=hw).astype(np.float32)
    assert fit.forward(img).shape == (32, 32)


@pytest.mark.parametrize("hw", [(48, 40), (64, 20), (20, 64), (100, 100)])
def test_pad_mode_downscales_larger_slices(hw):
    h, w = hw
    fit = SliceFit(h, w, 32, "pad")
    assert fit.scale == pytest.approx(min(32 / h, 32 / w))
    sh, sw = fit.scaled_shape
    assert max(sh, sw) == 32 and sh <= 32 and sw <= 32
    assert abs(sh / sw - h / w) < 0.1 * h / w  # aspect ratio kept
    lab = np.zeros((h, w), np.uint8)
    lab[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 1
    lab[: h // 8, : w // 8] = 2
    fwd = fit.forward(lab, label=True)
    assert fwd.shape == (32, 32) and set(np.unique(fwd)) == {0, 1, 2}
    img = np.random.default_rng(3).normal(size=hw).astype(np.float32)
    assert fit.forward(img).shape == (32, 32)
    back = _round_trip(fit, lab)
    assert (back == lab).mean() > 0.9  # not exact after a downscale, but close


def test_resize_mode_non_integer_scale():
    fit = SliceFit(20, 12, 32, "resize")
    assert fit.scale == pytest.approx(1.6) and fit.scaled_shape == (32, 19)
    lab = np.zeros((20, 12), np.uint8)
    lab[5:15, 3:9] = 1
    back = _round_trip(fit, lab, 2)
    assert (back == lab).mean() > 0.95


def test_resized_labels_stay_aligned_with_resized_images():
    """No systematic sub-pixel shift between a label and its image after a rescale (both directions)."""
    rng = np.random.default_rng(0)
    shifts = []
    for _ in range(60):
        h, w = (int(v) for v in rng.integers(12, 110, 2))
        size = int(rng.choice([32, 64]))
        yy, xx = np.mgrid[:h, :w]
        cy, cx = h * rng.uniform(0.35, 0.65), w * rng.uniform(0.35, 0.65)
        lab = ((((yy - cy) / (0.25 * h)) ** 2 + ((xx - cx) / (0.25 * w)) ** 2) < 1).astype(np.uint8)
        fit = SliceFit(h, w, size, "resize")
        if fit.scale == 1.0:
            continue
        as_label = fit.forward(lab, label=True).astype(np.float64)
        as_image = fit.forward(lab.astype(np.float32)).astype(np.float64)
        grid = np.indices(as_label.shape)
        shifts.append((grid * as_label).sum((1, 2)) / as_label.sum() - (grid * as_image).sum((1, 2)) / as_image.sum())
    mean_shift = np.mean(shifts, axis=0)
    assert len(shifts) > 40 and np.all(np.abs(mean_shift) < 0.1), mean_shift


# ------------------------------------------------------------------ augmentation
def _square(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    img = rng.normal(0.0, 0.1, (size, size)).astype(np.float32)
    lab = np.zeros((size, size), np.uint8)
    lab[20:40, 14:34] = 1
    lab[44:52, 40:56] = 2
    img[lab == 1] += 3.0
    img[lab == 2] += 1.5
    return img, lab


@pytest.fixture(scope="module")
def strong_pipeline():
    """Every transform always applied, with large ranges."""
    cfg = AugConfig(flip_prob=1.0, rotate_prob=1.0, rotate_deg=30, scale_prob=1.0, scale_range=[0.7, 1.3],
                    elastic_prob=1.0, elastic_magnitude=[1.0, 3.0], intensity_prob=1.0, noise_prob=1.0)
    return build_augmentation(cfg)


def test_disabled_augmentation_is_identity():
    assert build_augmentation(AugConfig(enabled=False)) is None
    img, lab = _square()
    out_img, out_lab = augment(None, img, lab, seed=3)
    assert out_img is img and out_lab is lab


def test_same_seed_same_output_different_seed_differs(strong_pipeline):
    img, lab = _square()
    a_img, a_lab = augment(strong_pipeline, img, lab, seed=123)
    _ = augment(strong_pipeline, img, lab, seed=7)  # the pipeline's state in between must not matter
    b_img, b_lab = augment(strong_pipeline, img, lab, seed=123)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    c_img, c_lab = augment(strong_pipeline, img, lab, seed=124)
    assert not np.allclose(a_img, c_img)
    assert a_img.shape == img.shape and a_lab.shape == lab.shape
    assert a_img.dtype == np.float32 and np.issubdtype(a_lab.dtype, np.integer)
    # per-sample seeds: a pure function of (run seed, epoch, row), distinct across them
    seeds = {sample_seed(0, e, r) for e in range(3) for r in range(50)}
    assert len(seeds) == 150 and sample_seed(1, 2, 3) == sample_seed(1, 2, 3)


def test_labels_stay_in_original_set_and_aligned(strong_pipeline):
    img, lab = _square()
    for seed in range(12):
        a_img, a_lab = augment(strong_pipeline, img, lab, seed=seed)
        assert set(np.unique(a_lab).tolist()) <= {0, 1, 2}, seed  # nearest interpolation
        fg = a_lab == 1
        assert fg.sum() > 50, seed
        inside, outside = a_img[fg].mean(), a_img[a_lab == 0].mean()
        assert inside - outside > 1.5, (seed, inside, outside)  # image and label moved together


def test_scaling_is_isotropic():
    cfg = AugConfig(flip_prob=0, rotate_prob=0, scale_prob=1.0, scale_range=[0.6, 1.4], elastic_prob=0,
                    intensity_prob=0, noise_prob=0)
    pipe = build_augmentation(cfg)
    yy, xx = np.mgrid[:64, :64]
    disc = ((yy - 31.5) ** 2 + (xx - 31.5) ** 2 < 15 ** 2).astype(np.uint8)
    sizes = []
    for seed in range(8):
        _, lab = augment(pipe, disc.astype(np.float32), disc, seed=seed)
        rows, cols = np.flatnonzero(lab.any(1)), np.flatnonzero(lab.any(0))
        height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert abs(int(height) - int(width)) <= 2, (seed, height, width)
        sizes.append(height)
    assert max(sizes) - min(sizes) >= 6  # it did scale


# ------------------------------------------------------------------ sampler
def test_epoch_sampler_is_a_function_of_seed_and_epoch():
    def draw(seed, epoch, **kw):
        s = EpochSampler(50, 120, seed=seed, **kw)
        s.set_epoch(epoch)
        return s.indices()

    a = draw(0, 3)
    np.testing.assert_array_equal(a, draw(0, 3))
    assert not np.array_equal(a, draw(0, 4)) and not np.array_equal(a, draw(1, 3))
    assert len(a) == 120 and a.min() >= 0 and a.max() < 50
    counts = np.bincount(a, minlength=50)
    assert counts.min() >= 2 and counts.max() <= 3  # concatenated permutations: balanced coverage
    s = EpochSampler(50, 120)
    assert len(list(iter(s))) == len(s) == 120


@pytest.mark.parametrize("n_samples", [120, 121])
def test_epoch_sampler_ranks_partition_the_epoch(n_samples):
    full = EpochSampler(50, n_samples, seed=5)
    full.set_epoch(2)
    parts = []
    for rank in range(2):
        s = EpochSampler(50, n_samples, seed=5, rank=rank, world=2)
        s.set_epoch(2)
        idx = s.indices()
        assert len(idx) == len(s)
        parts.append(idx)
    merged = np.empty(n_samples, int)
    merged[0::2], merged[1::2] = parts
    np.testing.assert_array_equal(merged, full.indices())  # disjoint positions, same epoch draw


def test_epoch_sampler_foreground_fraction():
    n = 200
    fg = np.zeros(n, bool)
    fg[::10] = True  # 10 % foreground slices
    s = EpochSampler(n, 1000, seed=0, foreground=fg, fg_fraction=0.5)
    idx = s.indices()
    frac = fg[idx].mean()
    # half of the draw comes from foreground, the other half uniformly (10 % foreground)
    assert frac == pytest.approx(0.5 + 0.5 * 0.1, abs=0.03)
    plain = EpochSampler(n, 1000, seed=0, foreground=fg, fg_fraction=0.0).indices()
    assert fg[plain].mean() == pytest.approx(0.1, abs=0.03)
    none = EpochSampler(n, 1000, seed=0, foreground=np.zeros(n, bool), fg_fraction=0.5).indices()
    assert len(none) == 1000  # no foreground at all: falls back to uniform
