"""``medssl plan``: the fingerprint, each planned value and its reason, determinism, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from synth import blob_pair, make_h5, make_msd, write_nifti

from medssl.cli import main
from medssl.config import load_config
from medssl.data.fingerprint import extract_fingerprint, side_dependent_axes
from medssl.errors import DataError
from medssl.planning import plan, render, write_plan


def _planned(planned) -> dict:
    return {k: v for k, v, _ in planned.items}


def test_plan_is_deterministic_explained_and_loads(phantom_root, tmp_path):
    a, pa = write_plan(phantom_root, tmp_path / "a.yaml", progress=False)
    b, _ = write_plan(phantom_root, tmp_path / "b.yaml", progress=False)
    assert a.read_text() == b.read_text()
    assert (tmp_path / "a.yaml.fingerprint.json").is_file()
    for key, value, why in pa.items:  # every value has its reason, written next to it
        assert why.strip(), key
        leaf = key.split(".")[-1]
        assert any(line.strip().startswith(f"{leaf}:") and f"# {why}" in line for line in a.read_text().splitlines())
    cfg = load_config(str(a))
    got = _planned(pa)
    assert cfg.data.size == got["data.size"] and cfg.aug.flip_axes == got["aug.flip_axes"]
    # the phantom is lateralised (liver right, spleen left): no flips along either slice axis
    assert got["aug.flip_axes"] == [] and got["pretrain.views.flip_axes"] == []
    lo, hi = got["data.ct_window"]
    assert -200 <= lo < hi <= 400  # soft-tissue HU of the phantom's organs
    assert got["data.size"] % 16 == 0 and got["train.patch_size"] % 16 == 0


def test_hippocampus_plan(hippocampus_root):
    fp = extract_fingerprint(hippocampus_root, progress=False)
    got = _planned(plan(fp))
    assert got["data.axis"] == 2 and got["data.spacing"] == [] and got["data.size"] == 64
    assert got["aug.flip_axes"] == [0]  # anterior/posterior are told apart along slice axis 1
    assert got["data.mri_mode"] == "zscore" and got["model.features"] == 16
    assert got["train.epochs"] * got["train.steps_per_epoch"] >= 1000


def _write_case(root, cid, affine, image=None, label=None, seed=0, shape=(24, 20, 6)):
    img, lab = blob_pair(shape, 2, seed=seed)
    write_nifti(root / "imagesTr" / f"{cid}.nii.gz", img if image is None else image, affine)
    write_nifti(root / "labelsTr" / f"{cid}.nii.gz", lab if label is None else label, affine)
    return {"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"}


def _dataset(root, affines, modality="MRI", images=None):
    import json

    training = [_write_case(root, f"case_{i:03d}", aff, None if images is None else images[i], seed=i)
                for i, aff in enumerate(affines)]
    (root / "dataset.json").write_text(json.dumps({
        "name": "T", "modality": {"0": modality}, "labels": {"0": "background", "1": "a", "2": "b"},
        "training": training, "test": []}))
    return root


def test_anisotropic_data_is_sliced_along_its_coarse_axis(tmp_path):
    root = make_msd(tmp_path / "d", n_cases=3, affine=np.diag([5.0, 0.8, 0.8, 1.0]))
    got = _planned(plan(extract_fingerprint(root, progress=False)))
    assert got["data.axis"] == 0 and got["data.spacing"] == []


def test_mixed_spacings_are_resampled_to_the_median(tmp_path):
    affs = [np.diag([s, s, 3.0, 1.0]) for s in (0.7, 1.0, 1.4)]
    got = _planned(plan(extract_fingerprint(_dataset(tmp_path / "d", affs), progress=False)))
    assert got["data.axis"] == 2 and got["data.spacing"] == [1.0, 1.0]


def test_spacing_spread_warns_naming_the_case(tmp_path):
    affs = [np.diag([s, s, 3.0, 1.0]) for s in (1.0, 1.0, 1.0, 3.5)]
    fp = extract_fingerprint(_dataset(tmp_path / "d", affs), progress=False)
    assert any("case_003" in w and "spacing spread" in w for w in fp.warnings)
    assert "WARNING: spacing spread" in render(plan(fp), fp, "cpu", None)


def test_disagreeing_coarse_axes_are_an_error(tmp_path):
    affs = [np.diag([1.0, 1.0, 5.0, 1.0])] * 2 + [np.diag([5.0, 1.0, 1.0, 1.0])]
    fp = extract_fingerprint(_dataset(tmp_path / "d", affs), progress=False)
    with pytest.raises(DataError, match="case_002"):
        plan(fp)


def test_mixed_modalities_are_an_error(tmp_path):
    images = []
    for i in range(3):
        img, _ = blob_pair((24, 20, 6), 2, seed=i)
        images.append(img - 1000.0 if i < 2 else img)  # two CT-like (air at -1000), one MRI-like
    root = _dataset(tmp_path / "d", [np.eye(4)] * 3, modality="CT", images=images)
    out = tmp_path / "plan.yaml"
    assert main(["plan", "--data", str(root), "-o", str(out)]) != 0
    assert not out.exists() and not (tmp_path / "plan.yaml.fingerprint.json").exists()
    with pytest.raises(DataError, match="mixed modalities.*case_002"):
        plan(extract_fingerprint(root, progress=False))


def test_missing_spacing_in_some_cases_is_an_error(tmp_path):
    root = make_h5(tmp_path / "h", n_cases=2, spacing=(1.0, 1.0, 2.0))
    make_h5(tmp_path / "tmp", n_cases=3)  # no geometry attributes
    (tmp_path / "tmp" / "patient002.h5").rename(root / "patient002.h5")
    with pytest.raises(DataError, match="missing spacing.*patient002"):
        plan(extract_fingerprint(root, progress=False))


def test_side_dependence_and_check_warning(phantom_root, capsys):
    fp = extract_fingerprint(phantom_root, progress=False)
    unsafe = side_dependent_axes(fp.cases, fp.labels, 2)
    assert set(unsafe) == {0, 1}
    assert main(["check", "--data", str(phantom_root)]) == 0
    out = capsys.readouterr().out
    assert "warning: flipping slice axis" in out
    assert main(["check", "--data", str(phantom_root), "--flip-axes", ""]) == 0
    assert "warning" not in capsys.readouterr().out


def test_plan_cli_writes_a_config(phantom_root, tmp_path, capsys):
    out = tmp_path / "p.yaml"
    assert main(["plan", "--data", str(phantom_root), "-o", str(out), "--budget", "gpu", "--hours", "2"]) == 0
    text = out.read_text()
    assert "budget gpu, 2 h" in text and yaml.safe_load(text)["model"]["features"] == 32
    assert main(["plan", "--data", str(phantom_root), "-o", str(out), "--budget", "tpu"]) != 0
    assert "--budget" in capsys.readouterr().err


def test_plan_file_drives_finetune_predict_and_pretrain(tmp_path):
    """A new dataset in three commands: check, plan, finetune (then predict and pretrain with the same plan)."""
    import nibabel as nib

    from medssl.data.phantom_scanners import write_scanner_phantom

    data = write_scanner_phantom(tmp_path / "scanners", n_cases=6, matrices=(64, 80, 112), slices=6)
    assert main(["check", "--data", str(data)]) == 0
    plan_file = tmp_path / "plan.yaml"
    assert main(["plan", "--data", str(data), "-o", str(plan_file)]) == 0
    planned = yaml.safe_load(plan_file.read_text())
    assert planned["data"]["spacing"] and planned["data"]["crop"] == "foreground"
    common = ["--config", str(plan_file), f"output_dir={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'c'}",
              "train.epochs=1", "train.steps_per_epoch=3", "train.batch_size=4", "model.features=8",
              "split.n_folds=3", "split.val=1", "train.patch_size=32", "data.size=64", "train.amp=off"]
    assert main(["finetune", *common, "--name", "ft", "split.budget=2"]) == 0
    run = tmp_path / "runs" / "ft"
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["data"]["spacing"] == planned["data"]["spacing"] and cfg["train"]["patch_size"] == 32
    out = tmp_path / "pred"
    assert main(["predict", str(run), "--data", str(data), "-o", str(out)]) == 0
    for case in ("scanner_000", "scanner_001"):
        src, pred = nib.load(str(data / "imagesTr" / f"{case}.nii.gz")), nib.load(str(out / f"{case}.nii.gz"))
        assert pred.shape == src.shape and np.allclose(pred.affine, src.affine)
    assert main(["pretrain", *common, "--name", "pt", "--method", "simclr"]) == 0
    assert (tmp_path / "runs" / "pt" / "checkpoints" / "last.pt").is_file()


def test_packaged_hippocampus_plan_is_what_plan_derives(hippocampus_root, tmp_path, monkeypatch):
    """src/medssl/configs/hippocampus_plan.yaml is `medssl plan`'s output, not a hand edit."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(repo)  # the preset names the data by its path relative to the repository
    out, _ = write_plan("../shared/data/Task04_Hippocampus", tmp_path / "p.yaml", progress=False)
    assert out.read_text() == (repo / "src" / "medssl" / "configs" / "hippocampus_plan.yaml").read_text()
