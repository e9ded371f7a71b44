"""Patient-level splits, validation subset and label budgets (docs/protocol.md#splits)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from medssl.data.splits import (
    Split,
    describe_rule,
    kfold_patients,
    load_split,
    make_split,
    patient_groups,
    save_split,
)
from medssl.errors import ConfigError

ACDC_REGEX = r"(patient\d+)_frame\d+"


def acdc_cases(n_patients: int = 30) -> list[str]:
    """Two frames per patient, ACDC style (ED/ES frame numbers differ per patient)."""
    return [f"patient{p:03d}_frame{f:02d}" for p in range(1, n_patients + 1) for f in (1, 10 + p % 5)]


def hippo_ids(n: int = 260) -> list[str]:
    return [f"hippocampus_{i:03d}" for i in range(n)]


def check_partition(split: Split, cases: list[str], groups: dict[str, str]) -> None:
    parts = [split.test, split.val, split.labelled, split.unlabelled]
    assert sorted(c for part in parts for c in part) == sorted(cases)  # every case exactly once
    owner: dict[str, int] = {}
    for i, part in enumerate(parts):
        for c in part:
            assert owner.setdefault(groups[c], i) == i, f"patient {groups[c]} in two parts"
    for name, part in zip(("test", "val", "labelled", "unlabelled"), parts):
        assert sorted({groups[c] for c in part}) == split.patients[name]


# ------------------------------------------------------------------------------------------- grouping
def test_regex_groups_frames_and_followups() -> None:
    cases = acdc_cases(3)
    groups = patient_groups(cases, regex=ACDC_REGEX)
    assert groups["patient002_frame01"] == groups["patient002_frame12"] == "patient002"
    assert len(set(groups.values())) == 3
    follow = patient_groups(["a7_baseline", "a7_followup", "b_2_baseline"], regex=r"(.+?)_(baseline|followup)")
    assert follow == {"a7_baseline": "a7", "a7_followup": "a7", "b_2_baseline": "b_2"}
    named = patient_groups(["x_p01_s1"], regex=r"(?P<site>\w)_(?P<patient>p\d+)_s\d")
    assert named == {"x_p01_s1": "p01"}
    assert patient_groups(["a", "b"]) == {"a": "a", "b": "b"}


def test_regex_errors_name_the_case() -> None:
    with pytest.raises(ConfigError, match="patient007_ES"):
        patient_groups(["patient001_frame01", "patient007_ES"], regex=ACDC_REGEX)
    with pytest.raises(ConfigError, match="invalid"):
        patient_groups(["a"], regex="(unclosed")
    with pytest.raises(ConfigError, match="not both"):
        patient_groups(["a"], regex="(a)", mapping_file="m.csv")


def test_mapping_file_csv_and_json(tmp_path: Path) -> None:
    csv_file = tmp_path / "map.csv"
    csv_file.write_text("case,patient\nscan_a,P1\nscan_b,P1\nscan_c,P2\n")
    assert patient_groups(["scan_a", "scan_b", "scan_c"], mapping_file=csv_file) == {
        "scan_a": "P1", "scan_b": "P1", "scan_c": "P2"}
    json_file = tmp_path / "map.json"
    json_file.write_text(json.dumps({"scan_a": "P1", "scan_b": "P2", "extra": "P9"}))
    assert patient_groups(["scan_b", "scan_a"], mapping_file=str(json_file)) == {"scan_b": "P2", "scan_a": "P1"}
    with pytest.raises(ConfigError, match="scan_z.*map.csv"):
        patient_groups(["scan_a", "scan_z"], mapping_file=csv_file)
    with pytest.raises(ConfigError, match="nope.json"):
        patient_groups(["scan_a"], mapping_file=tmp_path / "nope.json")
    bad = tmp_path / "bad.csv"
    bad.write_text("id,subject\na,b\n")
    with pytest.raises(ConfigError, match="bad.csv"):
        patient_groups(["a"], mapping_file=bad)


def test_describe_rule() -> None:
    assert describe_rule(None, None) == "each case is its own patient"
    assert ACDC_REGEX in describe_rule(ACDC_REGEX, None)
    assert "map.csv" in describe_rule(None, "map.csv")
    split = make_split(acdc_cases(10), fold=0, groups=patient_groups(acdc_cases(10), regex=ACDC_REGEX),
                       rule=describe_rule(ACDC_REGEX, None))
    assert ACDC_REGEX in split.rule


# ------------------------------------------------------------------------------------------- k-fold
def test_kfold_matches_sklearn_algorithm_n10_k5() -> None:
    ids = [f"p{i:02d}" for i in range(10)]
    folds = kfold_patients(list(reversed(ids)), n_folds=5, seed=12345)  # input order must not matter
    # sklearn KFold(5, shuffle=True, random_state=12345): shuffle arange(n) with RandomState, consecutive chunks
    idx = np.arange(10)
    np.random.RandomState(12345).shuffle(idx)
    expected = [sorted(idx[2 * f : 2 * f + 2].tolist()) for f in range(5)]
    assert [[ids.index(p) for p in fold] for fold in folds] == expected
    # literal, printed once: catches a change of the algorithm (or of numpy's legacy RandomState stream)
    assert expected == [[0, 7], [3, 9], [4, 6], [1, 8], [2, 5]]
    assert folds[2] == ["p04", "p06"]


def test_kfold_uneven_first_folds_get_extra() -> None:
    ids = [f"p{i:02d}" for i in range(11)]
    folds = kfold_patients(ids, n_folds=3, seed=0)
    idx = np.arange(11)
    np.random.RandomState(0).shuffle(idx)
    assert [len(f) for f in folds] == [4, 4, 3]
    assert [[ids.index(p) for p in f] for f in folds] == [
        sorted(idx[:4].tolist()), sorted(idx[4:8].tolist()), sorted(idx[8:].tolist())]
    assert [[ids.index(p) for p in f] for f in folds] == [[2, 4, 9, 10], [1, 6, 7, 8], [0, 3, 5]]


def test_kfold_hippocampus_260_covers_all_once() -> None:
    ids = hippo_ids()
    folds = kfold_patients(ids, 5, 12345)
    assert [len(f) for f in folds] == [52] * 5
    flat = [p for f in folds for p in f]
    assert sorted(flat) == ids and len(set(flat)) == 260
    tests = [make_split(ids, fold=k, budget=6).test for k in range(5)]
    assert sorted(c for t in tests for c in t) == ids
    assert tests == folds


# ------------------------------------------------------------------------------------------- make_split
def test_split_by_patient_with_two_frames() -> None:
    cases = acdc_cases(30)
    groups = patient_groups(cases, regex=ACDC_REGEX)
    for fold in range(5):
        split = make_split(cases, fold=fold, groups=groups, val_patients=2, budget=5)
        check_partition(split, cases, groups)
        assert split.n_patients == {"test": 6, "val": 2, "labelled": 5, "unlabelled": 17}
        assert len(split.labelled) == 10 and len(split.test) == 12
        assert split.patients["test"] == kfold_patients(groups.values())[fold]


def test_seeds_reproduce_and_differ() -> None:
    cases = acdc_cases(30)
    groups = patient_groups(cases, regex=ACDC_REGEX)
    a = make_split(cases, fold=1, groups=groups, budget=5, budget_seed=3)
    b = make_split(cases, fold=1, groups=groups, budget=5, budget_seed=3)
    c = make_split(cases, fold=1, groups=groups, budget=5, budget_seed=4)
    assert a == b
    assert a.labelled != c.labelled
    assert a.test == c.test and a.val == c.val  # budget seed moves only the budget
    d = make_split(cases, fold=1, groups=groups, budget=5, budget_seed=3, val_seed=1)
    assert d.val != a.val and d.test == a.test


def test_literal_small_split() -> None:
    split = make_split([f"p{i:02d}" for i in range(10)], fold=0, budget=3)
    assert split.patients == {"test": ["p00", "p07"], "val": ["p03", "p05"], "labelled": ["p04", "p06", "p09"],
                              "unlabelled": ["p01", "p02", "p08"]}


def test_nested_budgets() -> None:
    cases = acdc_cases(30)
    groups = patient_groups(cases, regex=ACDC_REGEX)
    labelled = {m: set(make_split(cases, fold=2, groups=groups, budget=m, budget_seed=7).patients["labelled"])
                for m in (1, 2, 5)}
    assert [len(labelled[m]) for m in (1, 2, 5)] == [1, 2, 5]
    assert labelled[1] < labelled[2] < labelled[5]
    full = make_split(cases, fold=2, groups=groups, budget="all")
    assert full.unlabelled == [] and full.budget_m == 22 and full.budget == "all"


@pytest.mark.parametrize("val", [0, 2])
@pytest.mark.parametrize("m", [2, 6])
def test_legacy_equals_random_sample(val: int, m: int) -> None:
    cases = acdc_cases(30)
    groups = patient_groups(cases, regex=ACDC_REGEX)
    split = make_split(cases, fold=3, groups=groups, val_patients=val, budget=m, budget_mode="legacy",
                       budget_seed=None)
    train = sorted({groups[c] for c in split.labelled + split.unlabelled})
    assert len(train) == 24 - val
    random.seed(1234)
    assert split.patients["labelled"] == sorted(random.sample(train, m))
    other = make_split(cases, fold=3, groups=groups, val_patients=val, budget=m, budget_mode="legacy",
                       budget_seed=99)
    random.seed(99)
    assert other.patients["labelled"] == sorted(random.sample(train, m))


def test_fraction_budget_and_val() -> None:
    ids = hippo_ids()
    split = make_split(ids, fold=0, val_patients=0.1, budget=0.25)
    assert split.n_patients["val"] == 21  # round(0.1 * 208) = 20.8 -> 21
    assert split.budget_m == 47 == split.n_patients["labelled"]  # 0.25 * 187 = 46.75 -> 47
    assert make_split(ids[:10], fold=0, val_patients=0, budget=0.01).budget_m == 1  # at least one
    assert make_split(ids, fold=0, budget=1.0).unlabelled == []
    assert make_split(ids, fold=0, budget="5").budget_m == 5


def test_holdout_test_cases() -> None:
    cases = acdc_cases(12)
    groups = patient_groups(cases, regex=ACDC_REGEX)
    split = make_split(cases, test_cases=["patient001_frame01", "patient005_frame10"], groups=groups, budget=3)
    assert split.patients["test"] == ["patient001", "patient005"]
    assert split.test == ["patient001_frame01", "patient001_frame11", "patient005_frame01", "patient005_frame10"]
    assert split.fold is None and split.n_folds is None
    check_partition(split, cases, groups)
    with pytest.raises(ConfigError, match="patient099_frame01"):
        make_split(cases, test_cases=["patient099_frame01"], groups=groups)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"budget": 300}, r"M=300 exceeds the 206 training patients available in fold 0 \(after 2 validation"),
        ({"budget": 0}, r"M=0 is below 1 \(206 training"),
        ({"budget": -3}, r"M=-3 is below 1"),
        ({"budget": 1.5}, r"fraction 1\.5 is outside \(0, 1\] \(206 training"),
        ({"budget": 0.0}, r"fraction 0\.0 is outside"),
        ({"budget": "lots"}, r"'lots'"),
        ({"val_patients": -1}, r"val_patients=-1 is negative"),
        ({"val_patients": 208}, r"208 patients leaves no training patients in fold 0 \(208 non-test"),
        ({"val_patients": 1.0}, r"fraction 1\.0 is outside \[0, 1\) \(208 non-test"),
        ({"fold": 5}, r"fold index 5 is out of range for n_folds=5"),
        ({"fold": 3, "n_folds": 300}, r"n_folds=300 exceeds the 260 patients"),
        ({"n_folds": 1}, r"n_folds must be >= 2 \(got 1\)"),
        ({"budget_mode": "greedy"}, r"greedy"),
    ],
)
def test_impossible_settings_raise(kwargs: dict, pattern: str) -> None:
    args = {"fold": 0, "budget": 5, **kwargs}
    with pytest.raises(ConfigError, match=pattern) as info:
        make_split(hippo_ids(), **args)
    assert "\n" not in str(info.value)


def test_impossible_budget_small_dataset_message() -> None:
    cases = acdc_cases(30)
    groups = patient_groups(cases, regex=ACDC_REGEX)
    with pytest.raises(ConfigError, match=r"^config key .split.budget.: label budget M=30 exceeds the 22 training patients available in fold 0 "
                                          r"\(after 2 validation patients\)$"):
        make_split(cases, fold=0, groups=groups, budget=30)
    with pytest.raises(ConfigError, match="patient001_frame01"):
        make_split(cases, fold=0, groups={})
    with pytest.raises(ConfigError, match="fold"):
        make_split(cases)


# ------------------------------------------------------------------------------------------- JSON
def test_json_round_trip(tmp_path: Path) -> None:
    cases = acdc_cases(20)
    groups = patient_groups(cases, regex=ACDC_REGEX)
    split = make_split(cases, fold=4, groups=groups, val_patients=np.int64(3), budget=0.5, budget_seed=11,
                       rule=describe_rule(ACDC_REGEX, None))
    again = Split.from_json(split.to_json())
    assert again == split and again.budget == 0.5 and isinstance(again.val_patients, int)
    path = save_split(split, tmp_path / "sub" / "split_f4.json")
    assert load_split(path) == split
    assert [p.name for p in path.parent.iterdir()] == ["split_f4.json"]  # no temp file left
    data = json.loads(path.read_text())
    assert data["format"] == "medssl-split/1" and data["budget_m"] == split.budget_m == 7  # 0.5 * 13 = 6.5 -> 7
    data["val"].append(data["test"][0])
    with pytest.raises(ConfigError, match="in both"):
        Split.from_dict(data)
    with pytest.raises(ConfigError, match="missing.json"):
        load_split(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ConfigError, match="broken.json"):
        load_split(tmp_path / "broken.json")


# ------------------------------------------------------------------------------------------- split.labelled
def test_with_labelled_cases_labels_exactly_the_listed_patients() -> None:
    from medssl.data.splits import with_labelled_cases

    ids = hippo_ids(20)
    groups = {c: c for c in ids}
    split = make_split(ids, fold=0, budget=2, budget_seed=0)
    drawn = split.patients["labelled"]
    chosen = [p for p in split.patients["unlabelled"] if p not in drawn][-2:]  # not the seeded draw
    new = with_labelled_cases(split, list(reversed(chosen)), groups)
    assert new.labelled == new.patients["labelled"] == sorted(chosen)
    assert new.unlabelled == sorted(set(split.train) - set(chosen))
    assert (new.test, new.val, new.patients["test"], new.patients["val"]) == (
        split.test, split.val, split.patients["test"], split.patients["val"])
    assert (new.budget_m, new.budget_mode) == (2, "explicit")
    check_partition(new, ids, groups)
    assert Split.from_json(new.to_json()) == new  # splits.json keeps the list
    # budget "all": the list sets M
    full = with_labelled_cases(make_split(ids, fold=0, budget="all"), chosen[:1], groups)
    assert full.labelled == chosen[:1] and full.budget_m == 1
    # a fraction must resolve to the listed number of patients
    frac = make_split(ids, fold=0, budget=0.2)  # 0.2 x 14 training patients = 2.8 -> 3
    assert frac.budget_m == 3
    with_labelled_cases(frac, frac.patients["unlabelled"][:3], groups)


def test_with_labelled_cases_takes_whole_patients() -> None:
    from medssl.data.splits import with_labelled_cases

    cases = acdc_cases(30)
    groups = patient_groups(cases, regex=ACDC_REGEX)
    split = make_split(cases, fold=0, groups=groups, budget=2, budget_seed=0)
    one_frame = [c for c in split.unlabelled][:1]  # one frame of a patient not drawn: all its frames
    patient = groups[one_frame[0]]
    other = next(c for c in split.unlabelled if groups[c] != patient)
    new = with_labelled_cases(split, [one_frame[0], other], groups)
    assert new.patients["labelled"] == sorted({patient, groups[other]})
    assert new.labelled == sorted(c for c in cases if groups[c] in {patient, groups[other]}) and len(new.labelled) == 4
    check_partition(new, cases, groups)
    # two frames of one patient are one patient: M = 1, not 2
    both = [c for c in cases if groups[c] == patient]
    with pytest.raises(ConfigError, match=r"1 patient\(s\) listed, but split.budget=2 asks for M=2"):
        with_labelled_cases(split, both, groups)


@pytest.mark.parametrize("what", ["test", "val", "unknown", "no_label", "twice", "count", "empty"])
def test_with_labelled_cases_rejects_bad_lists(what: str) -> None:
    from medssl.data.splits import with_labelled_cases

    ids = hippo_ids(20)
    groups = {c: c for c in ids}
    split = make_split(ids, fold=0, budget=2)
    train = split.patients["labelled"] + split.patients["unlabelled"]
    given, needle = {
        "test": ([train[0], split.test[0]], f"case '{split.test[0]}' is a test case of fold 0"),
        "val": ([split.val[0], train[0]], f"case '{split.val[0]}' is a validation case of fold 0"),
        "unknown": ([train[0], "hippocampus_999"], "unknown case 'hippocampus_999'"),
        "no_label": ([train[0], "extra_007"], "case 'extra_007' has no label"),
        "twice": ([train[0], train[0]], f"case '{train[0]}' is listed twice"),
        "count": (train[:3], r"3 patient\(s\) listed, but split.budget=2 asks for M=2"),
        "empty": ([], "empty"),
    }[what]
    with pytest.raises(ConfigError, match=r"^config key 'split.labelled_file': .*" + needle) as info:
        with_labelled_cases(split, given, groups, no_label=["extra_007"], key="split.labelled_file")
    assert "\n" not in str(info.value)
