"""Metrics against hand-computed values (the expected numbers are written out by hand)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from medssl.errors import DataError
from medssl.evaluation.metrics import (
    aggregate,
    micro_dice,
    per_case_rows,
    volume_scores,
)

NAMES = {0: "background", 1: "anterior", 2: "posterior"}


def _vol(shape=(8, 8, 4)) -> np.ndarray:
    return np.zeros(shape, dtype=np.uint8)


# ---------------------------------------------------------------- 3D Dice
def test_dice_two_cubes_known_overlap():
    gt, pred = _vol((8, 8, 6)), _vol((8, 8, 6))
    gt[0:4, 0:4, 0:4] = 1  # 64 voxels
    pred[1:5, 0:4, 0:4] = 1  # 64 voxels, overlap 3*4*4 = 48
    s = volume_scores(pred, gt, n_classes=2, spacing=(1.0, 1.0, 1.0))
    assert s["dice"][1] == pytest.approx(2 * 48 / 128)  # 0.75
    assert s["counts"][1] == {"intersection": 48, "pred": 64, "gt": 64}
    assert s["both_empty"][1] is False and s["hd95_missing"][1] is False
    # 4x4x4 cube shifted by 1 voxel: 20 of 56 surface voxels per side are 1 voxel away -> HD95 = 1 mm
    assert s["hd95"][1] == pytest.approx(1.0)


def test_dice_is_per_class_and_background_excluded():
    gt, pred = _vol(), _vol()
    gt[0:2, 0:2, 0:2] = 1  # class 1: 8 voxels
    pred[0:2, 0:2, 0:1] = 1  # 4 voxels inside -> Dice 8/12
    gt[5:7, 5:7, 0:2] = 2  # class 2: 8 voxels
    pred[5:7, 5:7, 0:2] = 2  # identical -> Dice 1
    s = volume_scores(pred, gt, n_classes=3, spacing=(1.0, 1.0, 1.0))
    assert sorted(s["dice"]) == [1, 2]  # no background entry
    assert s["dice"][1] == pytest.approx(8 / 12)
    assert s["dice"][2] == pytest.approx(1.0)
    assert s["hd95"][2] == pytest.approx(0.0)


# ---------------------------------------------------------------- HD95
def test_hd95_shift_along_anisotropic_axis():
    gt, pred = _vol((6, 6, 8)), _vol((6, 6, 8))
    gt[2:4, 2:4, 1:3] = 1  # 2x2x2 cube: every voxel is a surface voxel
    pred[2:4, 2:4, 3:5] = 1  # shifted by 2 voxels along axis 2 (1.5 mm)
    s = volume_scores(pred, gt, n_classes=2, spacing=(0.8, 1.2, 1.5))
    # directed distances: 4 voxels at 1 slice (1.5 mm), 4 at 2 slices (3.0 mm) -> 95th pct = 3.0
    assert s["hd95"][1] == pytest.approx(3.0, abs=1e-5)
    assert s["dice"][1] == pytest.approx(0.0)
    # the same shift along axis 0 uses the 0.8 mm spacing: 1.6 mm
    gt0, pred0 = _vol((8, 6, 6)), _vol((8, 6, 6))
    gt0[1:3, 2:4, 2:4] = 1
    pred0[3:5, 2:4, 2:4] = 1
    s0 = volume_scores(pred0, gt0, n_classes=2, spacing=(0.8, 1.2, 1.5))
    assert s0["hd95"][1] == pytest.approx(1.6, abs=1e-5)


def test_hd95_is_symmetric():
    gt, pred = _vol((10, 6, 6)), _vol((10, 6, 6))
    gt[1:3, 2:4, 2:4] = 1
    pred[1:3, 2:4, 2:4] = 1
    pred[7, 2, 2] = 1  # one outlier 5 voxels away in pred only
    a = volume_scores(pred, gt, 2, (1.0, 1.0, 1.0))["hd95"][1]
    b = volume_scores(gt, pred, 2, (1.0, 1.0, 1.0))["hd95"][1]
    assert a == pytest.approx(b)
    assert a > 0.0


# ---------------------------------------------------------------- empty conventions
def test_both_empty_and_one_empty_conventions():
    gt, pred = _vol(), _vol()
    gt[0:2, 0:2, 0:2] = 1  # class 1 in GT only
    pred[5:7, 5:7, 0:1] = 2  # class 2 in prediction only; class 3 nowhere
    s = volume_scores(pred, gt, n_classes=4, spacing=(1.0, 1.0, 1.0))
    # both empty: Dice 1, HD95 0, flagged
    assert s["dice"][3] == 1.0 and s["hd95"][3] == 0.0
    assert s["both_empty"][3] is True and s["hd95_missing"][3] is False
    # GT present, prediction empty: Dice 0, HD95 NaN + missing
    assert s["dice"][1] == 0.0 and math.isnan(s["hd95"][1]) and s["hd95_missing"][1] is True
    # GT empty, prediction present (MONAI ignore_empty=True would give NaN here): Dice 0
    assert s["dice"][2] == 0.0 and math.isnan(s["hd95"][2]) and s["hd95_missing"][2] is True
    assert s["both_empty"][1] is False and s["both_empty"][2] is False
    json.dumps(s)  # plain types only


# ---------------------------------------------------------------- slice-mean Dice
def test_slice_mean_dice_smoothing():
    gt, pred = _vol((4, 4, 3)), _vol((4, 4, 3))
    pred[0, 0:3, 0] = 1  # slice 0: empty GT, 3 false positives -> 1/4
    # slice 1: both empty -> 1
    gt[0:2, 0:2, 2] = 1  # slice 2: GT 4, pred 4, overlap 2 -> (4+1)/(8+1)
    pred[1:3, 0:2, 2] = 1
    # along axis 0 (4 slices), by hand:
    per_x = volume_scores(pred, gt, 2, axis=0)["slice_dice"][1]
    # x=0: p = 3 (z=0) ; t = 2 (z=2, y=0,1); overlap 0 -> 1/6
    # x=1: p = 2 (z=2), t = 2, overlap 2 -> 5/5 = 1
    # x=2: p = 2 (z=2), t = 0 -> 1/3 ; x=3: empty/empty -> 1
    np.testing.assert_allclose(per_x, [1 / 6, 1.0, 1 / 3, 1.0])
    s = volume_scores(pred, gt, 2, (1.0, 1.0, 1.0))
    np.testing.assert_allclose(s["slice_dice"][1], [1 / 4, 1.0, 5 / 9])


# ---------------------------------------------------------------- micro Dice
def test_micro_dice_differs_from_per_volume_mean_and_absent_class_zero():
    gt1, pred1 = _vol((8, 8, 6)), _vol((8, 8, 6))
    gt1[0:4, 0:4, 0:4] = 1
    pred1[1:5, 0:4, 0:4] = 1  # I=48, P=64, L=64 -> 0.75
    gt2, pred2 = _vol(), _vol()
    gt2[1:3, 1:3, 1:3] = 1
    pred2[2:4, 1:3, 1:3] = 1  # I=4, P=8, L=8 -> 0.5
    s1 = volume_scores(pred1, gt1, 3, (1.0, 1.0, 1.0))
    s2 = volume_scores(pred2, gt2, 3, (1.0, 1.0, 1.0))
    assert (s1["dice"][1], s2["dice"][1]) == (pytest.approx(0.75), pytest.approx(0.5))
    md = micro_dice([s1["counts"], s2["counts"]], n_classes=3)
    assert md["dice"][1] == pytest.approx(104 / 144)  # 2*(48+4)/(128+16) = 0.7222
    assert md["dice"][1] != pytest.approx((0.75 + 0.5) / 2)  # per-volume mean 0.625
    assert md["dice"][2] == 0.0  # class 2 absent from both everywhere
    assert md["mean"] == pytest.approx((104 / 144 + 0.0) / 2)
    # whole score dicts (and JSON-round-tripped str keys) are accepted too
    rt = json.loads(json.dumps([s1, s2]))
    assert micro_dice(rt, 3)["dice"][1] == pytest.approx(104 / 144)


# ---------------------------------------------------------------- aggregate
def _two_cases() -> list[dict]:
    # case 1, 1 mm iso: class 1 = 4x4x4 cube shifted by 1 in x (Dice 0.75, HD95 1.0); class 2 both empty
    gt1, pred1 = _vol((8, 8, 4)), _vol((8, 8, 4))
    gt1[0:4, 0:4, 0:4] = 1
    pred1[1:5, 0:4, 0:4] = 1
    # case 2, spacing (2,1,1): class 1 = 2x2x2 cube shifted by 1 in x (Dice 0.5, HD95 2.0);
    # class 2 only in GT (Dice 0, HD95 missing)
    gt2, pred2 = _vol((8, 8, 4)), _vol((8, 8, 4))
    gt2[1:3, 1:3, 1:3] = 1
    pred2[2:4, 1:3, 1:3] = 1
    gt2[5:7, 5:7, 1:3] = 2
    return [
        volume_scores(pred1, gt1, 3, (1.0, 1.0, 1.0)),
        volume_scores(pred2, gt2, 3, (2.0, 1.0, 1.0)),
    ]


def test_aggregate_hand_computed():
    c1, c2 = _two_cases()
    assert c1["dice"] == {1: pytest.approx(0.75), 2: 1.0} and c1["both_empty"][2] is True
    assert c2["dice"] == {1: pytest.approx(0.5), 2: 0.0} and c2["hd95_missing"][2] is True
    assert c1["hd95"][1] == pytest.approx(1.0) and c2["hd95"][1] == pytest.approx(2.0)

    agg = aggregate([c1, c2], NAMES)
    assert agg["n_cases"] == 2 and agg["sd_ddof"] == 1
    # per-case means: case 1 = 0.75 (both-empty class 2 excluded), case 2 = (0.5 + 0) / 2 = 0.25
    assert agg["dice_mean"] == pytest.approx(0.5)
    assert agg["dice_sd"] == pytest.approx(0.35355339)  # sqrt(2 * 0.25^2 / 1)
    assert agg["dice"]["anterior"] == {"mean": pytest.approx(0.625), "sd": pytest.approx(0.1767767),
                                       "n": 2, "n_both_empty": 0}
    assert agg["dice"]["posterior"] == {"mean": 0.0, "sd": 0.0, "n": 1, "n_both_empty": 1}
    # HD95: case means 1.0 and 2.0
    assert agg["hd95_mean"] == pytest.approx(1.5)
    assert agg["hd95_sd"] == pytest.approx(0.70710678)
    assert agg["hd95"]["anterior"]["mean"] == pytest.approx(1.5)
    assert agg["hd95"]["anterior"]["n_missing"] == 0
    assert agg["hd95"]["posterior"] == {"mean": None, "sd": None, "n": 0, "n_missing": 1, "n_both_empty": 1}
    # micro: class 1 2*(48+4)/(128+16); class 2: I=0, P=0, L=8 -> 0
    assert agg["micro_dice"]["anterior"] == pytest.approx(104 / 144)
    assert agg["micro_dice"]["posterior"] == 0.0
    assert agg["micro_dice"]["mean"] == pytest.approx(52 / 144)
    # slice-mean over 8 slices: class 1 = 4 x 25/33 (case 1) + 2 x 1 + 2 x 5/9 (case 2)
    sl1 = (4 * 25 / 33 + 2 + 2 * 5 / 9) / 8
    # class 2: 4 x 1 (case 1) + 2 x 1 + 2 x 1/5 (case 2: GT 4 px, pred empty)
    sl2 = (4 + 2 + 2 * 0.2) / 8
    assert agg["slice_mean_dice"]["anterior"] == pytest.approx(sl1)
    assert agg["slice_mean_dice"]["posterior"] == pytest.approx(sl2)
    assert agg["slice_mean_dice"]["mean"] == pytest.approx((sl1 + sl2) / 2)

    text = json.dumps(agg, allow_nan=False)  # plain floats, NaN -> None
    assert json.loads(text)["dice_mean"] == pytest.approx(0.5)


def test_aggregate_single_case_sd_zero_and_json_roundtrip_input():
    c1, c2 = _two_cases()
    agg = aggregate(json.loads(json.dumps([c2])), NAMES)  # str keys after a JSON round trip
    assert agg["dice_mean"] == pytest.approx(0.25) and agg["dice_sd"] == 0.0
    assert agg["hd95_mean"] == pytest.approx(2.0) and agg["hd95_sd"] == 0.0
    json.dumps(agg, allow_nan=False)


def test_per_case_rows():
    _, c2 = _two_cases()
    row = per_case_rows("hippocampus_001", c2, NAMES)
    assert row["case"] == "hippocampus_001"
    assert row["dice_anterior"] == pytest.approx(0.5) and row["dice_posterior"] == 0.0
    assert row["hd95_anterior"] == pytest.approx(2.0) and row["hd95_posterior"] is None
    assert row["hd95_missing_posterior"] is True and row["both_empty_posterior"] is False
    assert row["slice_dice_anterior"] == pytest.approx((2 + 2 * 5 / 9) / 4)
    assert row["dice_mean"] == pytest.approx(0.25) and row["hd95_mean"] == pytest.approx(2.0)
    assert "dice_background" not in row
    json.dumps(row, allow_nan=False)


# ---------------------------------------------------------------- input errors
def test_bad_inputs_raise_data_error():
    a = _vol()
    with pytest.raises(DataError, match="shape"):
        volume_scores(a, _vol((8, 8, 5)), 2)
    b = _vol()
    b[0, 0, 0] = 3
    with pytest.raises(DataError, match="outside"):
        volume_scores(b, a, 3)
    with pytest.raises(DataError, match="spacing"):
        volume_scores(a, a, 2, spacing=(1.0, 1.0))
    with pytest.raises(DataError, match="integers"):
        volume_scores(a + 0.5, a, 2)
