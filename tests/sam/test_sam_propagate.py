"""``medssl propagate``: chain order and stopping rules (oracle double), key-slice rules, the baselines,
real LiteMedSAM on a cropped Hippocampus volume (geometry kept), and bad input through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import require_shared
from medssl.cli import main
from medssl.sam.propagate import (PropagateConfig, annotation_from_slice, annotation_from_volume, baselines,
                                  box_chain, combine, pick_key_slice, replay_chain)
from synth import LAS, write_nifti


class Oracle:
    """Test double: slice z of ``slices`` is constant z; predicts ``truth[z]`` (per class: the class whose truth
    overlaps the box most) inside the box grown by ``grow`` px, with IoU ``iou[z]``; records every call."""

    name = "oracle"

    def __init__(self, truth: np.ndarray, iou=None, grow: int = 2, empty_first: set | None = None):
        self.truth, self.grow = truth, grow
        self.iou = np.full(truth.shape[0], 0.9) if iou is None else np.asarray(iou, float)
        self.images, self.predicts, self.empty_first = [], 0, set(empty_first or ())

    def set_image(self, image):
        self.z = int(round(float(image.mean())))
        self.images.append(self.z)

    def predict(self, boxes=None, masks=None):
        self.predicts += 1
        t = self.truth[self.z]
        out = np.zeros((len(boxes),) + t.shape, bool)
        for i, (x0, y0, x1, y1) in enumerate(np.asarray(boxes).round().astype(int)):
            box = np.zeros(t.shape, bool)
            box[max(y0 - self.grow, 0):y1 + self.grow + 1, max(x0 - self.grow, 0):x1 + self.grow + 1] = True
            classes = [c for c in np.unique(t[box]) if c]
            if classes and self.z not in self.empty_first:
                c = max(classes, key=lambda k: ((t == k) & box).sum())
                out[i] = (t == c) & box
        self.empty_first.discard(self.z)
        return out, np.full(len(boxes), self.iou[self.z])


def _slices(z_n, shape=(20, 24)):
    return np.stack([np.full(shape, float(z), np.float32) for z in range(z_n)])


def _blob_truth(z_n=12, lo=3, hi=8, shape=(20, 24), cls=1, rows=(5, 12), cols=(6, 15)):
    truth = np.zeros((z_n,) + shape, np.uint8)
    truth[lo:hi + 1, rows[0]:rows[1], cols[0]:cols[1]] = cls
    return truth


def test_chain_order_stop_on_empty_and_key_written_once():
    truth = _blob_truth()
    seg = Oracle(truth)
    ann = annotation_from_slice(truth[5], 5, truth.shape, 0)
    labels, info = box_chain(_slices(12), ann, seg, PropagateConfig(iou_threshold=0.5))
    assert seg.images == [6, 7, 8, 9, 4, 3, 2]  # k+1 .. end (stops at the first empty), then k-1 .. 0
    assert 5 not in seg.images and np.array_equal(labels, truth)
    assert info["extent"] == {1: (3, 8)}


def test_stopping_rules():
    truth = _blob_truth()
    iou = np.full(12, 0.9)
    iou[7] = 0.3
    seg = Oracle(truth, iou=iou)
    labels, _ = box_chain(_slices(12), annotation_from_slice(truth[5], 5, truth.shape, 0), seg,
                          PropagateConfig(iou_threshold=0.5))
    assert seg.images == [6, 7, 4, 3, 2] and not labels[7:].any() and labels[6].any()  # IoU stop at slice 7
    # shrinking area: slice 3 has 1/8 of the area of slice 4
    truth2 = truth.copy()
    truth2[3] = 0
    truth2[3, 5:7, 6:8] = 1
    labels, _ = box_chain(_slices(12), annotation_from_slice(truth2[5], 5, truth2.shape, 0), Oracle(truth2),
                          PropagateConfig(iou_threshold=0.0, min_area_ratio=0.25))
    assert labels[4].any() and not labels[3].any()
    labels, _ = box_chain(_slices(12), annotation_from_slice(truth2[5], 5, truth2.shape, 0), Oracle(truth2),
                          PropagateConfig(iou_threshold=0.0))
    assert labels[3].sum() == 4
    # on_empty: "key_box" retries an empty slice once with the key slice's box
    seg = Oracle(truth, empty_first={7})
    labels, _ = box_chain(_slices(12), annotation_from_slice(truth[5], 5, truth.shape, 0), seg,
                          PropagateConfig(on_empty="key_box"))
    assert labels[7].any() and labels[8].any() and seg.images.count(7) == 1
    seg = Oracle(truth, empty_first={7})
    labels, _ = box_chain(_slices(12), annotation_from_slice(truth[5], 5, truth.shape, 0), seg, PropagateConfig())
    assert not labels[7:].any()


def test_replay_equals_a_direct_run():
    truth = _blob_truth(lo=1, hi=10)
    truth[2, 5:7, 6:8] = 1  # a collapsed slice
    iou = np.linspace(0.95, 0.4, 12)
    ann = annotation_from_slice(truth[5], 5, truth.shape, 0)
    record: dict = {}
    box_chain(_slices(12), ann, Oracle(truth, iou=iou), PropagateConfig(iou_threshold=0.0), record=record)
    for cfg in (PropagateConfig(iou_threshold=0.0), PropagateConfig(iou_threshold=0.6),
                PropagateConfig(iou_threshold=0.0, min_area_ratio=0.3)):
        direct, _ = box_chain(_slices(12), ann, Oracle(truth, iou=iou), cfg)
        assert np.array_equal(replay_chain(record, ann, 12, cfg), direct)


def test_two_classes_share_one_embedding_per_slice():
    truth = _blob_truth(lo=2, hi=9, cls=1, rows=(2, 8))
    truth[4:11, 11:18, 6:15] = 2
    seg = Oracle(truth)
    ann = annotation_from_volume(np.moveaxis(truth, 0, 2), "middle", 2)  # keys: class 1 -> 5, class 2 -> 7
    assert {c: k for c, (k, _) in ann.keys.items()} == {1: 5, 2: 7}
    labels, info = box_chain(_slices(12), ann, seg, PropagateConfig())
    assert np.array_equal(labels, truth)
    assert seg.images == [6, 7, 8, 9, 10, 11, 6, 5, 4, 3, 2, 1]  # forward from min key, backward from max key
    assert seg.predicts == len(seg.images)


def test_key_slice_rules_and_baselines():
    m = np.zeros((6, 6, 9), bool)
    m[2:4, 2:4, 1:8] = True
    m[:, :, 2] = True  # largest area at slice 2
    m[2:4, 2:4, 4] = False  # the middle of the extent (4) is empty: nearest non-empty
    assert pick_key_slice(m, "largest", 2) == 2
    assert pick_key_slice(m, "middle", 2) in (3, 5)
    ann = annotation_from_volume(m.astype(np.uint8), "largest", 2)
    b = baselines(ann, m.shape)
    assert b["copy"].shape == m.shape and all(np.array_equal(b["copy"][..., z], m[..., 2]) for z in range(9))
    assert np.array_equal(b["slice_only"][..., 2], m[..., 2]) and b["slice_only"].sum() == m[..., 2].sum()
    w = baselines(ann, m.shape, copy_window=1)["copy"]
    assert [bool(w[..., z].any()) for z in range(9)] == [False, True, True, True] + [False] * 5
    scores = {1: np.ones(9), 2: np.zeros(9)}
    both = combine({1: np.ones((9, 2, 2), bool), 2: np.ones((9, 2, 2), bool)}, scores)
    assert (both == 1).all()


# ------------------------------------------------------------------ real data, real LiteMedSAM
def _crop(tmp: Path, case="hippocampus_003", half=3):
    root = require_shared("Task04_Hippocampus")
    img = np.asarray(nib.load(str(root / "imagesTr" / f"{case}.nii.gz")).dataobj).astype(np.float32)
    lab = np.asarray(nib.load(str(root / "labelsTr" / f"{case}.nii.gz")).dataobj).astype(np.uint8)
    k = int(np.argmax((lab == 2).sum(axis=(0, 1))))
    sl = slice(max(k - half, 0), k + half + 1)
    image, label = img[::-1, :, sl], lab[::-1, :, sl]  # stored LAS: x flipped
    write_nifti(tmp / "img.nii.gz", image, LAS)
    write_nifti(tmp / "lab.nii.gz", label, LAS, dtype=np.uint8)
    return image, label


@pytest.mark.integration
def test_propagate_litemedsam_real_volume(tmp_path, capsys):
    """Through the CLI with the real LiteMedSAM: geometry kept, annotation kept, better than the slice alone."""
    from medssl.errors import DataError
    from medssl.sam.segmenter import build_segmenter

    image, label = _crop(tmp_path)
    try:
        build_segmenter("litemedsam")
    except DataError as exc:
        pytest.skip(f"LiteMedSAM weights unavailable: {exc}")
    out = tmp_path / "prop.nii.gz"
    rc = main(["propagate", "--data", str(tmp_path / "img.nii.gz"), "--labels", str(tmp_path / "lab.nii.gz"),
               "propagate.label=2", "-o", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "propagated: 3D Dice" in captured.out and "slice_only" in captured.out
    src, res = nib.load(str(tmp_path / "img.nii.gz")), nib.load(str(out))
    assert res.shape == src.shape and np.allclose(res.affine, src.affine)
    pred = np.asarray(res.dataobj)
    info = json.loads((tmp_path / "prop.json").read_text())
    k = info["key_slices"]["2"]
    assert np.array_equal(pred[..., k] == 2, label[..., k] == 2)  # the annotation is kept (stored z = canonical z)
    assert set(np.unique(pred)) <= {0, 2}
    m = info["metrics"]
    assert set(m) == {"propagated", "copy", "slice_only"}
    assert m["propagated"]["dice"]["2"] > m["slice_only"]["dice"]["2"]  # it did add correct voxels
    assert info["note"].startswith("LiteMedSAM box chain")


# ------------------------------------------------------------------ bad input through the CLI
def _run(argv, capsys):
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err.strip()


def test_cli_bad_inputs_write_nothing(tmp_path, capsys):
    shape = (12, 10, 6)
    image = np.random.default_rng(0).normal(100, 10, size=shape).astype(np.float32)
    lab = np.zeros(shape, np.uint8)
    lab[3:8, 2:7, 1:4] = 1
    write_nifti(tmp_path / "img.nii.gz", image)
    write_nifti(tmp_path / "lab.nii.gz", lab, dtype=np.uint8)
    np.save(tmp_path / "empty.npy", np.zeros((12, 10), np.uint8))
    np.save(tmp_path / "good.npy", lab[:, :, 2])
    np.save(tmp_path / "wrong.npy", np.ones((10, 12), np.uint8))
    out = tmp_path / "out" / "p.nii.gz"
    base = ["propagate", "--data", tmp_path / "img.nii.gz", "-o", out]
    cases = [
        (["--mask", tmp_path / "empty.npy", "--slice", 2], ("empty.npy", "empty")),
        (["--mask", tmp_path / "good.npy", "--slice", 6], ("out of range",)),
        (["--mask", tmp_path / "good.npy", "--slice", -1], ("out of range",)),
        (["--mask", tmp_path / "wrong.npy", "--slice", 2], ("wrong.npy", "(10, 12)", "(12, 10)")),
        (["--mask", tmp_path / "none.npy", "--slice", 2], ("none.npy", "not found")),
        (["--mask", tmp_path / "good.npy"], ("--slice",)),
        (["--labels", tmp_path / "lab.nii.gz", "--key", "5"], ("lab.nii.gz", "empty")),
        (["--labels", tmp_path / "lab.nii.gz", "--key", "9"], ("out of range",)),
        (["--labels", tmp_path / "lab.nii.gz", "propagate.label=3"], ("label 3",)),
        (["--labels", tmp_path / "lab.nii.gz", "propagate.on_empty=pray"], ("on_empty",)),
    ]
    for extra, needles in cases:
        rc, err = _run(base + extra, capsys)
        assert rc != 0 and len(err.splitlines()) == 1 and err.startswith("medssl: error:"), (extra, err)
        for n in needles:
            assert n in err, (extra, err)
    write_nifti(tmp_path / "lab_bad.nii.gz", lab[:, :, :5], dtype=np.uint8)
    rc, err = _run(base + ["--labels", tmp_path / "lab_bad.nii.gz"], capsys)
    assert rc != 0 and "lab_bad" in err and "shape" in err
    assert not (tmp_path / "out").exists()


class FakeVideoPredictor:
    """The SAM 2 video-predictor API replaying a known mask stack."""

    def __init__(self, truth: np.ndarray):
        self.truth, self.order, self.prompts = truth, [], []

    def init_state(self, video_path, **kw):
        frames = sorted(Path(video_path).glob("*.jpg"))
        assert len(frames) == self.truth.shape[0]
        return {"n": len(frames)}

    def add_new_mask(self, state, frame_idx, obj_id, mask):
        self.prompts.append((frame_idx, obj_id, mask.copy()))
        return frame_idx, [obj_id], mask[None, None].astype(np.float32)

    def propagate_in_video(self, state, start_frame_idx, max_frame_num_to_track=None, reverse=False):
        frames = range(start_frame_idx, -1, -1) if reverse else range(start_frame_idx, state["n"])
        k, _, key = self.prompts[-1]
        cls = self.truth[k][key].max()  # the object is the structure under the prompt mask
        for f in frames:
            self.order.append(f)
            yield f, [1], np.where(self.truth[f] == cls, 1.0, -1.0)[None, None]

    def reset_state(self, state):
        pass


def test_sam2_backend_with_a_fake_video_predictor():
    from medssl.sam.propagate import propagate_volume

    truth = _blob_truth(lo=2, hi=9)
    truth[3:7, 14:18, 16:22] = 2
    ann = annotation_from_volume(np.moveaxis(truth, 0, 2), "largest", 2)
    image = np.moveaxis(_slices(12), 0, 2)
    from medssl.sam.predictor import ras_to_display

    fake = FakeVideoPredictor(np.stack([ras_to_display(t) for t in truth]))  # SAM 2 sees display orientation
    labels, info = propagate_volume(image, ann, PropagateConfig(backend="sam2"), predictor=fake)
    assert np.array_equal(np.moveaxis(labels, 2, 0), truth)
    k1 = ann.keys[1][0]
    assert fake.order[:12 - k1 + k1 + 1] == list(range(k1, 12)) + list(range(k1, -1, -1))  # forward, then back
    assert [p[1] for p in fake.prompts] == [1, 1] and info["note"] == "SAM 2 video predictor"


def test_a_registered_segmenter_backend_is_a_propagation_backend(monkeypatch):
    """One registry (medssl.sam.segmenter): a backend registered there is built by name and propagates by the box
    chain; nothing else lists backends."""
    import medssl.sam.segmenter as segmenter
    from medssl.errors import ConfigError
    from medssl.sam.propagate import propagate_volume, propagation_backends

    monkeypatch.setattr(segmenter, "_BACKENDS", segmenter._BACKENDS.copy())
    truth, built = _blob_truth(), []

    @segmenter.register_sam_backend("oracle")
    def _oracle(checkpoint=None, device=None, **kw):
        built.append((checkpoint, device))
        return Oracle(truth)

    assert "oracle" in segmenter.sam_backends() and "oracle" in propagation_backends()
    assert isinstance(segmenter.build_segmenter("Oracle "), segmenter.Segmenter)
    ann = annotation_from_slice(truth[5], 5, truth.shape, 0)
    labels, info = propagate_volume(_slices(12), ann, PropagateConfig(backend="oracle", checkpoint="w.pt"))
    assert np.array_equal(labels, truth) and info["note"] == "oracle box chain" and built[-1] == ("w.pt", None)
    with pytest.raises(ValueError, match="already registered"):
        segmenter.register_sam_backend("oracle")(lambda **kw: None)
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="expected one of litemedsam, sam2, got 'oracle'"):
        segmenter.build_segmenter("oracle")
    with pytest.raises(ConfigError, match="'backend' must be one of"):
        PropagateConfig(backend="oracle").validate()
