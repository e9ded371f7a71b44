"""The one atomic writer (medssl.data.atomic) and the one input discovery (medssl.data.discover)."""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest

from medssl.data.atomic import atomic_dir, atomic_path, write_csv, write_json, write_text
from medssl.data.discover import find_volumes, read_item
from medssl.errors import DataError
from synth import blob_pair, write_nifti


def _siblings(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------------------- atomic
def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "metrics.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed while writing")
    assert json.loads(target.read_text()) == {"a": 1} and _siblings(target.parent) == ["metrics.json"]
    write_text(target, "[2]")
    assert json.loads(target.read_text()) == [2] and _siblings(target.parent) == ["metrics.json"]


def test_temporary_keeps_the_suffixes_and_permissions_are_usual(tmp_path):
    target = tmp_path / "x.nii.gz"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".nii.gz") and tmp != target
        tmp.write_bytes(b"data")
    umask = os.umask(0)
    os.umask(umask)
    assert target.read_bytes() == b"data" and (target.stat().st_mode & 0o777) == (0o666 & ~umask)


def test_write_json_numpy_and_non_finite(tmp_path):
    obj = {1: np.float32(0.5), "arr": np.arange(3), "nan": float("nan"), "t": (np.int64(2),)}
    write_json(tmp_path / "a.json", obj)
    back = json.loads((tmp_path / "a.json").read_text())
    assert back["1"] == 0.5 and back["arr"] == [0, 1, 2] and back["t"] == [2] and math.isnan(back["nan"])
    write_json(tmp_path / "b.json", obj, nan_as_null=True)
    assert json.loads((tmp_path / "b.json").read_text())["nan"] is None
    assert (tmp_path / "b.json").read_text().endswith("}\n")


def test_write_csv_columns(tmp_path):
    write_csv(tmp_path / "r.csv", [{"a": 1, "b": 2}, {"a": 3, "c": 4}])
    with open(tmp_path / "r.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows == [{"a": "1", "b": "2", "c": ""}, {"a": "3", "b": "", "c": "4"}]
    write_csv(tmp_path / "e.csv", [])
    assert (tmp_path / "e.csv").read_text() == ""
    write_csv(tmp_path / "f.csv", [], fieldnames=("x", "y"))
    assert (tmp_path / "f.csv").read_text().strip() == "x,y"


def test_atomic_dir_replaces_the_whole_folder_or_nothing(tmp_path):
    target = tmp_path / "cache"
    with atomic_dir(target) as tmp:
        (tmp / "one").write_text("1")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target) as tmp:
            (tmp / "two").write_text("2")
            raise KeyboardInterrupt
    assert _siblings(target) == ["one"] and _siblings(tmp_path) == ["cache"]
    with atomic_dir(target) as tmp:
        (tmp / "two").write_text("2")
    assert _siblings(target) == ["two"]


# ------------------------------------------------------------------------------------------- discover
def test_plain_nifti_folder_file_and_errors(tmp_path):
    image, label = blob_pair()
    folder = tmp_path / "pred"
    write_nifti(folder / "case_a_0000.nii.gz", image)
    write_nifti(folder / "case_b.nii", label)
    (folder / "notes.txt").write_text("not a volume")
    (folder / ".case_c.nii.gz").write_text("a hidden temporary")
    images = find_volumes(folder, "image")
    assert sorted(images) == ["case_a", "case_b"] and not images["case_a"].single
    assert sorted(find_volumes(folder, "label")) == ["case_a_0000", "case_b"]  # _0000 is an image channel
    np.testing.assert_array_equal(read_item(find_volumes(folder, "label")["case_b"], "label").array.shape,
                                  label.shape)
    single = find_volumes(folder / "case_b.nii", "label")
    assert list(single) == ["case_b"] and single["case_b"].single

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("")
    for source, needle in ((tmp_path / "nothere", "not found"), (folder / "notes.txt", "not a NIfTI"),
                           (tmp_path / "empty", "no dataset.json and no DICOM series or .h5 files")):
        with pytest.raises(DataError) as exc:
            find_volumes(source, "image")
        assert str(source) in str(exc.value) and needle in str(exc.value) and "\n" not in str(exc.value)


def test_dataset_folder_images_and_labels(phantom_root):
    images, labels = find_volumes(phantom_root, "image"), find_volumes(phantom_root, "label")
    assert sorted(labels) and set(labels) <= set(images)
    item = images[sorted(images)[0]]
    assert item.modality == "CT" and item.path.name.endswith(".nii.gz") and item.path.parent.name == "imagesTr"
    assert labels[item.case_id].path.parent.name == "labelsTr"
