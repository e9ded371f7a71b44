"""The slice cache built by ``medssl prepare``: layout, reuse, invalidation, index, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import medssl.data.cache as cache_mod
from medssl.config import DataConfig
from medssl.data.cache import load_cache, prepare
from medssl.data.layouts import open_dataset
from medssl.data.readers import read_case
from medssl.errors import DataError

from conftest import PHANTOM_CASES, PHANTOM_SHAPE

FILES = ("meta.json", "index.csv", "images.f32", "labels.u8")


def _cfg(root: Path, cache_dir: Path, **kw) -> DataConfig:
    return DataConfig(path=str(root), cache_dir=str(cache_dir), **{"size": 32, **kw})


def _caches(cache_dir: Path) -> list[Path]:
    return sorted(p for p in cache_dir.iterdir()) if cache_dir.is_dir() else []


def test_prepare_layout_and_reuse(phantom_root, tmp_path):
    cfg = _cfg(phantom_root, tmp_path / "c")
    cache = prepare(cfg, progress=False)
    for name in FILES:
        assert (cache.root / name).is_file(), name
    n = PHANTOM_CASES * PHANTOM_SHAPE[2]  # axial slices of every case
    assert cache.images.shape == (n, 32, 32) and cache.images.dtype == np.float32
    assert cache.labels.shape == (n, 32, 32) and cache.labels.dtype == np.uint8
    assert (cache.root / "images.f32").stat().st_size == n * 32 * 32 * 4
    assert (cache.root / "labels.u8").stat().st_size == n * 32 * 32
    assert cache.n_classes == 4 and cache.labelled.all()
    assert np.isfinite(cache.images).all() and set(np.unique(cache.labels)) <= {0, 1, 2, 3}
    meta = json.loads((cache.root / "meta.json").read_text())
    assert meta["n_slices"] == n and meta["settings"]["size"] == 32 and meta["settings"]["modality"] == "CT"
    assert cache.root.name.endswith(meta["key"])

    mtimes = {f: (cache.root / f).stat().st_mtime_ns for f in FILES}
    again = prepare(cfg, progress=False)
    assert again.root == cache.root
    assert {f: (again.root / f).stat().st_mtime_ns for f in FILES} == mtimes  # nothing rewritten
    assert _caches(tmp_path / "c") == [cache.root]
    np.testing.assert_array_equal(np.asarray(again.labels), np.asarray(cache.labels))


@pytest.mark.parametrize("change", [{"size": 48}, {"axis": 0}, {"ct_window": [-100.0, 200.0]}, {"fit": "resize"}])
def test_changed_setting_gives_another_cache(phantom_root, tmp_path, change):
    base = prepare(_cfg(phantom_root, tmp_path / "c"), progress=False)
    other = prepare(_cfg(phantom_root, tmp_path / "c", **change), progress=False)
    assert other.root != base.root and other.root.parent == base.root.parent
    assert len(_caches(tmp_path / "c")) == 2
    assert other.meta["settings"][next(iter(change))] == next(iter(change.values()))
    if "size" in change:
        assert other.images.shape[1:] == (48, 48)
    if "axis" in change:
        assert other.images.shape[0] == PHANTOM_CASES * PHANTOM_SHAPE[0]
    if "ct_window" in change:  # same geometry, different intensities
        assert other.images.shape == base.images.shape
        assert not np.allclose(np.asarray(other.images), np.asarray(base.images))


def test_modified_input_file_forces_rebuild(phantom_copy, tmp_path):
    cfg = _cfg(phantom_copy, tmp_path / "c")
    first = prepare(cfg, progress=False)
    lab_path = phantom_copy / "labelsTr" / "phantom_002.nii.gz"
    img = nib.load(str(lab_path))
    lab = np.asarray(img.dataobj).copy()
    lab[lab == 1] = 0  # remove the liver from this case
    assert (lab != np.asarray(img.dataobj)).any()
    nib.save(nib.Nifti1Image(lab, img.affine, img.header), str(lab_path))

    second = prepare(cfg, progress=False)
    assert second.root != first.root, "a changed input file must not reuse the old cache"
    assert second.meta["key"] != first.meta["key"]
    a, b = second.meta["cases"]["phantom_002"]
    assert not (np.asarray(second.labels[a:b]) == 1).any()
    assert (np.asarray(first.labels[a:b]) == 1).any()
    # the other cases are unchanged
    a0, b0 = second.meta["cases"]["phantom_000"]
    np.testing.assert_array_equal(np.asarray(second.labels[a0:b0]), np.asarray(first.labels[a0:b0]))


def test_index_rows_match_labels(phantom_root, tmp_path):
    cfg = _cfg(phantom_root, tmp_path / "c")
    cache = prepare(cfg, progress=False)
    info = open_dataset(phantom_root)
    z = PHANTOM_SHAPE[2]
    expected_ids = [c.case_id for c in info.cases for _ in range(z)]
    assert list(cache.case_ids) == expected_ids
    np.testing.assert_array_equal(cache.slice_idx, np.tile(np.arange(z), PHANTOM_CASES))
    np.testing.assert_array_equal(cache.n_slices, np.full(PHANTOM_CASES * z, z))
    np.testing.assert_allclose(cache.rel_pos, np.tile((np.arange(z) + 1) / z, PHANTOM_CASES), atol=1e-6)
    assert cache.present.shape == (PHANTOM_CASES * z, 4)
    for row in range(len(cache.case_ids)):
        values = set(np.unique(cache.labels[row]).tolist())
        assert [c in values for c in range(4)] == cache.present[row].tolist(), row
    assert cache.present[:, 1:].any() and not cache.present[:, 1:].all()  # some slices without foreground
    # rows() returns the slices of the requested cases, in order; and the labels equal the volumes
    ids = [info.cases[3].case_id, info.cases[0].case_id]
    rows = cache.rows(ids)
    assert list(cache.case_ids[rows]) == [ids[0]] * z + [ids[1]] * z
    _, label = read_case(info.cases[3], info)
    vol_imgs, vol_labs = cache.case_volume(ids[0])
    assert vol_labs.shape == (z, 32, 32)  # 32x32 in-plane already: pad mode copies it unchanged
    np.testing.assert_array_equal(np.moveaxis(label.array, 2, 0), np.asarray(vol_labs))
    with pytest.raises(DataError, match="not_a_case"):
        cache.rows(["not_a_case"])


def test_load_cache_reads_no_volume(phantom_root, tmp_path, monkeypatch):
    built = prepare(_cfg(phantom_root, tmp_path / "c"), progress=False)

    def boom(*a, **k):
        raise AssertionError("load_cache must not read volumes")

    monkeypatch.setattr(cache_mod, "read_case", boom)
    loaded = load_cache(built.root)
    assert loaded.images.shape == built.images.shape
    np.testing.assert_array_equal(np.asarray(loaded.images[5]), np.asarray(built.images[5]))
    again = prepare(_cfg(phantom_root, tmp_path / "c"), progress=False)  # reuse: no volume read either
    assert again.root == built.root
    with pytest.raises(DataError, match="meta.json"):
        load_cache(tmp_path / "nowhere")


def test_interrupted_prepare_leaves_nothing_valid(phantom_root, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = cache_mod.read_case

    def flaky(case, info):
        calls["n"] += 1
        if calls["n"] == 3:
            raise DataError(f"{case.images[0]}: simulated failure")
        return real(case, info)

    monkeypatch.setattr(cache_mod, "read_case", flaky)
    cache_dir = tmp_path / "c"
    with pytest.raises(DataError, match="simulated failure"):
        prepare(_cfg(phantom_root, cache_dir), progress=False)
    assert calls["n"] == 3
    assert not list(cache_dir.rglob("meta.json"))
    assert _caches(cache_dir) == []  # no stray temporary folders either
    # a KeyboardInterrupt (not an Exception) is cleaned up as well
    calls["n"] = 0

    def interrupt(case, info):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(case, info)

    monkeypatch.setattr(cache_mod, "read_case", interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare(_cfg(phantom_root, cache_dir), progress=False)
    assert _caches(cache_dir) == []
    monkeypatch.setattr(cache_mod, "read_case", real)
    ok = prepare(_cfg(phantom_root, cache_dir), progress=False)
    assert _caches(cache_dir) == [ok.root] and (ok.root / "meta.json").is_file()


def test_folder_without_meta_is_rebuilt(phantom_root, tmp_path):
    cfg = _cfg(phantom_root, tmp_path / "c")
    cache = prepare(cfg, progress=False)
    (cache.root / "meta.json").unlink()  # e.g. deleted by hand
    rebuilt = prepare(cfg, progress=False)
    assert rebuilt.root == cache.root and (rebuilt.root / "meta.json").is_file()


def test_real_hippocampus_ten_cases(hippocampus_root, tmp_path):
    info = open_dataset(hippocampus_root)
    info.cases = info.cases[:10]
    cfg = DataConfig(path=str(hippocampus_root), size=64, cache_dir=str(tmp_path / "c"))
    cache = prepare(cfg, info, progress=False)
    assert cache.images.shape[1:] == (64, 64) and cache.labels.shape == cache.images.shape
    assert len(cache.meta["cases"]) == 10
    assert set(np.unique(np.asarray(cache.labels)).tolist()) <= {0, 1, 2}
    assert cache.present[:, 1].any() and cache.present[:, 2].any()
    assert cache.meta["settings"]["modality"] == "MRI"
    assert np.isfinite(np.asarray(cache.images)).all()
    z = cache.n_slices[0]
    assert z == cache.meta["volumes"][cache.case_ids[0]]["shape"][2]


def test_read_api(phantom_root, tmp_path):
    cache = prepare(_cfg(phantom_root, tmp_path / "c"), progress=False)
    rows = [17, 3, 40, 3, 0]  # any order, repeats allowed
    got = cache.read_images(rows)
    assert got.dtype == np.float32 and got.shape == (5, 32, 32) and type(got) is np.ndarray
    for i, r in enumerate(rows):
        np.testing.assert_array_equal(got[i], np.asarray(cache.images[r]))
    case = sorted(cache.meta["cases"])[2]
    a, b = cache.span(case)
    assert (a, b) == tuple(cache.meta["cases"][case]) and set(cache.case_ids[a:b]) == {case}
    np.testing.assert_array_equal(cache.rows([case]), np.arange(a, b))
    assert cache.volume(case)["content"] == cache.meta["volumes"][case]["content"]
    assert cache.labelled_cases == sorted(cache.meta["cases"]) and cache.unlabelled_cases == []
    assert cache.dataset_root == Path(phantom_root).resolve()
    with pytest.raises(DataError, match="'nope' is not in the prepared cache"):
        cache.span("nope")
