"""The built-in phantom CT dataset used by `medssl demo`."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from medssl.data.layouts import open_dataset
from medssl.data.phantom import generate_case, write_phantom_dataset
from medssl.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("ph") / "ds", n_cases=4, n_unlabelled=2, seed=5)


def test_deterministic_and_seed_dependent():
    a_img, a_lab = generate_case(1, seed=0)
    b_img, b_lab = generate_case(1, seed=0)
    assert a_img.tobytes() == b_img.tobytes() and a_lab.tobytes() == b_lab.tobytes()
    c_img, _ = generate_case(1, seed=1)
    d_img, _ = generate_case(2, seed=0)
    assert not np.array_equal(a_img, c_img) and not np.array_equal(a_img, d_img)


def test_contents_are_plausible_ct():
    present = np.zeros(4, int)
    for i in range(6):
        img, lab = generate_case(i, seed=0)
        assert img.dtype == np.int16 and lab.dtype == np.uint8 and img.shape == lab.shape == (64, 64, 32)
        assert set(np.unique(lab)) <= {0, 1, 2, 3}
        assert np.median(img[0, 0, :]) < -900  # air in the corner
        for c in (1, 2, 3):
            if (lab == c).any():
                present[c] += 1
                assert -200 < np.median(img[lab == c]) < 400, c
        # organs are separable by neither intensity alone nor position alone: liver and spleen both soft tissue
        if (lab == 1).any() and (lab == 3).any():
            assert abs(np.median(img[lab == 1]) - np.median(img[lab == 3])) < 60
    assert (present[1:] >= 5).all(), present
    spleen = [int((generate_case(i, seed=0)[1] == 3).sum()) for i in range(6)]
    assert min(spleen) > 300  # large enough to be learnable at 64 px


def test_msd_layout_spacing_and_reuse(phantom):
    meta = json.loads((phantom / "dataset.json").read_text())
    assert meta["modality"] == {"0": "CT"} and meta["labels"]["3"] == "spleen"
    assert len(meta["training"]) == 4 and len(meta["test"]) == 2
    info = open_dataset(phantom)
    assert info.layout == "msd" and info.modality == "CT"
    assert len(info.labelled) == 4 and len(info.cases) == 6
    img = nib.load(phantom / meta["training"][0]["image"])
    np.testing.assert_allclose(img.header.get_zooms(), (1.5, 1.5, 3.0))
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    mtimes = {p: p.stat().st_mtime_ns for p in phantom.rglob("*.nii.gz")}
    write_phantom_dataset(phantom, n_cases=4, n_unlabelled=2, seed=5)
    assert {p: p.stat().st_mtime_ns for p in phantom.rglob("*.nii.gz")} == mtimes
    assert not list(phantom.rglob(".*"))  # no temporary files left


def test_bad_arguments_and_foreign_folder(tmp_path):
    with pytest.raises(ConfigError, match="shape"):
        write_phantom_dataset(tmp_path / "a", shape=(8, 64, 64))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "dataset.json").write_text(json.dumps({"name": "mine", "modality": {"0": "MRI"}}))
    with pytest.raises(DataError, match="another dataset"):
        write_phantom_dataset(tmp_path / "b")
