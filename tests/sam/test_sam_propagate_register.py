"""Registration propagation, the registration/LiteMedSAM hybrid, dense mask prompts, the copy-window choice on
validation volumes, and the new ``medssl propagate`` options. Synthetic volumes only (each test takes seconds)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from scipy import ndimage

from medssl.cli import main
from medssl.errors import ConfigError
from medssl.sam import register as reg
from medssl.sam.chain import box_chain, dice2d
from medssl.sam.prop_baselines import (best_k, choose_copy_window, copy_masks, copy_window_scores, window_masks,
                                       window_scores)
from medssl.sam.propagate import PropagateConfig, annotation_from_slice, baselines, propagate_volume
from medssl.sam.segmenter import mask_to_box
from synth import write_nifti


def moving_ellipse(z_n=15, shape=(48, 56), present=(2, 12), step=(1.5, 0.5), seed=0):
    """(image, truth) as (Z, h, w): a bright textured ellipse that moves by ``step`` (dx, dy) px per slice, grows
    in x and shrinks in y, on a static textured background; it exists on slices ``present[0] .. present[1]``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:shape[0], :shape[1]].astype(np.float32)
    bg = ndimage.gaussian_filter(rng.normal(size=shape), 2.0)
    bg = 0.3 + 0.08 * bg / bg.std()
    image, truth = np.zeros((z_n,) + shape, np.float32), np.zeros((z_n,) + shape, np.uint8)
    for z in range(z_n):
        cx, cy = 16 + step[0] * z, 20 + step[1] * z
        a, b = 8 + 0.3 * z, 9 - 0.2 * z
        m = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1
        sl = bg.copy()
        if present[0] <= z <= present[1]:
            sl[m] = 0.8 + 0.05 * np.sin(xx[m] - cx) * np.cos(yy[m] - cy)  # texture that moves with it
            truth[z][m] = 1
        image[z] = ndimage.gaussian_filter(sl, 0.7) + rng.normal(0, 0.02, shape).astype(np.float32)
    return image, truth


def _dice3d(a, b):
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


# ------------------------------------------------------------------ registration backend
def test_registration_tracks_a_moving_deforming_ellipse_and_beats_copy():
    image, truth = moving_ellipse()
    ann = annotation_from_slice(truth[7], 7, truth.shape, 0)
    cfg = PropagateConfig(backend="register")
    labels, info = propagate_volume(image, ann, cfg)  # axis 0: the slices are image[z]
    assert info["note"].startswith("registration")
    assert info["extent"] == {1: (2, 12)}  # it stops where the structure ends (the flow folds there) ...
    assert {d: (v["reason"], v["slice"]) for d, v in info["stops"][1].items()} == {
        "forward": ("diverged", 13), "backward": ("diverged", 1)}
    _, info = propagate_volume(image, ann, PropagateConfig(backend="register", reg_max_fold=1.0))
    assert info["extent"] == {1: (2, 12)} and info["stops"][1]["forward"]["reason"] == "intensity"
    _, info = propagate_volume(image, ann, PropagateConfig(backend="register", reg_max_fold=1.0,
                                                           reg_max_intensity_drift=0))
    assert info["extent"] == {1: (0, 14)} and info["stops"][1]["forward"]["reason"] == "volume_end"
    d_reg = _dice3d(labels == 1, truth == 1)
    base = baselines(ann, truth.shape)
    d_copy = _dice3d(base["copy"] == 1, truth == 1)
    d_window = max(_dice3d(baselines(ann, truth.shape, k)["copy"] == 1, truth == 1) for k in range(9))
    assert d_reg > 0.85 and d_reg > d_copy + 0.3 and d_reg > d_window + 0.1, (d_reg, d_copy, d_window)
    per_slice = [dice2d(labels[z] == 1, truth[z] == 1) for z in range(2, 13)]
    assert min(per_slice) > 0.75  # ... and follows it on every slice, also the far ones
    again, _ = propagate_volume(image, ann, cfg)
    assert np.array_equal(again, labels)  # deterministic


def test_registration_step_limit_and_empty_input_error():
    image, truth = moving_ellipse()
    ann = annotation_from_slice(truth[7], 7, truth.shape, 0)
    labels, info = propagate_volume(image, ann, PropagateConfig(backend="register", reg_max_steps=2))
    assert info["extent"] == {1: (5, 9)} and info["stops"][1]["forward"] == {
        "reason": "max_steps", "slice": 10, "detail": "2 slices reached"}
    from medssl.errors import DataError

    with pytest.raises(DataError, match=r"ann\.npy: the annotated slice 0 is empty"):
        annotation_from_slice(truth[0], 0, truth.shape, 0, source="ann.npy")
    with pytest.raises(DataError, match=r"ann\.npy: the annotated slice 7 has no pixel of label 2"):
        annotation_from_slice(truth[7], 7, truth.shape, 0, label=2, source="ann.npy")


