"""Intensity normalisation: CT windowing and MRI percentile clip + z-score / min-max."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medssl.data.intensity import normalize
from medssl.data.layouts import open_dataset
from medssl.data.readers import read_case
from medssl.errors import ConfigError

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.mark.integration
def test_ct_example_window():
    ct = DATA / "ct_example"
    if not ct.exists():
        pytest.skip(f"{ct} not found: ../shared/data is needed for this test")
    info = open_dataset(ct / "example_ct_sm.nii.gz", label=ct / "example_seg.nii.gz", modality="CT")
    assert info.modality == "CT" and 5 in info.labels
    image, label = read_case(info.cases[0], info)
    assert image.array.min() < -900  # HU: air around the body
    out = normalize(image.array, info.modality)
    assert out.dtype == np.float32 and out.shape == image.shape
    assert out.min() == 0.0 and out.max() == 1.0
    liver = out[label.array == 5].mean()
    air = out[image.array < -500].mean()
    assert air == 0.0  # everything below -160 HU clips to 0
    # liver ~ 40..80 HU -> (HU + 160) / 400 ~ 0.5..0.6
    assert 0.4 < liver < 0.75
    expected = (np.clip(image.array[label.array == 5], -160, 240) + 160) / 400
    assert abs(liver - expected.mean()) < 1e-5


def test_ct_custom_window_and_bad_window():
    x = np.array([-2000.0, -1000.0, 0.0, 1000.0, 3000.0], dtype=np.float32)
    np.testing.assert_allclose(normalize(x, "ct", ct_window=(-1000, 1000)), [0, 0, 0.5, 1, 1])
    with pytest.raises(ConfigError, match="ct_window"):
        normalize(x, "CT", ct_window=(100, 100))


def test_mri_zscore_ignores_zero_background_for_percentiles():
    rng = np.random.default_rng(0)
    x = np.zeros((20, 20, 10), dtype=np.float32)
    x[5:15, 5:15] = rng.normal(200, 20, size=(10, 10, 10))
    x[6, 6, 5] = 5000.0  # outlier, clipped at the 99.5th percentile of the non-zero voxels
    out = normalize(x, "MRI")
    assert out.dtype == np.float32
    assert abs(float(out.mean())) < 1e-4 and abs(float(out.std()) - 1.0) < 1e-4
    nonzero = x[x != 0]
    lo, hi = np.percentile(nonzero, [0.5, 99.5])
    assert lo > 100  # percentiles from the foreground, not from the zeros
    clipped = np.clip(x, lo, hi)
    np.testing.assert_allclose(out, (clipped - clipped.mean()) / clipped.std(), rtol=1e-4, atol=1e-4)
    # the outlier is clipped to the top percentile instead of dominating the scale
    assert out[6, 6, 5] == out.max()
    unclipped_max = (5000.0 - x.mean()) / x.std()
    assert out.max() < 5.0 < unclipped_max
    # zero background is clipped up to the low percentile: one constant value
    assert np.unique(out[x == 0]).size == 1


def test_mri_minmax_and_degenerate_inputs():
    x = np.arange(1, 1001, dtype=np.float32).reshape(10, 10, 10)
    out = normalize(x, "MRI", mri_mode="minmax", mri_percentiles=(0.0, 100.0))
    assert out.min() == 0.0 and out.max() == 1.0
    np.testing.assert_allclose(out.ravel()[:3], [0, 1 / 999, 2 / 999], atol=1e-6)
    clipped = normalize(x, "T2", mri_mode="minmax")  # non-CT modality -> MRI rule, default 0.5/99.5
    assert (clipped == 0).sum() > 1 and (clipped == 1).sum() > 1
    const = np.full((4, 4, 4), 7.0)
    assert not normalize(const, "MRI").any()
    assert not normalize(const, "MRI", mri_mode="minmax").any()
    assert not normalize(np.zeros((3, 3, 3)), "MRI").any()
    with pytest.raises(ConfigError, match="mri_mode"):
        normalize(x, "MRI", mri_mode="robust")
