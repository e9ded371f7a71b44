"""Validation-gated SAM refinement (``policy: auto``): the per-class rule, the choice made on validation cases only,
what is recorded, and the errors, all with the box double (a "SAM" that predicts the box interior)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medssl.cli import main
from medssl.errors import ConfigError
from medssl.sam.policy import DEFAULT_CANDIDATES, KEEP, parse_policy, pick
from medssl.sam.refine import RefineConfig
from medssl.pipeline.refine import refine_predictions
from synth import write_nifti
from tests.sam.test_sam_refine import BoxSegmenter, _untrained_run

SHAPE = (16, 16, 4)


def test_policy_names():
    assert parse_policy("keep").keep
    p = parse_policy("component-gate0.8")
    assert (p.box_mode, p.merge, p.iou_threshold) == ("per_component", "replace", 0.8)
    assert (parse_policy("union").box_mode, parse_policy("union").merge) == ("global", "union")
    assert all(not parse_policy(n).keep for n in DEFAULT_CANDIDATES)
    for bad in ("xor", "gate", "gate1.5", "component-keep", "component-"):
        with pytest.raises(ConfigError, match="refine policy"):
            parse_policy(bad)
    for bad, needle in (({"policy": "sometimes"}, "policy"), ({"candidates": ["uni"]}, "uni"),
                        ({"class_policies": {0: "union"}}, "class_policies"), ({"auto_margin": -0.1}, "auto_margin"),
                        ({"policy": "auto", "class_policies": {1: "keep"}}, "exclude each other")):
        with pytest.raises(ConfigError, match=needle):
            RefineConfig(**bad).validate()


def test_rule_ties_and_margin():
    names = ["replace", "union"]
    assert pick({KEEP: 0.8, "replace": 0.8, "union": 0.8}, names, 0.0) == KEEP  # ties go to keep
    assert pick({KEEP: 0.8, "replace": 0.805, "union": 0.7}, names, 0.01) == KEEP  # not above the margin
    assert pick({KEEP: 0.8, "replace": 0.85, "union": 0.85}, names, 0.01) == "replace"  # first on ties
    assert pick({KEEP: 0.8, "replace": 0.7, "union": 0.9}, names, 0.01) == "union"
    assert pick({KEEP: 0.8}, [], 0.0) == KEEP


# ------------------------------------------------------------------ a dataset where "SAM" helps one class
def _rect_with_holes(lab, rows, cols, c):
    """Ground truth: a filled rectangle; coarse: the same with holes (same box). The box double fixes it."""
    gt = lab.copy()
    gt[rows, cols] = c
    coarse = gt.copy()
    coarse[rows.start + 1:rows.stop - 1:2, cols.start + 1:cols.stop - 1:2] = 0
    return gt, coarse


def _plus(lab, rows, cols, c):
    """Ground truth = coarse = a plus sign: the box double fills its corners (worse); intersect = keep."""
    gt = lab.copy()
    mid_r, mid_c = (rows.start + rows.stop) // 2, (cols.start + cols.stop) // 2
    gt[mid_r - 1:mid_r + 1, cols] = c
    gt[rows, mid_c - 1:mid_c + 1] = c
    return gt, gt.copy()


def _case(tmp: Path, case: str, helped: int):
    """Class ``helped`` is a holey rectangle (the double helps), the other class a plus sign (it hurts)."""
    gt, coarse = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    for z in (1, 2):
        for c, (rows, cols) in ((1, (slice(1, 7), slice(1, 7))), (2, (slice(9, 15), slice(9, 15)))):
            g, k = (_rect_with_holes if c == helped else _plus)(np.zeros(SHAPE[:2], np.uint8), rows, cols, c)
            gt[..., z] = np.where(g > 0, g, gt[..., z])
            coarse[..., z] = np.where(k > 0, k, coarse[..., z])
    image = np.random.default_rng(len(case)).normal(100, 10, SHAPE).astype(np.float32)
    write_nifti(tmp / "img" / f"{case}.nii.gz", image)
    write_nifti(tmp / "gt" / f"{case}.nii.gz", gt, dtype=np.uint8)
    write_nifti(tmp / ("val" if case.startswith("v") else "test") / f"{case}.nii.gz", coarse, dtype=np.uint8)
    return coarse


def _dataset(tmp: Path) -> dict:
    """Validation cases v1, v2: the double helps class 1, hurts class 2. Test cases t1, t2: the opposite."""
    for case in ("v1", "v2"):
        _case(tmp, case, helped=1)
    return {case: _case(tmp, case, helped=2) for case in ("t1", "t2")}


def test_auto_chooses_on_validation_only(tmp_path):
    coarse = _dataset(tmp_path)
    seg = BoxSegmenter()
    res = refine_predictions(tmp_path / "test", tmp_path / "img", tmp_path / "gt", out_dir=tmp_path / "out",
                             cfg=RefineConfig(policy="auto"), segmenter=seg,
                             validation=(tmp_path / "val", tmp_path / "img", tmp_path / "gt"), progress=False)
    pol = res["policy"]
    assert pol["validation_cases"] == ["v1", "v2"] and pol["candidates"] == list(DEFAULT_CANDIDATES)
    c1, c2 = pol["classes"]["class_1"], pol["classes"]["class_2"]
    assert c1["choice"] == "replace"  # helps on validation; the first of the tied best candidates
    assert c1["val_dice_choice"] == pytest.approx(1.0) and c1["val_dice_keep"] < 0.95
    assert c2["choice"] == KEEP and c2["val_dice_keep"] == pytest.approx(1.0)
    assert c2["val_dice"]["intersect"] == pytest.approx(1.0)  # ties keep exactly, and keep wins the tie
    assert c2["val_dice"]["replace"] < 1.0
    assert {int(k): v for k, v in pol["class_policies"].items()} == {1: "replace", 2: KEEP}
    # applied to the test cases, where the opposite would have been right: the choice stands
    for case, k in coarse.items():
        out = np.asarray(nib.load(str(tmp_path / "out" / f"{case}.nii.gz")).dataobj)
        assert np.array_equal(out == 2, k == 2)  # keep: class 2 left exactly as it was
        assert not np.array_equal(out == 1, k == 1)
    assert res["per_class"]["class_1"]["dice_delta"] < 0  # worse on test, as the test cases were built
    assert res["per_class"]["class_2"]["dice_delta"] == pytest.approx(0.0)
    # recorded: refine.json, refine_metrics.json and refine_policy.md
    saved = json.loads((tmp_path / "out" / "refine.json").read_text())
    assert saved["policy"]["classes"]["class_1"]["choice"] == "replace" and saved["config"]["policy"] == "auto"
    assert json.loads((tmp_path / "out" / "refine_metrics.json").read_text())["policy"]["margin"] == 0.01
    md = (tmp_path / "out" / "refine_policy.md").read_text()
    assert "| class_1 | replace |" in md and "| class_2 | keep |" in md and "2 validation case(s)" in md
    # the same data with the roles swapped flips the choices: they come from the validation cases
    swapped = refine_predictions(tmp_path / "val", tmp_path / "img", tmp_path / "gt", out_dir=tmp_path / "out2",
                                 cfg=RefineConfig(policy="auto"), segmenter=BoxSegmenter(),
                                 validation=(tmp_path / "test", tmp_path / "img", tmp_path / "gt"), progress=False)
    assert {n: d["choice"] for n, d in swapped["policy"]["classes"].items()} == {"class_1": KEEP,
                                                                                "class_2": "replace"}


def test_auto_margin_candidates_and_missing_validation(tmp_path):
    _dataset(tmp_path)
    val = (tmp_path / "val", tmp_path / "img", tmp_path / "gt")
    kw = dict(segmenter=BoxSegmenter(), validation=val, progress=False)
    res = refine_predictions(tmp_path / "test", tmp_path / "img", None, out_dir=tmp_path / "a",
                             cfg=RefineConfig(policy="auto", auto_margin=0.5), **kw)
    assert all(d["choice"] == KEEP for d in res["policy"]["classes"].values())  # nothing gains 0.5
    res = refine_predictions(tmp_path / "test", tmp_path / "img", None, out_dir=tmp_path / "b",
                             cfg=RefineConfig(policy="auto", candidates=["intersect", "component-union"]), **kw)
    assert res["policy"]["candidates"] == ["intersect", "component-union"]
    assert res["policy"]["classes"]["class_1"]["choice"] == "component-union"
    with pytest.raises(ConfigError, match="validation"):
        refine_predictions(tmp_path / "test", tmp_path / "img", None, out_dir=tmp_path / "c",
                           cfg=RefineConfig(policy="auto"), segmenter=BoxSegmenter())
    assert not (tmp_path / "c").exists()


def test_class_without_validation_evidence_is_kept(tmp_path):
    coarse = _dataset(tmp_path)
    k = coarse["t1"].copy()
    k[9:13, 2:6, 1] = 3  # a class the validation cases never had, plus-shaped so that a box would change it
    k[10:12, 2, 1] = k[10:12, 5, 1] = 0
    write_nifti(tmp_path / "test" / "t1.nii.gz", k, dtype=np.uint8)
    res = refine_predictions(tmp_path / "test", tmp_path / "img", None, out_dir=tmp_path / "out", progress=False,
                             cfg=RefineConfig(policy="auto"), segmenter=BoxSegmenter(),
                             validation=(tmp_path / "val", tmp_path / "img", tmp_path / "gt"))
    assert "class_3" not in res["policy"]["classes"]
    out = np.asarray(nib.load(str(tmp_path / "out" / "t1.nii.gz")).dataobj)
    assert np.array_equal(out == 3, k == 3)


def test_class_policies_per_class(tmp_path):
    """Fixed per-class policies (what auto applies): keep leaves a class exactly, another class is refined."""
    coarse = _dataset(tmp_path)
    refine_predictions(tmp_path / "test", tmp_path / "img", None, out_dir=tmp_path / "out", segmenter=BoxSegmenter(),
                       cfg=RefineConfig(class_policies={1: "keep", 2: "component-union"}), progress=False)
    out = np.asarray(nib.load(str(tmp_path / "out" / "t1.nii.gz")).dataobj)
    k = coarse["t1"]
    assert np.array_equal(out == 1, k == 1)
    assert ((out == 2) >= (k == 2)).all() and (out == 2).sum() > (k == 2).sum()  # union: holes filled


# ------------------------------------------------------------------ runs: validation from the split, errors
def test_refine_run_auto_and_errors(phantom_copy, tmp_path, capsys, monkeypatch):
    import medssl.sam.segmenter as segmod
    from medssl.data.splits import load_split
    from medssl.pipeline.sam_step import refine_run

    monkeypatch.setattr(segmod, "build_segmenter", lambda *a, **k: BoxSegmenter())

    run_dir = _untrained_run(phantom_copy, tmp_path / "cell")
    split = load_split(run_dir / "splits.json")
    seg = BoxSegmenter()
    res = refine_run(run_dir, RefineConfig(policy="auto"), segmenter=seg)
    assert res["policy"]["validation_cases"] == sorted(split.val) and res["cases"] == split.test
    assert not set(res["policy"]["validation_cases"]) & set(res["cases"])
    assert sorted(p.name for p in (run_dir / "sam" / "validation" / "coarse").glob("*.nii.gz")) == [
        f"{c}.nii.gz" for c in sorted(split.val)]
    assert set(res["policy"]["classes"]) and (run_dir / "sam" / "refined" / "refine_policy.md").is_file()
    n = seg.images
    assert refine_run(run_dir, RefineConfig(policy="auto"), segmenter=seg)["policy"] == res["policy"]  # cached
    assert seg.images == n
    # the CLI: --run gives the validation cases (predicted with the run's model into OUT/validation/coarse)
    pred = run_dir / "sam" / "coarse"
    rc = main(["refine", str(pred), "--data", str(phantom_copy), "-o", str(tmp_path / "o0"), "--labels",
               str(phantom_copy), "--run", str(run_dir), "sam.policy=auto", "sam.candidates=[union,gate0.8]",
               "sam.auto_margin=0.02"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "validation Dice keep" in captured.out and (tmp_path / "o0" / "refine_policy.md").is_file()
    saved = json.loads((tmp_path / "o0" / "refine.json").read_text())["policy"]
    assert saved["candidates"] == ["union", "gate0.8"] and saved["margin"] == 0.02
    assert saved["validation_cases"] == sorted(split.val)
    assert [f.name for f in (tmp_path / "o0" / "validation" / "coarse").glob("*.nii.gz")] == [
        f"{c}.nii.gz" for c in sorted(split.val)]
    # auto needs --run; a run without labels for its validation cases is named in one line
    rc = main(["refine", str(pred), "--data", str(phantom_copy), "-o", str(tmp_path / "o1"), "sam.policy=auto"])
    err = capsys.readouterr().err.strip()
    assert rc == ConfigError.exit_code and "--run" in err and len(err.splitlines()) == 1
    meta = json.loads((phantom_copy / "dataset.json").read_text())  # the validation cases lose their labels
    for entry in meta["training"]:
        if Path(entry["image"]).name.split(".")[0] in split.val:
            entry.pop("label")
    (phantom_copy / "dataset.json").write_text(json.dumps(meta))
    rc = main(["refine", str(pred), "--data", str(phantom_copy), "-o", str(tmp_path / "o2"), "sam.policy=auto",
               "--run", str(run_dir)])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and str(run_dir) in err and "labels" in err and len(err.splitlines()) == 1
    # a run whose split has no validation patients
    data = json.loads((run_dir / "splits.json").read_text())
    data["labelled"], data["val"] = sorted(data["labelled"] + data["val"]), []
    (run_dir / "splits.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=f"{run_dir}.*validation"):
        refine_run(run_dir, RefineConfig(policy="auto"), segmenter=seg, force=True)