def test_divergence_and_area_stops():
    cfg = PropagateConfig(backend="register")
    prev = np.zeros((40, 40), bool)
    prev[15:25, 12:28] = True
    yy, xx = np.mgrid[:40, :40].astype(np.float32)
    zero = np.zeros((40, 40, 2), np.float32)
    new, why = reg.check_step(prev, zero, cfg)
    assert why is None and np.array_equal(new, prev)
    nan = zero.copy()
    nan[3, 3, 0] = np.nan
    assert reg.check_step(prev, nan, cfg)[1] == {"reason": "diverged", "detail": "non-finite flow"}
    far = zero.copy()
    far[..., 0] = 6.0  # 6 px everywhere; the bound is 0.1 * 40 = 4 px
    why = reg.check_step(prev, far, cfg)[1]
    assert why["reason"] == "diverged" and "mean displacement" in why["detail"]
    assert reg.check_step(prev, far, PropagateConfig(reg_max_shift=0.2))[1] is None
    fold = np.stack([-2.0 * (xx - 20), np.zeros_like(yy)], axis=-1)  # x -> -x: the map folds everywhere
    why = reg.check_step(prev, fold.astype(np.float32), PropagateConfig(reg_max_shift=0))[1]
    assert why["reason"] == "diverged" and "folding on 100%" in why["detail"]
    shrink = np.stack([1.5 * (xx - 20), 1.5 * (yy - 20)], axis=-1).astype(np.float32)  # samples 2.5x further out
    why = reg.check_step(prev, shrink, PropagateConfig(reg_max_shift=0))[1]
    assert why["reason"] == "area"
    assert reg.check_step(prev, shrink, PropagateConfig(reg_max_shift=0, reg_max_area_change=0))[1] is None
    out = np.stack([np.full_like(xx, 30.0), np.zeros_like(yy)], axis=-1)
    assert reg.check_step(prev, out, PropagateConfig(reg_max_shift=0))[1]["reason"] == "empty"


def test_a_diverging_registration_is_a_reported_fallback(monkeypatch):
    image, truth = moving_ellipse()
    ann = annotation_from_slice(truth[7], 7, truth.shape, 0)

    def broken(reference, moving):
        raise cv2.error("synthetic OpenCV failure")

    monkeypatch.setattr(reg, "slice_flow", broken)
    labels, info = propagate_volume(image, ann, PropagateConfig(backend="register"))
    assert np.array_equal(labels, np.where(np.arange(15)[:, None, None] == 7, truth, 0))  # the key slice only
    for d in ("forward", "backward"):
        assert info["stops"][1][d]["reason"] == "diverged" and "OpenCV" in info["stops"][1][d]["detail"]
    # hybrid: the registration failed everywhere -> every slice falls back to the plain chain's prompt
    seg_h, seg_p = TruthSegmenter(image, truth), TruthSegmenter(image, truth)
    hyb, info_h = box_chain(image, ann, seg_h, PropagateConfig(backend="hybrid"))
    plain, _ = box_chain(image, ann, seg_p, PropagateConfig())
    assert np.array_equal(hyb, plain) and info_h["register_fallbacks"][1] == [8, 9, 10, 11, 12, 13, 6, 5, 4, 3, 2, 1]
    assert np.allclose(seg_h.boxes, seg_p.boxes)


# ------------------------------------------------------------------ hybrid chain
class TruthSegmenter:
    """Test double: knows slice z by its bytes; predicts ``truth[z]`` inside the box (no growth), IoU 0.9; on
    the slices in ``wrong`` it answers a blob in the image corner instead. Records boxes and mask prompts."""

    name = "truth"

    def __init__(self, slices, truth, wrong=()):
        self.lookup = {np.ascontiguousarray(s).tobytes(): z for z, s in enumerate(slices)}
        self.truth, self.wrong = truth, set(wrong)
        self.boxes, self.masks, self.zs = [], [], []

    def set_image(self, image):
        self.z = self.lookup[np.ascontiguousarray(image).tobytes()]

    def predict(self, boxes=None, masks=None):
        self.zs.append(self.z)
        self.boxes.append(np.asarray(boxes).copy())
        self.masks.append(None if masks is None else np.asarray(masks).copy())
        t = self.truth[self.z] > 0
        out = np.zeros((len(boxes),) + t.shape, bool)
        for i, (x0, y0, x1, y1) in enumerate(np.asarray(boxes).round().astype(int)):
            if self.z in self.wrong:
                out[i, :5, :5] = True
            else:
                out[i, y0:y1 + 1, x0:x1 + 1] = t[y0:y1 + 1, x0:x1 + 1]
        return out, np.full(len(boxes), 0.9)


