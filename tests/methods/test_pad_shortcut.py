"""Padding carries no identity: one pad value for every volume, and no frame cue in what PolyCL, the
contrastive views and the KAF keypoints see (issue: PolyCL-S was solvable from the pad value alone)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medssl.config import AugConfig, DataConfig, PretrainConfig, ViewAugConfig
from medssl.data.cache import PAD_VALUE, prepare
from medssl.data.views import ContrastiveViews
from medssl.methods import build_method
from medssl.models import build_model
from medssl.models.kaf.keypoints import FRAME_MARGIN, KeypointSettings, detect_keypoints
from synth import write_nifti


def _dataset(root, n=8):
    """MRI-like volumes of different in-plane sizes (27-48 px on a 64 px canvas) and intensity levels."""
    rng = np.random.default_rng(0)
    training = []
    for i in range(n):
        shape = (27 + 3 * i, 48 - 2 * i, 12)
        yy, xx = np.mgrid[: shape[0], : shape[1]]
        blob = ((yy - shape[0] / 2) ** 2 + (xx - shape[1] / 2) ** 2 < (min(shape[:2]) / 3) ** 2)
        image = rng.normal(200 + 40 * i, 30, shape).astype(np.float32) + 300 * blob[..., None]
        label = np.repeat(blob[..., None], shape[2], 2).astype(np.uint8)
        write_nifti(root / "imagesTr" / f"c{i}.nii.gz", image)
        write_nifti(root / "labelsTr" / f"c{i}.nii.gz", label)
        training.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"name": "Frames", "modality": {"0": "MRI"}, "labels": {
        "0": "background", "1": "blob"}, "training": training, "test": []}))
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = _dataset(tmp_path_factory.mktemp("frames"))
    return prepare(DataConfig(path=str(root), size=64, axis=2, cache_dir=str(root / "cache")), progress=False)


def _frame_features(x: torch.Tensor) -> np.ndarray:
    """What a shortcut would read: the corner value and the width of the constant border around it."""
    a = x[:, 0].numpy()
    corner = a[:, 0, 0]
    same = np.isclose(a, corner[:, None, None], atol=1e-6)
    border = np.array([int(np.argmin(np.r_[s.all(1), False])) for s in same])  # rows of pure corner value
    return np.stack([corner, border], 1)


def _shortcut_accuracy(feats: np.ndarray, b: int) -> float:
    """Share of triplets where the positive is nearer the anchor than the negative in the frame features."""
    a, p, n = feats[:b], feats[b:2 * b], feats[2 * b:]
    dp, dn = np.abs(a - p).sum(1), np.abs(a - n).sum(1)
    return float(np.mean(np.where(dp < dn, 1.0, np.where(dp == dn, 0.5, 0.0))))


def test_one_pad_value_and_content_boxes(cache):
    boxes = cache.content
    for row in (0, len(boxes) - 1):
        y0, y1, x0, x1 = boxes[row]
        img = np.asarray(cache.images[row])
        assert (img[:y0] == PAD_VALUE).all() and (img[y1:] == PAD_VALUE).all()
        assert (img[:, :x0] == PAD_VALUE).all() and (img[:, x1:] == PAD_VALUE).all()
        assert not (img[y0:y1, x0:x1] == PAD_VALUE).all()
    assert len({tuple(b) for b in boxes}) == 8  # one frame per volume: what used to identify the scan


def _polycl(cache):
    method = build_method("polycl-s", build_model("unet", in_channels=1, n_classes=2, features=4).encoder,
                          PretrainConfig(method="polycl-s", options={"polycl": {"slab_fraction": 1.0}}), AugConfig())
    rows = method.select_rows(cache, np.arange(len(cache.case_ids)))
    return method, np.sort(rows[:: max(1, len(rows) // 100)])


def test_polycl_s_triplets_cannot_be_told_apart_by_the_frame(cache):
    method, sel = _polycl(cache)
    x = torch.from_numpy(np.asarray(cache.images[sel]))[:, None]
    xs = method.triplets(x, sel.tolist(), torch.Generator().manual_seed(1))
    acc = _shortcut_accuracy(_frame_features(xs), len(sel))
    assert acc < 0.62, f"the frame still tells positives from negatives ({acc:.2f} of triplets)"
    assert not (xs == PAD_VALUE).all(-1).any(), "a window reached the padding"


def test_frame_decides_same_scan_on_raw_canvases_but_not_in_windows(cache):
    """The test above is not empty: on the padded canvases the frame alone finds the positive."""
    method, sel = _polycl(cache)
    pos, neg = method._draw(sel.tolist(), torch.Generator().manual_seed(2))
    canv = torch.cat([method._images(sel.tolist(), "cpu"), method._images(pos, "cpu"), method._images(neg, "cpu")])
    assert _shortcut_accuracy(_frame_features(canv), len(sel)) > 0.9


def test_contrastive_views_stay_inside_the_content(cache):
    rows = np.arange(0, len(cache.case_ids), 7)
    x = torch.from_numpy(np.asarray(cache.images[rows]))[:, None]
    boxes = torch.from_numpy(cache.content[rows])
    views = ContrastiveViews(ViewAugConfig(intensity_prob=0, gamma_prob=0, noise_prob=0, blur_prob=0))
    v = views(x, torch.Generator().manual_seed(0), boxes)
    assert not torch.isclose(v, torch.tensor(PAD_VALUE), atol=1e-6).all(-1).all(-1).any()  # no row of padding
    corner_is_pad = torch.isclose(v[:, 0, :2, :2], torch.tensor(PAD_VALUE), atol=1e-6).all(-1).all(-1)
    assert not corner_is_pad.any()
    old = views(x, torch.Generator().manual_seed(0))  # without boxes the whole canvas, padding included
    assert torch.isclose(old, torch.tensor(PAD_VALUE), atol=1e-6).any()


def test_no_keypoint_on_the_frame(cache):
    settings = KeypointSettings(upsample=2)
    on_frame = 0
    for row in range(0, len(cache.case_ids), 5):
        img = np.asarray(cache.images[row])
        y0, y1, x0, x1 = cache.content[row]
        xy, _ = detect_keypoints(img, settings)
        near = ((xy[:, 0] < x0 + FRAME_MARGIN) | (xy[:, 0] > x1 - 1 - FRAME_MARGIN)
                | (xy[:, 1] < y0 + FRAME_MARGIN) | (xy[:, 1] > y1 - 1 - FRAME_MARGIN))
        on_frame += int(near.sum())
    assert on_frame == 0
