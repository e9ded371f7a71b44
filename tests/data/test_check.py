"""Bad inputs raise one-line DataErrors naming the file; run_check reports every problem."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medssl.data.check import Problem, run_check
from medssl.data.layouts import open_dataset
from medssl.data.readers import read_case, read_volume
from medssl.errors import DataError

try:
    import synth
except ImportError:  # tests/ is a package
    from tests import synth

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _one_line(exc: pytest.ExceptionInfo, name: str) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    assert name in msg, msg
    return msg


@pytest.fixture
def msd(tmp_path):
    return synth.make_msd(tmp_path / "Task", n_cases=2)


def test_truncated_gz(msd):
    path = synth.truncate_file(msd / "imagesTr" / "case_000.nii.gz", keep=0.6)
    with pytest.raises(DataError) as exc:
        read_volume(path)
    _one_line(exc, "case_000.nii.gz")


def test_corrupt_gz(tmp_path):
    path = synth.write_corrupt_gz(tmp_path / "junk.nii.gz")
    with pytest.raises(DataError) as exc:
        read_volume(path)
    _one_line(exc, "junk.nii.gz")


def test_missing_file(tmp_path):
    with pytest.raises(DataError) as exc:
        read_volume(tmp_path / "nothere.nii.gz")
    assert "not found" in _one_line(exc, "nothere.nii.gz")


def test_shape_mismatch(msd):
    _, label = synth.blob_pair(shape=(12, 10, 9))
    synth.write_nifti(msd / "labelsTr" / "case_001.nii.gz", label)
    info = open_dataset(msd)
    with pytest.raises(DataError) as exc:
        read_case(info.case("case_001"), info)
    msg = _one_line(exc, "labelsTr/case_001.nii.gz")
    assert "imagesTr/case_001.nii.gz" in msg and "(12, 10, 9)" in msg and "(12, 10, 8)" in msg


def test_affine_mismatch(msd):
    _, label = synth.blob_pair(seed=1)
    shifted = np.eye(4)
    shifted[0, 3] = 0.5
    synth.write_nifti(msd / "labelsTr" / "case_001.nii.gz", label, shifted)
    info = open_dataset(msd)
    with pytest.raises(DataError) as exc:
        read_case(info.case("case_001"), info)
    msg = _one_line(exc, "labelsTr/case_001.nii.gz")
    assert "affine" in msg and "imagesTr/case_001.nii.gz" in msg


def test_undeclared_label_value(msd):
    _, label = synth.blob_pair(seed=0)
    label[0, 0, 0] = 7
    synth.write_nifti(msd / "labelsTr" / "case_000.nii.gz", label)
    info = open_dataset(msd)
    with pytest.raises(DataError) as exc:
        read_case(info.case("case_000"), info)
    assert "[7]" in _one_line(exc, "case_000.nii.gz")


def test_non_integer_label(tmp_path):
    path = synth.write_nifti(tmp_path / "soft.nii.gz", np.full((4, 4, 4), 0.5, dtype=np.float32))
    assert read_volume(path).array.dtype == np.float32  # fine as an image
    with pytest.raises(DataError) as exc:
        read_volume(path, role="label")
    assert "non-integer" in _one_line(exc, "soft.nii.gz")


def test_nan_voxels(tmp_path):
    image, _ = synth.blob_pair()
    image[1, 2, 3] = np.nan
    image[2, 2, 2] = np.inf
    path = synth.write_nifti(tmp_path / "nan.nii.gz", image)
    with pytest.raises(DataError) as exc:
        read_volume(path)
    assert "contains 2 non-finite voxels" in _one_line(exc, "nan.nii.gz")


def test_2d_image(tmp_path):
    path = synth.write_nifti(tmp_path / "flat.nii.gz", np.zeros((8, 8), dtype=np.float32))
    with pytest.raises(DataError) as exc:
        read_volume(path)
    assert "expected a 3D volume, got shape (8, 8)" in _one_line(exc, "flat.nii.gz")


def test_4d_image(tmp_path):
    data = np.stack([np.zeros((5, 4, 3)), np.ones((5, 4, 3))], axis=-1).astype(np.float32)
    path = synth.write_nifti(tmp_path / "multi.nii.gz", data)
    assert read_volume(path).shape == (5, 4, 3) and read_volume(path).array.max() == 0  # channel 0
    assert read_volume(path, channel=1).array.min() == 1
    with pytest.raises(DataError) as exc:
        read_volume(path, channel=2)
    assert "channel 2 asked for (data.channel), but the image has 2" in _one_line(exc, "multi.nii.gz")
    with pytest.raises(DataError) as exc:  # a label map has no channels
        read_volume(path, role="label")
    assert "expected a 3D volume, got shape (5, 4, 3, 2)" in _one_line(exc, "multi.nii.gz")
    # a singleton 4th dimension is squeezed and round-trips to the stored 3D geometry
    single = synth.write_nifti(tmp_path / "single.nii.gz", np.ones((5, 4, 3, 1), dtype=np.float32), synth.LAS)
    vol = read_volume(single)
    assert vol.shape == (5, 4, 3) and vol.original_shape == (5, 4, 3)
    assert vol.to_original(vol.array).shape == (5, 4, 3)


def test_empty_dataset_and_missing_folder(tmp_path):
    root = tmp_path / "Empty"
    root.mkdir()
    (root / "dataset.json").write_text(json.dumps({"modality": {"0": "CT"}, "labels": {"0": "bg"}, "training": []}))
    with pytest.raises(DataError) as exc:
        open_dataset(root)
    assert "no cases found" in _one_line(exc, "Empty")
    with pytest.raises(DataError) as exc:
        open_dataset(tmp_path / "Nope")
    _one_line(exc, "Nope")
    (tmp_path / "junkdir").mkdir()
    (tmp_path / "junkdir" / "notes.txt").write_text("hello")
    with pytest.raises(DataError) as exc:
        open_dataset(tmp_path / "junkdir")
    _one_line(exc, "junkdir")


def test_invalid_json(tmp_path):
    root = tmp_path / "Bad"
    root.mkdir()
    (root / "dataset.json").write_text("{not json")
    with pytest.raises(DataError) as exc:
        open_dataset(root)
    assert "invalid JSON" in _one_line(exc, "dataset.json")


def test_missing_listed_file_via_read_case(msd):
    (msd / "imagesTr" / "case_001.nii.gz").unlink()
    info = open_dataset(msd)
    with pytest.raises(DataError) as exc:
        read_case(info.case("case_001"), info)
    _one_line(exc, "case_001.nii.gz")


def test_check_reports_every_broken_case(tmp_path):
    root = synth.make_msd(tmp_path / "Broken", n_cases=7, n_unlabelled=1)
    synth.truncate_file(root / "imagesTr" / "case_000.nii.gz")  # corrupt image
    (root / "labelsTr" / "case_001.nii.gz").unlink()  # missing label
    _, lab = synth.blob_pair(shape=(12, 10, 9))
    synth.write_nifti(root / "labelsTr" / "case_002.nii.gz", lab)  # shape mismatch
    _, lab = synth.blob_pair(seed=3)
    lab[0, 0, 0] = 9
    synth.write_nifti(root / "labelsTr" / "case_003.nii.gz", lab)  # undeclared value
    img, _ = synth.blob_pair(seed=4)
    img[0, 0, 0] = np.nan
    synth.write_nifti(root / "imagesTr" / "case_004.nii.gz", img)  # NaN
    synth.write_nifti(root / "imagesTr" / "case_005.nii.gz", np.zeros((12, 10), np.float32))  # 2D
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"].append(dict(meta["training"][6]))  # duplicate case id (case_006 is fine otherwise)
    (root / "dataset.json").write_text(json.dumps(meta))

    result = run_check(root)
    problems = result.problems
    text = "\n".join(str(p) for p in problems)
    assert all(isinstance(p, Problem) for p in problems)
    expected = {
        "case_000.nii.gz": "corrupt",
        "labelsTr/case_001.nii.gz": "not found",
        "labelsTr/case_002.nii.gz": "shape",
        "labelsTr/case_003.nii.gz": "[9]",
        "imagesTr/case_004.nii.gz": "non-finite",
        "imagesTr/case_005.nii.gz": "expected a 3D volume",
        "Broken": "duplicate case id 'case_006'",
    }
    for name, words in expected.items():
        assert any(p.path.endswith(name) and words in p.message for p in problems), (name, text)
    assert not any("extra_000" in str(p) for p in problems)  # unlabelled case is fine
    assert len(problems) == len(expected), text
    assert str(problems[0]) == f"{problems[0].path}: {problems[0].message}"
    assert not problems[0].message.startswith(problems[0].path)  # path not repeated
    assert result.n_cases == 9 and result.n_unlabelled == 1 and result.n_labelled == 8


def test_check_clean_and_empty(tmp_path):
    root = synth.make_msd(tmp_path / "Clean", n_cases=2, n_unlabelled=1)
    result = run_check(root)
    assert result.problems == [] and result.ok
    assert (result.n_cases, result.n_labelled, result.n_unlabelled, result.n_read) == (3, 2, 1, 3)
    empty = tmp_path / "E"
    empty.mkdir()
    (empty / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0}}))
    problems = run_check(empty).problems
    assert len(problems) == 1 and "no cases found" in problems[0].message


@pytest.mark.integration
def test_check_real_hippocampus_is_clean():
    root = DATA / "Task04_Hippocampus"
    if not root.exists():
        pytest.skip(f"{root} not found: ../shared/data is needed for this test")
    result = run_check(root)
    assert result.problems == [] and result.n_read == 260 and result.n_labelled == 260
