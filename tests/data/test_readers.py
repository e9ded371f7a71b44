"""Readers and layout detection: MSD, nnU-Net v2, DICOM, HDF5, single files, orientation round trips."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medssl.data.layouts import normalize_modality, open_dataset
from medssl.data.readers import dicom_affine, read_case, read_volume
from medssl.data.volume import save_like
from medssl.errors import ConfigError, DataError

try:
    import synth
except ImportError:  # tests/ is a package
    from tests import synth

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not found: ../shared/data is needed for this test")
    return path


# --- MSD -----------------------------------------------------------------------------------------

@pytest.mark.integration
def test_msd_hippocampus_real():
    info = open_dataset(_need(DATA / "Task04_Hippocampus"))
    assert info.layout == "msd"
    assert info.modality == "MRI"
    assert info.labels == {0: "background", 1: "Anterior", 2: "Posterior"}
    assert len(info.cases) == 260 and len(info.labelled) == 260
    ids = [c.case_id for c in info.cases]
    assert ids == sorted(ids) and len(set(ids)) == 260
    assert ids[0] == "hippocampus_001"
    image, label = read_case(info.case("hippocampus_001"), info)
    assert image.array.dtype == np.float32 and label.array.dtype == np.uint8
    assert image.shape == label.shape == (35, 51, 35)
    assert set(np.unique(label.array)) == {0, 1, 2}
    assert image.spacing == (1.0, 1.0, 1.0)
    assert image.array.max() > image.array.min()


def test_msd_synthetic_unlabelled_and_test_list(tmp_path):
    root = synth.make_msd(tmp_path / "Task99", n_cases=2, n_unlabelled=1, modality="CT")
    meta = json.loads((root / "dataset.json").read_text())
    image, _ = synth.blob_pair(seed=7)
    synth.write_nifti(root / "imagesTs" / "zz_test.nii.gz", image)
    meta["test"] = ["./imagesTs/zz_test.nii.gz"]
    (root / "dataset.json").write_text(json.dumps(meta))
    info = open_dataset(root)
    assert [c.case_id for c in info.cases] == ["case_000", "case_001", "extra_000", "zz_test"]
    assert [c.has_label for c in info.cases] == [True, True, False, False]
    assert info.modality == "CT" and info.name == "Synth"
    assert open_dataset(root, modality="t2w").modality == "MRI"


def test_msd_listed_missing_file_is_not_an_open_error(tmp_path):
    root = synth.make_msd(tmp_path / "T", n_cases=2)
    (root / "labelsTr" / "case_001.nii.gz").unlink()
    info = open_dataset(root)
    assert info.case("case_001").label == root / "labelsTr" / "case_001.nii.gz"


# --- nnU-Net v2 ----------------------------------------------------------------------------------

def test_nnunetv2_synthetic(tmp_path):
    root = synth.make_nnunetv2(tmp_path / "Dataset123_Synth", n_cases=3, n_test=1, unlabelled=("pat02",))
    info = open_dataset(root)
    assert info.layout == "nnunetv2" and info.modality == "CT"
    assert info.labels == {0: "background", 1: "organ1", 2: "organ2"}
    assert [c.case_id for c in info.cases] == ["pat00", "pat01", "pat02", "test00"]
    assert [c.has_label for c in info.cases] == [True, True, False, False]
    assert info.cases[0].images == (root / "imagesTr" / "pat00_0000.nii.gz",)
    image, label = read_case(info.cases[1], info)
    ref_image, ref_label = synth.blob_pair(seed=1)
    np.testing.assert_array_equal(label.array, ref_label)
    np.testing.assert_allclose(image.array, ref_image)


def test_nnunetv2_multichannel_grouped(tmp_path):
    root = synth.make_nnunetv2(tmp_path / "D", n_cases=1, n_test=0)
    image, _ = synth.blob_pair(seed=3)
    synth.write_nifti(root / "imagesTr" / "pat00_0001.nii.gz", image)
    meta = json.loads((root / "dataset.json").read_text())
    meta["channel_names"] = {"0": "T2", "1": "ADC"}
    (root / "dataset.json").write_text(json.dumps(meta))
    info = open_dataset(root)
    assert len(info.cases) == 1 and len(info.cases[0].images) == 2
    assert read_case(info.cases[0], info)[0].array.shape == image.shape  # channel 0 by default
    second = open_dataset(root, channel=1)
    np.testing.assert_allclose(read_case(second.cases[0], second)[0].array, image)


def test_nnunetv2_region_labels_rejected(tmp_path):
    root = synth.make_nnunetv2(tmp_path / "D", n_cases=1)
    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "whole": [1, 2], "core": 2}
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="not supported"):
        open_dataset(root)


def test_modality_normalisation():
    assert normalize_modality("non-contrast CT") == "CT"
    for name in ("MRI", "mr", "T1w", "T2", "FLAIR", "ADC"):
        assert normalize_modality(name) == "MRI", name
    assert normalize_modality("pet") == "PET"


# --- DICOM ---------------------------------------------------------------------------------------

@pytest.mark.integration
def test_dicom_series_real_with_label():
    ct = _need(DATA / "ct_example")
    info = open_dataset(ct / "dicom", label=ct / "example_seg_dicom.nii.gz")
    assert info.layout == "dicom" and info.modality == "CT" and len(info.cases) == 1
    image, label = read_case(info.cases[0], info)
    assert image.shape == (512, 512, 20)
    np.testing.assert_allclose(image.spacing, (0.9765625, 0.9765625, 2.0), atol=1e-4)
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
    # the label (LAS as stored) lands on the same canonical grid as the series
    assert label.shape == image.shape
    assert np.abs(label.affine - image.affine).max() < 1e-2
    assert nib.aff2axcodes(label.original_affine) == ("L", "A", "S")
    assert image.array.min() == -1024.0  # rescale slope/intercept applied: HU
    # the labelled organs are soft tissue, so the voxel correspondence is right (a flip would put
    # a large part of the mask in air)
    inside = image.array[label.array > 0]
    assert (inside > -300).mean() > 0.9
    assert (image.array[:, ::-1][label.array > 0] > -300).mean() < 0.85


def test_dicom_affine_conversion():
    aff = dicom_affine((-10.0, -20.0, 5.0), (0.5, 0.7, 2.0), np.eye(3).ravel())
    np.testing.assert_allclose(aff[:3, 3], (10.0, 20.0, 5.0))
    np.testing.assert_allclose(np.diag(aff)[:3], (-0.5, -0.7, 2.0))


# --- HDF5 ----------------------------------------------------------------------------------------

def test_h5_folder_synthetic(tmp_path):
    root = synth.make_h5(tmp_path / "acdc", n_cases=2, spacing=(1.5, 1.5, 10.0))
    info = open_dataset(root, modality="MRI")
    assert info.layout == "h5" and info.modality == "MRI"
    assert info.labels == {0: "background", 1: "RV", 2: "Myo", 3: "LV"}
    assert [c.case_id for c in info.cases] == ["patient000", "patient001"]
    image, label = read_case(info.cases[0], info)
    ref_image, ref_label = synth.blob_pair(n_labels=3, seed=0)
    np.testing.assert_array_equal(label.array, ref_label)
    assert image.array.dtype == np.float32 and image.shape == synth.SHAPE
    assert image.spacing == (1.5, 1.5, 10.0)


def test_h5_zyx_axes(tmp_path):
    root = synth.make_h5(tmp_path / "acdc", n_cases=1, axes="zyx")
    _, ref_label = synth.blob_pair(n_labels=3, seed=0)
    vol = read_volume(root / "patient000.h5", kind="h5", role="label")
    np.testing.assert_array_equal(vol.array, ref_label)
    # the explicit argument overrides the attribute
    raw = read_volume(root / "patient000.h5", kind="h5", role="label", axes="xyz")
    assert raw.shape == ref_label.shape[::-1]


def test_h5_without_label_names_is_an_error(tmp_path):
    root = synth.make_h5(tmp_path / "h", n_cases=1, label_names=None)
    with pytest.raises(DataError, match="label names"):
        open_dataset(root)
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "bg", "1": "a", "2": "b", "3": "c"}}))
    assert open_dataset(root).labels == {0: "bg", 1: "a", 2: "b", 3: "c"}


# --- single files and orientation ----------------------------------------------------------------

def test_single_nifti_file_case(tmp_path):
    image, label = synth.blob_pair()
    img = synth.write_nifti(tmp_path / "one.nii.gz", image)
    lab = synth.write_nifti(tmp_path / "one_seg.nii.gz", label)
    info = open_dataset(img, label=lab, modality="MRI")
    assert [c.case_id for c in info.cases] == ["one"]
    assert info.labels == {0: "background", 1: "class_1", 2: "class_2"}
    _, lab_vol = read_case(info.cases[0], info)
    np.testing.assert_array_equal(lab_vol.array, label)


@pytest.mark.parametrize("which", [pytest.param("mr_example", marks=pytest.mark.integration), "synthetic_las"])
def test_orientation_round_trip(tmp_path, which):
    if which == "mr_example":
        src = _need(DATA / "ct_example" / "example_mr_sm.nii.gz")
        expected_codes = ("L", "P", "S")
    else:
        image, _ = synth.blob_pair(shape=(7, 6, 5))
        src = synth.write_nifti(tmp_path / "las.nii.gz", np.round(image).astype(np.int16), synth.LAS)
        expected_codes = ("L", "A", "S")
    original = nib.load(str(src))
    assert nib.aff2axcodes(original.affine) == expected_codes
    vol = read_volume(src)
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
    assert vol.array.dtype == np.float32
    out = save_like(vol.array, vol, tmp_path / "round.nii.gz", dtype=np.int16)
    back = nib.load(str(out))
    assert back.shape == original.shape
    np.testing.assert_allclose(back.affine, original.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), np.asanyarray(original.dataobj))


@pytest.mark.integration
def test_lps_canonical_flip_is_real():
    src = _need(DATA / "ct_example" / "example_mr_sm.nii.gz")
    raw = np.asanyarray(nib.load(str(src)).dataobj)
    vol = read_volume(src)
    np.testing.assert_array_equal(vol.array, raw[::-1, ::-1, :].astype(np.float32))
