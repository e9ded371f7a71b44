"""``medssl evaluate PRED_DIR GT_DIR``: predictions made elsewhere, scored against real Hippocampus labels."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medssl.cli import main
from medssl.errors import ConfigError

CASES = ("hippocampus_001", "hippocampus_003")


def _run(argv, capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err.strip()


@pytest.fixture
def preds(hippocampus_root, tmp_path) -> Path:
    """Two ground-truth label files copied as "predictions"."""
    out = tmp_path / "pred"
    out.mkdir()
    for case in CASES:
        shutil.copy(hippocampus_root / "labelsTr" / f"{case}.nii.gz", out / f"{case}.nii.gz")
    return out


def _rewrite(path: Path, change) -> None:
    img = nib.load(str(path))
    arr = np.asarray(img.dataobj).copy()
    nib.save(nib.Nifti1Image(change(arr).astype(np.uint8), img.affine, img.header), str(path))


def test_ground_truth_as_prediction_scores_one(preds, hippocampus_root, capsys):
    rc, out, err = _run(["evaluate", preds, hippocampus_root / "labelsTr"], capsys)
    assert rc == 0, err
    assert "Anterior" in out and "Posterior" in out  # names from the dataset.json next to labelsTr
    summary = json.loads((preds / "evaluation" / "summary.json").read_text())
    assert summary["n_cases"] == 2 and summary["cases"] == list(CASES)
    assert summary["dice"]["Anterior"]["mean"] == 1.0 and summary["dice"]["Posterior"]["mean"] == 1.0
    assert summary["hd95_mean"] == 0.0
    assert summary["ground_truth_without_prediction"] == 258  # the rest of the 260 labelled cases
    rows = list(csv.DictReader((preds / "evaluation" / "per_case.csv").open()))
    assert [r["case"] for r in rows] == list(CASES)
    assert all(float(r["dice_Anterior"]) == 1.0 for r in rows)


def test_perturbed_prediction_scores_below_one(preds, hippocampus_root, tmp_path, capsys):
    """One case loses its posterior class to background; --data (the dataset folder) is the ground truth."""
    _rewrite(preds / f"{CASES[1]}.nii.gz", lambda a: np.where(a == 2, 0, a))
    out_dir = tmp_path / "scores"
    rc, _, err = _run(["evaluate", preds, "--data", hippocampus_root, "--labels", "2", "--out", out_dir], capsys)
    assert rc == 0, err
    summary = json.loads((out_dir / "summary.json").read_text())
    assert list(summary["dice"]) == ["Posterior"] and summary["labels"] == {"2": "Posterior"}
    rows = {r["case"]: r for r in csv.DictReader((out_dir / "per_case.csv").open())}
    assert float(rows[CASES[0]]["dice_Posterior"]) == 1.0
    assert float(rows[CASES[1]]["dice_Posterior"]) == 0.0
    assert summary["dice"]["Posterior"]["mean"] == pytest.approx(0.5)
    assert not (preds / "evaluation").exists()


def test_eroded_prediction_has_dice_below_one_and_positive_hd95(preds, hippocampus_root, capsys):
    from scipy.ndimage import binary_erosion

    _rewrite(preds / f"{CASES[0]}.nii.gz", lambda a: np.where((a == 1) & ~binary_erosion(a == 1), 0, a))
    rc, _, err = _run(["evaluate", preds, hippocampus_root / "labelsTr"], capsys)
    assert rc == 0, err
    rows = {r["case"]: r for r in csv.DictReader((preds / "evaluation" / "per_case.csv").open())}
    assert 0.2 < float(rows[CASES[0]]["dice_Anterior"]) < 1.0 and float(rows[CASES[0]]["hd95_Anterior"]) > 0
    assert float(rows[CASES[1]]["dice_Anterior"]) == 1.0


def test_bad_inputs_are_one_line_errors_and_write_nothing(preds, hippocampus_root, tmp_path, capsys):
    gt = hippocampus_root / "labelsTr"
    # a prediction without ground truth
    shutil.copy(preds / f"{CASES[0]}.nii.gz", preds / "not_a_case.nii.gz")
    rc, _, err = _run(["evaluate", preds, gt], capsys)
    assert rc != 0 and len(err.splitlines()) == 1 and "not_a_case" in err and "no ground truth" in err
    (preds / "not_a_case.nii.gz").unlink()
    # an unknown class id in --labels, and in a prediction
    rc, _, err = _run(["evaluate", preds, gt, "--labels", "1,7"], capsys)
    assert rc == ConfigError.exit_code and "--labels" in err and "[7]" in err and len(err.splitlines()) == 1
    _rewrite(preds / f"{CASES[0]}.nii.gz", lambda a: np.where(a == 2, 5, a))
    rc, _, err = _run(["evaluate", preds, gt], capsys)
    assert rc != 0 and f"{CASES[0]}.nii.gz" in err and "[5]" in err and len(err.splitlines()) == 1
    shutil.copy(gt / f"{CASES[0]}.nii.gz", preds / f"{CASES[0]}.nii.gz")
    # shape and affine mismatches
    img = nib.load(str(preds / f"{CASES[1]}.nii.gz"))
    arr = np.asarray(img.dataobj)
    nib.save(nib.Nifti1Image(arr[:-1], img.affine), str(preds / f"{CASES[1]}.nii.gz"))
    rc, _, err = _run(["evaluate", preds, gt], capsys)
    assert rc != 0 and "shape" in err and CASES[1] in err and len(err.splitlines()) == 1
    shifted = img.affine.copy()
    shifted[0, 3] += 5.0
    nib.save(nib.Nifti1Image(arr, shifted), str(preds / f"{CASES[1]}.nii.gz"))
    rc, _, err = _run(["evaluate", preds, gt], capsys)
    assert rc != 0 and "affine" in err and CASES[1] in err and len(err.splitlines()) == 1
    # the ground truth twice, run-folder options with predictions, a missing folder
    rc, _, err = _run(["evaluate", preds, gt, "--data", gt], capsys)
    assert rc != 0 and "once" in err
    rc, _, err = _run(["evaluate", preds, gt, "--part", "val"], capsys)
    assert rc != 0 and "--part" in err
    rc, _, err = _run(["evaluate", tmp_path / "nowhere", gt], capsys)
    assert rc != 0 and "nowhere" in err and "not found" in err
    assert not (preds / "evaluation").exists()


def test_run_parts_match_the_evaluator():
    from medssl.cli.commands import Part
    from medssl.evaluation.evaluate import PARTS

    assert tuple(str(p) for p in Part) == PARTS
