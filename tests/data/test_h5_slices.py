"""SSL4MIS-style HDF5 folders: whole volumes ``<case>.h5`` and per-slice files ``<case>_slice_<K>.h5``."""

from __future__ import annotations

import numpy as np
import pytest

from medssl.data.check import run_check
from medssl.data.discover import find_volumes, read_item
from medssl.data.layouts import open_dataset
from medssl.data.readers import read_case, read_slices, read_volume
from medssl.errors import DataError
from synth import blob_pair, write_h5

LABELS = '["background", "RV", "Myo", "LV"]'
K, H, W = 12, 10, 9  # 12 slices: a string sort would put slice_10 before slice_2


def _volume(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(K, H, W) image and label, stored slices first as SSL4MIS does."""
    image, label = blob_pair((K, H, W), 3, seed=seed)
    return (image / image.max()).astype(np.float32), label


def _write_slices(folder, case: str, image, label, order=None) -> list:
    order = range(len(image)) if order is None else order
    return [write_h5(folder / f"{case}_slice_{k}.h5", image[k], None if label is None else label[k], labels=LABELS)
            for k in order]


def test_slices_restack_like_the_whole_volume(tmp_path):
    image, label = _volume()
    whole = write_h5(tmp_path / "data" / "patient001_frame01.h5", image, label, labels=LABELS, axes="zyx")
    order = np.random.default_rng(0).permutation(K).tolist()  # written in any order
    _write_slices(tmp_path / "slices", "patient001_frame01", image, label, order)

    info = open_dataset(tmp_path / "slices")
    assert info.layout == "h5" and [c.case_id for c in info.cases] == ["patient001_frame01"]
    case = info.cases[0]
    assert case.kind == "h5slices" and case.has_label and case.n_channels == 1
    assert [p.name for p in case.images] == [f"patient001_frame01_slice_{k}.h5" for k in range(K)]
    assert info.labels == {0: "background", 1: "RV", 2: "Myo", 3: "LV"}

    img, lab = read_case(case, info)
    ref_img = read_volume(whole, kind="h5", role="image")
    ref_lab = read_volume(whole, kind="h5", role="label")
    assert img.shape == (W, H, K) == ref_img.shape
    np.testing.assert_array_equal(img.array, ref_img.array)
    np.testing.assert_array_equal(lab.array, ref_lab.array)
    np.testing.assert_array_equal(img.affine, ref_img.affine)
    assert lab.array.dtype == np.uint8 and img.array.dtype == np.float32
    # slice K of the files is slice K along the canonical slice axis
    np.testing.assert_array_equal(img.array[:, :, 10], image[10].T)
    assert run_check(tmp_path / "slices").problems == []


def test_whole_volume_files_and_slice_groups_together(tmp_path):
    a_img, a_lab = _volume(1)
    b_img, b_lab = _volume(2)
    write_h5(tmp_path / "caseA.h5", a_img, a_lab, labels=LABELS, axes="zyx")
    _write_slices(tmp_path, "caseA", a_img, a_lab)  # the whole volume of caseA wins over its slices
    _write_slices(tmp_path, "caseB", b_img, None)  # slices without labels: an unlabelled case
    info = open_dataset(tmp_path)
    assert [(c.case_id, c.kind, c.has_label) for c in info.cases] == [("caseA", "h5", True),
                                                                       ("caseB", "h5slices", False)]
    images = find_volumes(tmp_path, "image")
    assert sorted(images) == ["caseA", "caseB"] and images["caseB"].kind == "h5slices"
    np.testing.assert_array_equal(read_item(images["caseB"], "image").array,
                                  np.ascontiguousarray(b_img.transpose(2, 1, 0)))
    assert sorted(find_volumes(tmp_path, "label")) == ["caseA"]


def test_slice_label_items_read_the_stacked_label(tmp_path):
    image, label = _volume()
    _write_slices(tmp_path, "p1", image, label)
    item = find_volumes(tmp_path, "label")["p1"]
    assert item.kind == "h5slices" and len(item.files) == K
    np.testing.assert_array_equal(read_item(item, "label").array, label.transpose(2, 1, 0))


def _one_line(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_inconsistent_slice_shape_names_the_file(tmp_path):
    image, label = _volume()
    files = _write_slices(tmp_path, "p1", image, label)
    write_h5(files[5], image[5][:, :-1], label[5][:, :-1], labels=LABELS)
    info = open_dataset(tmp_path)
    with pytest.raises(DataError) as exc:
        read_case(info.cases[0], info)
    msg = _one_line(exc)
    assert msg.startswith(str(files[5])) and "differs" in msg and "p1_slice_0.h5" in msg
    problems = run_check(tmp_path).problems
    assert len(problems) == 1 and "p1_slice_5.h5" in str(problems[0])


def test_missing_slice_and_3d_slice_are_errors(tmp_path):
    image, label = _volume()
    files = _write_slices(tmp_path, "p1", image, label)
    files[4].unlink()
    with pytest.raises(DataError) as exc:
        read_slices(files[:4] + files[5:])
    assert "slice 4 is missing" in _one_line(exc) and str(files[5]) in str(exc.value)

    write_h5(files[4], image[3:5], label[3:5], labels=LABELS)  # a 3D array where a slice belongs
    with pytest.raises(DataError) as exc:
        read_slices(files, role="label")
    assert _one_line(exc).startswith(f"{files[4]}: expected a 2D slice, got shape (2, {H}, {W})")

    with pytest.raises(DataError, match="not a per-slice file name"):
        read_slices([tmp_path / "p1.h5"])
