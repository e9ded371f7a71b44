"""Tests for the procedural CT phantom dataset (medssl.data.phantom)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medssl.data.phantom import (
    DEFAULT_SHAPE,
    LABELS,
    generate_case,
    phantom_affine,
    write_phantom_dataset,
)
from medssl.errors import ConfigError, DataError

SMALL = (48, 48, 20)


@pytest.fixture(scope="module")
def cases() -> list[tuple[np.ndarray, np.ndarray]]:
    return [generate_case(i, shape=DEFAULT_SHAPE, seed=0) for i in range(8)]


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantom") / "ds"
    return write_phantom_dataset(root, n_cases=4, shape=SMALL, spacing=(1.5, 1.5, 3.0), seed=3, n_unlabelled=2)


def test_deterministic_same_seed_identical_bytes():
    a_img, a_lab = generate_case(5, seed=11, shape=SMALL)
    b_img, b_lab = generate_case(5, seed=11, shape=SMALL)
    assert a_img.tobytes() == b_img.tobytes()
    assert a_lab.tobytes() == b_lab.tobytes()


def test_different_seed_or_index_differs():
    img, lab = generate_case(0, seed=0, shape=SMALL)
    img2, lab2 = generate_case(0, seed=1, shape=SMALL)
    img3, _ = generate_case(1, seed=0, shape=SMALL)
    assert not np.array_equal(img, img2)
    assert not np.array_equal(lab, lab2)
    assert not np.array_equal(img, img3)


def test_dtypes_shapes_and_label_set(cases):
    for img, lab in cases:
        assert img.dtype == np.int16 and lab.dtype == np.uint8
        assert img.shape == DEFAULT_SHAPE and lab.shape == DEFAULT_SHAPE
        assert set(np.unique(lab).tolist()) <= {0, 1, 2, 3}


def test_every_label_present_in_most_volumes(cases):
    complete = sum(set(np.unique(lab).tolist()) == {0, 1, 2, 3} for _, lab in cases)
    assert complete >= 0.75 * len(cases)
    for k in (1, 2, 3):  # organs are of reasonable size (not a few stray voxels)
        sizes = [int((lab == k).sum()) for _, lab in cases]
        assert np.median(sizes) > 400, (k, sizes)


def test_intensities_plausible(cases):
    for img, lab in cases:
        corners = img[:4, :4, :].astype(np.float64)
        assert abs(corners.mean() + 1000) < 30
        organs = img[lab > 0]
        assert organs.min() >= -200 and organs.max() <= 400
        assert lab[img < -500].max() == 0  # no label on air or gas
        assert img.max() > 300  # the bone distractor is there (label 0)
    img = np.concatenate([c[0].ravel() for c in cases])
    lab = np.concatenate([c[1].ravel() for c in cases])
    means = {k: img[lab == k].mean() for k in (1, 2, 3)}
    assert means[2] > means[1] + 40 and means[2] > means[3] + 40  # kidneys are bright
    assert abs(means[1] - means[3]) < 25  # liver vs spleen is not an intensity-only task
    assert 40 <= means[1] <= 80


def test_organs_not_trivially_separable_and_in_anatomical_position(cases):
    for img, lab in cases:
        xs = {k: np.nonzero(lab == k)[0].mean() for k in (1, 3) if (lab == k).any()}
        if len(xs) == 2:  # RAS: liver on the patient's right (high x), spleen on the left
            assert xs[1] > xs[3] + 10
    # organs begin/end at different slices across cases
    first = [int(np.nonzero((lab == 2).any(axis=(0, 1)))[0].min()) for _, lab in cases if (lab == 2).any()]
    assert len(set(first)) > 1
    # within-body background overlaps organ intensities (noise + soft tissue): no single threshold works
    img, lab = cases[0]
    bg = img[(lab == 0) & (img > -50) & (img < 120)]
    assert bg.size > 1000


def test_spleen_is_large_enough_to_learn():
    sizes = [int((generate_case(i, seed=0)[1] == 3).sum()) for i in range(6)]
    assert min(sizes) > 300, sizes  # about 90 px per slice at 64 px: learnable by the demo

def test_dataset_json_is_msd_v1(written):
    meta = json.loads((written / "dataset.json").read_text())
    assert meta["modality"] == {"0": "CT"}
    assert meta["labels"] == {"0": "background", "1": "liver", "2": "kidney", "3": "spleen"}
    assert meta["numTraining"] == len(meta["training"]) == 4
    assert meta["numTest"] == len(meta["test"]) == 2
    assert meta["name"]
    for e in meta["training"]:
        assert e["image"].startswith("./imagesTr/phantom_") and e["label"].startswith("./labelsTr/phantom_")
        assert Path(e["image"]).name == Path(e["label"]).name
        assert (written / e["image"][2:]).is_file() and (written / e["label"][2:]).is_file()
    for t in meta["test"]:
        assert t.startswith("./imagesTs/") and (written / t[2:]).is_file()
    assert meta["phantom"]["shape"] == list(SMALL) and meta["phantom"]["seed"] == 3
    # no leftover temp files
    assert not [p for p in written.rglob(".*")]


def test_files_readable_with_spacing_and_ras(written):
    meta = json.loads((written / "dataset.json").read_text())
    e = meta["training"][1]
    img = nib.load(written / e["image"][2:])
    lab = nib.load(written / e["label"][2:])
    assert img.shape == SMALL and lab.shape == SMALL
    assert np.allclose(img.header.get_zooms(), (1.5, 1.5, 3.0))
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert np.allclose(img.affine, phantom_affine(SMALL, (1.5, 1.5, 3.0)))
    assert np.allclose(lab.affine, img.affine)
    assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
    ref_img, ref_lab = generate_case(1, shape=SMALL, seed=3)
    assert np.array_equal(np.asanyarray(img.dataobj), ref_img)
    assert np.array_equal(np.asanyarray(lab.dataobj), ref_lab)
    unl = nib.load(written / meta["test"][0][2:])
    assert np.array_equal(np.asanyarray(unl.dataobj), generate_case(4, shape=SMALL, seed=3)[0])


def test_rerun_on_complete_folder_does_not_rewrite(written):
    files = sorted(p for p in written.rglob("*") if p.is_file())
    before = {p: p.stat().st_mtime_ns for p in files}
    out = write_phantom_dataset(written, n_cases=4, shape=SMALL, spacing=(1.5, 1.5, 3.0), seed=3, n_unlabelled=2)
    assert out == written
    assert {p: p.stat().st_mtime_ns for p in files} == before


def test_changed_params_or_missing_file_regenerates(tmp_path):
    root = write_phantom_dataset(tmp_path / "p", n_cases=3, shape=(24, 24, 16), n_unlabelled=1)
    (root / "labelsTr" / "phantom_001.nii.gz").unlink()  # incomplete folder -> redone
    write_phantom_dataset(root, n_cases=3, shape=(24, 24, 16), n_unlabelled=1)
    assert (root / "labelsTr" / "phantom_001.nii.gz").is_file()
    write_phantom_dataset(root, n_cases=2, shape=(24, 24, 16))  # fewer cases: stale files go
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["numTraining"] == 2 and meta["test"] == []
    assert sorted(p.name for p in (root / "imagesTr").iterdir()) == ["phantom_000.nii.gz", "phantom_001.nii.gz"]
    assert not list((root / "imagesTs").glob("*.nii.gz"))


def test_readable_by_project_layout_reader(written):
    layouts = pytest.importorskip("medssl.data.layouts")
    info = layouts.open_dataset(written)
    assert info.layout == "msd" and info.modality == "CT"
    assert info.labels == LABELS
    assert len(info.labelled) == 4 and len(info.cases) == 6


def test_refuses_foreign_folder_and_bad_params(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "other", "modality": {"0": "MRI"}}))
    with pytest.raises(DataError, match="dataset.json"):
        write_phantom_dataset(tmp_path, n_cases=1, shape=SMALL)
    with pytest.raises(ConfigError, match="n_cases"):
        write_phantom_dataset(tmp_path / "x", n_cases=0)
    with pytest.raises(ConfigError, match="shape"):
        write_phantom_dataset(tmp_path / "x", shape=(64, 64))


def test_preview_png(cases, tmp_path):
    """Writes phantom_preview.png: mid slice of 3 cases with label contours."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    for ax, (img, lab) in zip(axes, cases[:3]):
        z = img.shape[2] // 2
        ax.imshow(img[::-1, ::-1, z].T, cmap="gray", vmin=-160, vmax=240)  # radiological view
        for k, colour in ((1, "red"), (2, "yellow"), (3, "cyan")):
            m = lab[::-1, ::-1, z].T == k
            if m.any():
                ax.contour(m, levels=[0.5], colors=colour, linewidths=0.8)
        ax.axis("off")
    fig.tight_layout()
    out = tmp_path / "phantom_preview.png"
    fig.savefig(out, dpi=80)
    plt.close(fig)
    assert out.stat().st_size > 5000