def test_hybrid_prompts_with_the_registered_mask():
    image, truth = moving_ellipse(step=(2.0, 1.0))
    ann = annotation_from_slice(truth[7], 7, truth.shape, 0)
    seg_h, seg_p = TruthSegmenter(image, truth), TruthSegmenter(image, truth)
    hyb, info = box_chain(image, ann, seg_h, PropagateConfig(backend="hybrid", margin=0))
    plain, _ = box_chain(image, ann, seg_p, PropagateConfig(margin=0))
    true_box = mask_to_box(truth[8] > 0)
    assert seg_h.zs[0] == seg_p.zs[0] == 8
    assert np.abs(seg_h.boxes[0][0] - true_box).max() <= 1.5  # the registered mask's box sits on slice 8's object
    assert np.abs(seg_p.boxes[0][0] - true_box).max() >= 2  # the previous mask's box lags behind
    assert _dice3d(hyb > 0, truth > 0) > _dice3d(plain > 0, truth > 0) + 0.1
    assert info["registered_slices"] == {1: []} and info["register_fallbacks"][1] == [13, 1]  # structure ends


@pytest.mark.parametrize("on_disagree", ["register", "stop"])
def test_hybrid_disagreement(on_disagree):
    image, truth = moving_ellipse()
    ann = annotation_from_slice(truth[7], 7, truth.shape, 0)
    cfg = PropagateConfig(backend="hybrid", on_disagree=on_disagree, hybrid_min_dice=0.6)
    labels, info = box_chain(image, ann, TruthSegmenter(image, truth, wrong={9}), cfg)
    assert not labels[9, :5, :5].any()  # SAM's wrong answer is never kept
    if on_disagree == "register":
        assert info["registered_slices"][1] == [9] and dice2d(labels[9] > 0, truth[9] > 0) > 0.85
        assert labels[10:13].any(axis=(1, 2)).all()  # and the chain goes on from the registered mask
    else:
        stop = info["stops"][1]["forward"]
        assert stop["reason"] == "sam" and stop["slice"] == 9 and "disagree" in stop["detail"]
        assert not labels[9:].any() and labels[8].any()


def test_dense_prompt_passes_the_guiding_mask():
    image, truth = moving_ellipse()
    ann = annotation_from_slice(truth[7], 7, truth.shape, 0)
    seg = TruthSegmenter(image, truth)
    box_chain(image, ann, seg, PropagateConfig(dense_prompt=True))
    assert seg.masks[0].shape == (1,) + truth.shape[1:] and np.array_equal(seg.masks[0][0], truth[7] > 0)
    seg = TruthSegmenter(image, truth)
    box_chain(image, ann, seg, PropagateConfig(backend="hybrid", dense_prompt=True))
    warped = reg.check_step(truth[7] > 0, reg.FlowCache(image)(7, 8), PropagateConfig())[0]
    assert np.array_equal(seg.masks[0][0], warped) and not np.array_equal(warped, truth[7] > 0)
    seg = TruthSegmenter(image, truth)
    box_chain(image, ann, seg, PropagateConfig())
    assert all(m is None for m in seg.masks)
    with pytest.raises(ConfigError, match="dense_prompt"):
        PropagateConfig(backend="register", dense_prompt=True).validate()


def test_litemedsam_mask_prompt_and_embedding_cache():
    """The dense-prompt path of medssl's LiteMedSAM (random weights: plumbing, not quality)."""
    import torch

    from medssl.sam.litemedsam import build_litemedsam
    from medssl.sam.mask_prompt import CachedSegmenter, MaskPromptSegmenter, masks_to_model, with_mask_prompts
    from medssl.sam.predictor import LiteMedSAMSegmenter

    torch.manual_seed(0)
    base = LiteMedSAMSegmenter(model=build_litemedsam(), fuse_bn=False)
    cached = CachedSegmenter(base)
    seg = with_mask_prompts(cached)
    assert isinstance(seg, MaskPromptSegmenter)
    image, truth = moving_ellipse(z_n=8, shape=(40, 30))
    box = mask_to_box(truth[5] > 0)[None]
    seg.set_image(image[5])
    m0, q0 = seg.predict(boxes=box)
    m1, q1 = seg.predict(boxes=box, masks=(truth[5] > 0)[None])
    m2, q2 = seg.predict(boxes=box, masks=np.zeros((1, 40, 30), bool))
    assert m1.shape == (1, 40, 30) and m1.dtype == bool and q1.shape == (1,)
    assert not np.isclose(q1[0], q2[0])  # the mask prompt reaches the decoder
    seg.set_image(image[5].copy())
    assert cached.encoded == 1 and np.array_equal(seg.predict(boxes=box)[0], m0)
    with pytest.raises(ConfigError, match="mask prompts must have shape"):
        seg.predict(boxes=box, masks=np.zeros((1, 30, 40), bool))
    t = masks_to_model(np.ones((1, 40, 30), bool))
    assert t.shape == (1, 1, 256, 256) and t[0, 0, :256, :192].min() > 0 and t[0, 0, :, 193:].max() < 0


