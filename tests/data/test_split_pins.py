"""The k-fold test folds, pinned: old runs' ``splits.json`` must stay reproducible whatever computes the folds.

The literals were printed once from the hand-written KFold that ``kfold_patients`` used before it called
scikit-learn (shuffle ``arange(n)`` with ``RandomState(seed)``, consecutive chunks, the first ``n % k`` one
longer, each fold in sorted-id order). A change of the fold code, of scikit-learn's ``KFold`` or of numpy's
legacy ``RandomState`` stream fails here.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from conftest import require_shared
from medssl.data.splits import kfold_patients, make_split

PINNED = {
    (7, 2, 0): [["case_01", "case_02", "case_03", "case_06"], ["case_00", "case_04", "case_05"]],
    (10, 5, 12345): [["case_00", "case_07"], ["case_03", "case_09"], ["case_04", "case_06"],
                     ["case_01", "case_08"], ["case_02", "case_05"]],
    (11, 3, 0): [["case_02", "case_04", "case_09", "case_10"], ["case_01", "case_06", "case_07", "case_08"],
                 ["case_00", "case_03", "case_05"]],
    (13, 4, 7): [["case_02", "case_05", "case_08", "case_10"], ["case_00", "case_01", "case_12"],
                 ["case_03", "case_07", "case_11"], ["case_04", "case_06", "case_09"]],
    (30, 5, 1): [["case_10", "case_14", "case_17", "case_19", "case_20", "case_21"],
                 ["case_03", "case_04", "case_22", "case_23", "case_24", "case_26"],
                 ["case_02", "case_06", "case_07", "case_13", "case_18", "case_25"],
                 ["case_00", "case_01", "case_15", "case_16", "case_27", "case_29"],
                 ["case_05", "case_08", "case_09", "case_11", "case_12", "case_28"]],
}


def _digest(folds: list[list[str]]) -> str:
    return hashlib.sha256(json.dumps(folds).encode()).hexdigest()[:16]


@pytest.mark.parametrize("n,k,seed", sorted(PINNED))
def test_folds_pinned(n: int, k: int, seed: int) -> None:
    ids = [f"case_{i:02d}" for i in range(n)]
    assert kfold_patients(ids, k, seed) == PINNED[(n, k, seed)]
    assert kfold_patients(list(reversed(ids)), k, seed) == PINNED[(n, k, seed)]  # input order does not matter
    assert [make_split(ids, fold=f, n_folds=k, fold_seed=seed, val_patients=0).test for f in range(k)] == \
        PINNED[(n, k, seed)]


def test_folds_pinned_260_synthetic_ids() -> None:
    folds = kfold_patients([f"hippocampus_{i:03d}" for i in range(260)], 5, 12345)
    assert folds[0][:5] == ["hippocampus_009", "hippocampus_010", "hippocampus_016", "hippocampus_018",
                            "hippocampus_020"]
    assert _digest(folds) == "08bb9fbaf2ac9b9a"


@pytest.mark.integration
def test_folds_pinned_task04_hippocampus() -> None:
    from medssl.data.layouts import open_dataset

    info = open_dataset(require_shared("Task04_Hippocampus"))
    ids = [c.case_id for c in info.cases if c.label is not None]
    assert len(ids) == 260
    folds = kfold_patients(ids, 5, 12345)  # the protocol's default fold seed
    assert [f[:3] for f in folds] == [
        ["hippocampus_017", "hippocampus_019", "hippocampus_033"],
        ["hippocampus_003", "hippocampus_025", "hippocampus_026"],
        ["hippocampus_004", "hippocampus_007", "hippocampus_015"],
        ["hippocampus_001", "hippocampus_006", "hippocampus_011"],
        ["hippocampus_008", "hippocampus_014", "hippocampus_020"]]
    assert _digest(folds) == "16ef1d00906ec7c6"
    assert _digest(kfold_patients(ids, 5, 0)) == "07807d7339143f09"
