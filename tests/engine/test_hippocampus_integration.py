"""Integration (slow): fine-tune on real Hippocampus MRI with M = 20 labelled patients on CPU.

Run with `bash scripts/test.sh -m slow` (about 4 minutes on 2 cores).
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from conftest import require_shared
from medssl.config import load_config
from medssl.engine.finetune import finetune
from medssl.evaluation.evaluate import evaluate_run, predict_files


@pytest.mark.slow
@pytest.mark.integration
def test_hippocampus_m20_reaches_dice_070(tmp_path):
    data = require_shared("Task04_Hippocampus")
    cfg = load_config("hippocampus", overrides=[f"data.path={data}", f"output_dir={tmp_path}", "name=m20",
                                                f"data.cache_dir={tmp_path / 'cache'}", "split.budget=20"])
    run = finetune(cfg, progress=False)
    split = json.loads((run / "splits.json").read_text())
    assert len(split["labelled"]) == 20 and len(split["test"]) >= 20
    assert not set(split["test"]) & (set(split["val"]) | set(split["labelled"]) | set(split["unlabelled"]))

    summary = evaluate_run(run, progress=False)
    assert summary["n_cases"] >= 20
    assert summary["dice_mean"] >= 0.70, summary["dice"]
    assert summary["hd95_mean"] is not None and summary["hd95_mean"] < 10.0
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"dice_mean", "dice", "hd95_mean", "micro_dice", "slice_mean_dice"} <= set(metrics)

    # predictions land in the input's geometry
    case = split["test"][0]
    src = data / "imagesTr" / f"{case}.nii.gz"
    (out,) = predict_files(run / "checkpoints" / "best.pt", src, tmp_path / "pred", progress=False)
    a, b = nib.load(src), nib.load(out)
    assert a.shape == b.shape
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-5)
    truth = np.asarray(nib.load(data / "labelsTr" / f"{case}.nii.gz").dataobj)
    pred = np.asarray(b.dataobj)
    inter = ((pred > 0) & (truth > 0)).sum()
    assert 2 * inter / ((pred > 0).sum() + (truth > 0).sum()) > 0.6
