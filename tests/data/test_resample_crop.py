"""In-plane resampling to a target spacing and the foreground crop: forward, and the exact way back to the input grid."""

from __future__ import annotations

import numpy as np
import pytest

from medssl.config import DataConfig
from medssl.data.cache import slice_fit, volume_to_slices
from medssl.data.slicing import SliceFit, foreground_box, resize_label, stack_slices


def _onehot(lab: np.ndarray, n: int) -> np.ndarray:
    return (np.arange(n)[:, None, None] == lab[None]).astype(np.float32)


def _ellipses(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    lab = np.zeros((h, w), np.uint8)
    lab[((yy - 0.4 * h) / (0.2 * h)) ** 2 + ((xx - 0.35 * w) / (0.2 * w)) ** 2 < 1] = 1
    lab[((yy - 0.6 * h) / (0.15 * h)) ** 2 + ((xx - 0.65 * w) / (0.15 * w)) ** 2 < 1] = 2
    return lab


def test_zoom_gives_the_target_grid_and_inverts():
    # 0.5 mm rows, 1 mm columns resampled to 1 mm: rows halve, columns stay
    fit = SliceFit(80, 40, 64, "pad", zoom=(0.5, 1.0))
    assert fit.scaled_shape == (40, 40) and fit.scale == 1.0
    lab = _ellipses(80, 40)
    fwd = fit.forward(lab, label=True)
    assert fwd.shape == (64, 64) and set(np.unique(fwd)) == {0, 1, 2}
    back = fit.inverse(_onehot(fwd, 3)).argmax(0)
    assert back.shape == (80, 40)
    assert (back == lab).mean() > 0.97


def test_integer_upsampling_round_trip_is_exact():
    fit = SliceFit(20, 16, 64, "pad", zoom=(2.0, 2.0))
    assert fit.scaled_shape == (40, 32)
    lab = _ellipses(20, 16)
    np.testing.assert_array_equal(fit.inverse(_onehot(fit.forward(lab, label=True), 3)).argmax(0), lab)


def test_label_resize_is_linear_on_one_hot_and_aligned_with_the_cubic_image():
    lab = (_ellipses(30, 30) == 1).astype(np.uint8)
    fit = SliceFit(30, 30, 64, "pad", zoom=(1.7, 1.3))
    as_label = fit.forward(lab, label=True).astype(np.float64)
    as_image = fit.forward(lab.astype(np.float32)).astype(np.float64)
    grid = np.indices(as_label.shape)
    c_lab = (grid * as_label).sum((1, 2)) / as_label.sum()
    c_img = (grid * as_image).sum((1, 2)) / as_image.sum()
    assert np.all(np.abs(c_lab - c_img) < 0.15), (c_lab, c_img)
    assert resize_label(np.full((5, 5), 3, np.uint8), (9, 7)).tolist() == np.full((9, 7), 3).tolist()


def test_crop_keeps_the_box_and_puts_background_outside():
    vol = np.zeros((40, 30, 5), np.float32)
    vol[5:25, 8:20, :] = 1.0
    assert foreground_box(vol, 2) == (5, 25, 8, 20)
    fit = SliceFit(40, 30, 32, "pad", crop=(5, 25, 8, 20))
    assert fit.cropped_shape == (20, 12) and fit.scaled_shape == (20, 12)
    lab = np.zeros((40, 30), np.uint8)
    lab[10:15, 10:14] = 1
    fwd = fit.forward(lab, label=True)
    assert fwd.sum() == lab.sum()
    probs = _onehot(fwd, 2)
    back = fit.inverse(probs)
    assert back.shape == (2, 40, 30)
    np.testing.assert_array_equal(back.argmax(0), lab)
    assert np.all(back[0, :5] == 1) and np.all(back[1, :5] == 0)  # outside the box: background


@pytest.mark.parametrize("spacing,target,crop", [((0.7, 0.7, 3.0), [1.0, 1.0], "none"),
                                                 ((1.3, 0.9, 2.0), [1.0, 1.0], "foreground"),
                                                 ((1.0, 1.0, 1.0), [], "foreground")])
def test_volume_round_trip_to_the_original_grid(spacing, target, crop):
    """Cache the slices (crop + resample + pad), map one-hot labels back: the input's labels come back."""
    rng = np.random.default_rng(0)
    shape = (70, 54, 6)
    image = np.zeros(shape, np.float32)
    image[8:60, 6:50] = rng.uniform(0.2, 1.0, size=(52, 44, 6))  # a body; zero background around it
    label = np.zeros(shape, np.uint8)
    for k in range(shape[2]):
        label[..., k] = np.pad(_ellipses(52, 44), ((8, 10), (6, 4)))
    data = DataConfig(size=96, fit="pad", spacing=target, crop=crop)
    xs, ys, fit = volume_to_slices(image, label, data, spacing)
    assert xs.shape == (6, 96, 96) and ys.shape == (6, 96, 96)
    if crop == "foreground":
        assert fit.crop == (8, 60, 6, 50)
    if target:
        assert fit.zoom == pytest.approx((spacing[0] / 1.0, spacing[1] / 1.0))
    back = stack_slices(np.stack([fit.inverse(_onehot(y, 3)).argmax(0) for y in ys]), 2)
    assert back.shape == shape
    agreement = (back == label).mean()
    assert agreement > (0.999 if not target else 0.98), agreement
    if not target:
        np.testing.assert_array_equal(back, label)


def test_unknown_spacing_with_a_target_is_an_error():
    from medssl.errors import DataError

    with pytest.raises(DataError, match="spacing"):
        slice_fit(np.zeros((4, 4, 2), np.float32), None, DataConfig(spacing=[1.0, 1.0]))


def test_sliding_window_prediction_lands_on_the_original_grid():
    """A per-pixel threshold 'model' predicted through crop + resampling + sliding windows + the inverse fit gives
    the threshold of the input on its own grid (with its shape and geometry)."""
    import torch

    from medssl.data.volume import Volume
    from medssl.engine.inference import Predictor

    rng = np.random.default_rng(1)
    shape = (90, 70, 4)
    arr = np.zeros(shape, np.float32)
    yy, xx = np.mgrid[:90, :70]
    inside = ((yy - 45) / 35.0) ** 2 + ((xx - 35) / 25.0) ** 2 < 1
    arr[inside] = 0.5
    arr[((yy - 40) / 12.0) ** 2 + ((xx - 30) / 9.0) ** 2 < 1] = 1.0  # a bright structure
    arr += rng.normal(0, 0.01, shape).astype(np.float32) * inside[..., None]
    affine = np.diag([0.8, 1.1, 3.0, 1.0])
    vol = Volume(array=arr, affine=affine, original_affine=affine, original_shape=shape)

    class Threshold(torch.nn.Module):  # logits (0, 40 (x - 0.75)): class 1 where the image is bright
        def forward(self, x):
            return torch.cat([torch.zeros_like(x), 40 * (x - 0.75)], 1)

    data = DataConfig(size=112, fit="pad", spacing=[1.0, 1.0], crop="foreground", mri_mode="minmax",
                      mri_percentiles=[0.0, 100.0])
    pred = Predictor(model=Threshold(), data=data, modality="MRI", class_names={0: "bg", 1: "bright"},
                     patch=48, sw_overlap=0.5).predict_volume(vol)
    assert pred.shape == shape
    truth = (arr > 0.75).astype(np.uint8)
    dice = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
    assert dice > 0.97, dice