# ------------------------------------------------------------------ copy window chosen on validation volumes
def _cylinder_volume(half, z_n=21, key=10, shape=(12, 12)):
    truth = np.zeros((z_n,) + shape, np.uint8)
    truth[key - half:key + half + 1, 3:9, 3:9] = 1
    return annotation_from_slice(truth[key], key, truth.shape, 0), truth


def test_copy_window_is_chosen_on_validation_volumes():
    val = [_cylinder_volume(2), _cylinder_volume(2, key=8)]
    assert choose_copy_window(val) == 2
    assert choose_copy_window([_cylinder_volume(5)]) == 5  # it follows the validation data ...
    scores = copy_window_scores(val)
    assert set(scores) == set(range(9)) and scores[2] == 1.0 and scores[1] < 1.0 and scores[3] < 1.0
    # ... and only the validation data: nothing about the volumes it is applied to enters the choice
    test = [_cylinder_volume(6)]
    assert choose_copy_window(val) == 2 and best_k(copy_window_scores(test)) == 6
    # ties go to the smaller k: with 7 slices and the key in the middle, every k >= 3 covers everything
    ann, truth = _cylinder_volume(3, z_n=7, key=3)
    scores = copy_window_scores([(ann, truth)])
    assert scores[3] == scores[8] == 1.0 and choose_copy_window([(ann, truth)]) == 3
    assert best_k({0: 0.5, 1: 0.7, 2: 0.7}) == 1
    masks = window_masks(copy_masks(ann, 7), ann, 1)
    assert masks[1].any(axis=(1, 2)).tolist() == [False, False, True, True, True, False, False]
    assert window_scores([(ann, masks, truth)], [0, 1])[1] == pytest.approx(2 * 3 / (3 + 7))
    with pytest.raises(ConfigError):
        choose_copy_window([])


# ------------------------------------------------------------------ CLI
def test_cli_register_backend(tmp_path, capsys):
    image, truth = moving_ellipse()
    vol, lab = np.moveaxis(image, 0, 2) * 100, np.moveaxis(truth, 0, 2)  # slices along axis 2
    write_nifti(tmp_path / "img.nii.gz", vol.astype(np.float32))
    write_nifti(tmp_path / "lab.nii.gz", lab, dtype=np.uint8)
    out = tmp_path / "p.nii.gz"
    rc = main(["propagate", "--data", str(tmp_path / "img.nii.gz"), "--labels", str(tmp_path / "lab.nii.gz"),
               "--key", "7", "propagate.backend=register", "propagate.reg_max_steps=3",
               "propagate.reg_max_area_change=1.5", "data.modality=CT",
               "-o", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "class 1 stopped: forward max_steps at slice 11; backward max_steps at slice 3" in captured.out
    info = json.loads((tmp_path / "p.json").read_text())
    assert info["config"]["backend"] == "register" and info["config"]["reg_max_steps"] == 3
    assert info["config"]["reg_max_area_change"] == 1.5 and info["extent"] == {"1": [4, 10]}
    assert info["metrics"]["propagated"]["dice"]["1"] > info["metrics"]["copy"]["dice"]["1"]
    for extra, needle in ((["propagate.backend=hybrid", "propagate.on_disagree=pray"], "on_disagree"),
                          (["propagate.backend=register", "propagate.dense_prompt=true"], "dense_prompt"),
                          (["propagate.backend=register", "propagate.reg_max_fold=2"], "reg_max_fold"),
                          (["propagate.backend=register", "--key", "0"], "lab.nii.gz: the annotated slice 0 is empty")):
        rc = main(["propagate", "--data", str(tmp_path / "img.nii.gz"), "--labels", str(tmp_path / "lab.nii.gz"),
                   "-o", str(tmp_path / "q.nii.gz"), *extra])
        err = capsys.readouterr().err.strip()
        assert rc != 0 and len(err.splitlines()) == 1 and needle in err, (extra, err)
    assert not (tmp_path / "q.nii.gz").exists()
