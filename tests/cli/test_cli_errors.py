"""The command line on bad input: one ``medssl: error:`` line naming the file or key, no traceback,
a non-zero exit, and nothing half-written left behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medssl.errors import ConfigError
from synth import blob_pair, make_msd, make_msd_multichannel, truncate_file, write_corrupt_gz, write_nifti


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medssl", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def assert_one_line_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    """Non-zero exit, exactly one non-empty stderr line "medssl: error: ..." containing every needle."""
    assert res.returncode != 0, res
    assert "Traceback" not in res.stderr + res.stdout, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("medssl: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def assert_no_valid_cache(cache_dir: Path) -> None:
    """No cache that looks valid (meta.json) and no temporary build folder under ``cache_dir``."""
    leftovers = list(cache_dir.rglob("*")) if cache_dir.exists() else []
    assert leftovers == [], leftovers


# ------------------------------------------------------------------ config
def test_unknown_config_key(tmp_path):
    res = run_cli("config", "--config", "demo", "train.lrr=1", cwd=tmp_path)
    assert_one_line_error(res, "'train.lrr'")
    assert res.returncode == 2 and res.stdout == ""
    res = run_cli("config", "--config", "demo", "train.lr=1e-3", cwd=tmp_path)  # and the fine case works
    assert res.returncode == 0 and "lr: 0.001" in res.stdout


def test_missing_config_file_and_bad_value(tmp_path):
    assert_one_line_error(run_cli("config", "--config", tmp_path / "nope.yaml", cwd=tmp_path), "nope.yaml")
    assert_one_line_error(run_cli("config", "--config", "demo", "data.size=50", cwd=tmp_path), "'data.size'")


# ------------------------------------------------------------------ options, choices, positional forms
def test_misspelt_option_names_the_closest_one(tmp_path):
    res = run_cli("config", "--confg", "demo", "train.lr=1e-3", cwd=tmp_path)
    line = assert_one_line_error(res, "no such option --confg (did you mean --config?)")
    assert "override" not in line and res.returncode == 2
    assert_one_line_error(run_cli("evaluate", tmp_path, "--prat", "val", cwd=tmp_path),
                          "no such option --prat (did you mean --part?)")
    assert_one_line_error(run_cli("finetune", "-c", "demo", "--xyzzy", cwd=tmp_path), "no such option --xyzzy")
    assert_one_line_error(run_cli("finetune", "-c", "demo", "stray", cwd=tmp_path), "unexpected argument 'stray'")
    ok = run_cli("config", "-c", "demo", "--train.lr=0.5", "split.budget=3", cwd=tmp_path)  # overrides still work
    assert ok.returncode == 0 and "lr: 0.5" in ok.stdout and "budget: 3" in ok.stdout, ok.stderr


def test_help_lists_every_command_and_the_common_options(tmp_path):
    res = run_cli("--help", cwd=tmp_path)
    assert res.returncode == 0 and res.stderr == ""
    for command in ("prepare", "check", "plan", "finetune", "pretrain", "evaluate", "predict", "experiment", "advise",
                    "refine", "propagate", "demo", "config"):
        assert f" {command} " in res.stdout, command
    assert "--config/-c" in res.stdout and "--data/-d" in res.stdout and "KEY=VALUE" in res.stdout


def test_invalid_choice_lists_the_choices(tmp_path):
    assert_one_line_error(run_cli("finetune", "--init-mode", "half", cwd=tmp_path),
                          "--init-mode", "'half' is not one of 'encoder', 'full'")
    assert_one_line_error(run_cli("plan", "-d", tmp_path, "--budget", "tpu", cwd=tmp_path), "'cpu', 'gpu'")
    assert_one_line_error(run_cli("check", "-d", tmp_path, "--modality", "PET", cwd=tmp_path), "--modality")
    assert_one_line_error(run_cli("evaluate", tmp_path, "--part", "train", cwd=tmp_path), "'test', 'val'")


def test_pretrain_method_choices_come_from_the_registry(tmp_path):
    from medssl.methods import available_methods

    res = run_cli("pretrain", "-c", "demo", "--method", "byol", cwd=tmp_path)
    line = assert_one_line_error(res, "--method", "'byol' is not one of")
    assert all(f"'{m}'" in line for m in available_methods())
    wide = {**os.environ, "COLUMNS": "250"}  # one table row per option
    helptext = subprocess.run([sys.executable, "-m", "medssl", "pretrain", "--help"], cwd=tmp_path, env=wide,
                              capture_output=True, text=True, timeout=120).stdout
    assert "<" + "|".join(available_methods()) + ">" in helptext


def test_refine_and_propagate_options_that_became_settings(tmp_path):
    res = run_cli("refine", tmp_path, "--data", tmp_path, "-o", tmp_path / "o", "--merge", "union", cwd=tmp_path)
    assert_one_line_error(res, "no such option --merge", "sam.merge=VALUE")
    res = run_cli("propagate", "-d", tmp_path / "i.nii.gz", "-o", tmp_path / "o.nii.gz", "--backend", "register",
                  cwd=tmp_path)
    assert_one_line_error(res, "no such option --backend", "propagate.backend=VALUE")
    res = run_cli("refine", tmp_path, "-d", tmp_path, "-o", tmp_path / "o", "sam.merj=union", cwd=tmp_path)
    assert_one_line_error(res, "unknown config key 'sam.merj'", "merge")
    res = run_cli("propagate", "-d", tmp_path / "i.nii.gz", "-o", tmp_path / "o.nii.gz", "sam.merge=union",
                  cwd=tmp_path)
    assert_one_line_error(res, "unknown config key 'sam.merge'", "propagate")
    assert not (tmp_path / "o").exists()


def test_old_positional_forms_still_work_with_a_warning(tmp_path):
    root = make_msd(tmp_path / "ds", 2)
    res = run_cli("check", root, "--flip-axes", "", cwd=tmp_path)
    assert res.returncode == 0 and "0 problem(s)" in res.stdout, res.stderr
    warning = f"medssl: warning: 'medssl check {root}' is deprecated: use 'medssl check --data {root}'"
    assert res.stderr.strip() == warning
    res = run_cli("experiment", tmp_path / "missing.yaml", cwd=tmp_path)
    assert "deprecated" in res.stderr and "missing.yaml" in res.stderr.splitlines()[-1] and res.returncode == 2
    assert_one_line_error(run_cli("check", root, "-d", root, cwd=tmp_path), "unexpected argument")


# ------------------------------------------------------------------ prepare
def test_prepare_missing_dataset_folder(tmp_path):
    res = run_cli("prepare", "--data", tmp_path / "no_such_dataset", f"data.cache_dir={tmp_path / 'c'}", cwd=tmp_path)
    assert_one_line_error(res, "no_such_dataset", "not found")
    assert_no_valid_cache(tmp_path / "c")


def _assert_prepare_fails_on(root: Path, bad_file: Path, tmp_path: Path, *needles: str) -> None:
    cache_dir = tmp_path / "cache"
    res = run_cli("prepare", "--data", root, f"data.cache_dir={cache_dir}", cwd=tmp_path)
    assert_one_line_error(res, bad_file.name, *needles)
    assert str(bad_file.relative_to(root.parent)) in res.stderr or str(bad_file) in res.stderr
    assert_no_valid_cache(cache_dir)


def test_prepare_truncated_nifti(tmp_path):
    root = make_msd(tmp_path / "ds", 3)
    bad = truncate_file(root / "imagesTr" / "case_001.nii.gz", keep=0.5)
    _assert_prepare_fails_on(root, bad, tmp_path, "truncated")


def test_prepare_corrupt_gzip(tmp_path):
    root = make_msd(tmp_path / "ds", 3)
    bad = write_corrupt_gz(root / "labelsTr" / "case_002.nii.gz")
    _assert_prepare_fails_on(root, bad, tmp_path)


def test_prepare_nan_voxels(tmp_path):
    root = make_msd(tmp_path / "ds", 3)
    image, _ = blob_pair(seed=1)
    image[2, 3, 4] = np.nan
    image[0, 0, 0] = np.inf
    bad = write_nifti(root / "imagesTr" / "case_001.nii.gz", image)
    _assert_prepare_fails_on(root, bad, tmp_path, "2 non-finite")


def test_prepare_undeclared_label_value(tmp_path):
    root = make_msd(tmp_path / "ds", 3)
    _, label = blob_pair(seed=2)
    label[1, 1, 1] = 7
    bad = write_nifti(root / "labelsTr" / "case_002.nii.gz", label)
    _assert_prepare_fails_on(root, bad, tmp_path, "[7]", "not declared")


def test_prepare_ok_then_reuse(tmp_path):
    root = make_msd(tmp_path / "ds", 2)
    res = run_cli("prepare", "--data", root, f"data.cache_dir={tmp_path / 'c'}", "data.size=16", cwd=tmp_path)
    assert res.returncode == 0 and res.stderr.strip() == "", res.stderr
    assert "slice cache:" in res.stdout and len(list((tmp_path / "c").rglob("meta.json"))) == 1


# ------------------------------------------------------------------ check
def test_check_lists_every_broken_file(tmp_path):
    root = make_msd(tmp_path / "ds", 5)
    broken = [
        truncate_file(root / "imagesTr" / "case_000.nii.gz"),
        write_corrupt_gz(root / "labelsTr" / "case_001.nii.gz"),
    ]
    image, label = blob_pair(seed=3)
    image[0, 0, 0] = np.nan
    broken.append(write_nifti(root / "imagesTr" / "case_003.nii.gz", image))
    label[1, 1, 1] = 9
    broken.append(write_nifti(root / "labelsTr" / "case_004.nii.gz", label))
    res = run_cli("check", "--data", root, cwd=tmp_path)
    assert res.returncode == 1
    assert "Traceback" not in res.stdout + res.stderr
    problem_lines = [ln for ln in res.stdout.splitlines() if ln.startswith(str(root))]
    assert len(problem_lines) == len(broken), res.stdout
    for path in broken:
        assert any(ln.startswith(f"{path}:") for ln in problem_lines), (path, res.stdout)
    assert "case_002" not in res.stdout  # the healthy case is not reported
    assert "4 problem(s)" in res.stdout
    ok = run_cli("check", "-d", make_msd(tmp_path / "fine", 2), cwd=tmp_path)
    assert ok.returncode == 0 and "0 problem(s)" in ok.stdout


# ------------------------------------------------------------------ predict / evaluate
def test_predict_missing_checkpoint(tmp_path):
    root = make_msd(tmp_path / "ds", 1)
    res = run_cli("predict", tmp_path / "missing.pt", "--data", root, "-o", tmp_path / "out", cwd=tmp_path)
    assert_one_line_error(res, "missing.pt")
    assert not (tmp_path / "out").exists()


def test_evaluate_folder_that_is_not_a_run(tmp_path):
    root = make_msd(tmp_path / "ds", 1)
    res = run_cli("evaluate", root, cwd=tmp_path)
    assert_one_line_error(res, str(root), "not a medssl run folder")
    assert not (root / "metrics.json").exists()


# ------------------------------------------------------------------ finetune
def test_finetune_budget_larger_than_available(phantom_root, tmp_path):
    runs, cache_dir = tmp_path / "runs", tmp_path / "cache"
    res = run_cli("finetune", "--config", "demo", "--data", phantom_root, "split.budget=999", "train.epochs=1",
                  f"output_dir={runs}", f"data.cache_dir={cache_dir}", cwd=tmp_path)
    assert_one_line_error(res, "budget", "999")
    assert not (runs.exists() and list(runs.rglob("*.pt")))
    assert not (runs / "demo").exists(), "a run that failed before training must not leave its folder"


def test_finetune_bad_init_checkpoint_leaves_no_run_folder(phantom_root, tmp_path):
    """A checkpoint of another width fails loudly (no partial load) before the run folder is created."""
    from medssl.engine.checkpoint import save_checkpoint
    from medssl.models import build_model

    other = build_model("unet", in_channels=1, n_classes=4, features=8)
    ckpt = save_checkpoint(tmp_path / "f8.pt", model=other.state_dict(),
                           meta={"kind": "pretrain", "model": {"backbone": "unet", "features": 8, "options": {}}})
    runs = tmp_path / "runs"
    res = run_cli("finetune", "--config", "demo", "--data", phantom_root, "--init", ckpt, "model.features=16",
                  "train.epochs=1", f"output_dir={runs}", f"data.cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    assert_one_line_error(res, "encoder")
    assert not (runs / "demo").exists()


def test_no_validation_patients_leaves_no_run_folder(phantom_root, tmp_path):
    from medssl.config import load_config
    from medssl.engine.finetune import finetune

    cfg = load_config("demo", overrides=[f"data.path={phantom_root}", f"output_dir={tmp_path}", "name=noval",
                                         f"data.cache_dir={tmp_path / 'cache'}", "split.val=0", "split.budget=1"])
    with pytest.raises(ConfigError, match="split.val"):
        finetune(cfg, progress=False)
    assert not (tmp_path / "noval").exists()


# ------------------------------------------------------------------ pretraining bad input
def test_pretrain_organ_flags_on_unlabelled_cases(phantom_copy, tmp_path):
    """PolyCL-O needs organ flags: an unlabelled pretraining case is named; nothing is written; -S runs."""
    import shutil

    (phantom_copy / "imagesTs").mkdir(exist_ok=True)
    shutil.copy(phantom_copy / "imagesTr" / "phantom_001.nii.gz", phantom_copy / "imagesTs" / "extra_001.nii.gz")
    runs = tmp_path / "runs"
    common = ["--config", "demo", "--data", phantom_copy, "data.size=32", "model.features=8", "train.epochs=1",
              "train.steps_per_epoch=1", "train.batch_size=4", "split.val=1", "pretrain.slab_fraction=1.0",
              f"output_dir={runs}", f"data.cache_dir={tmp_path / 'cache'}"]
    res = run_cli("pretrain", "--method", "polycl-o", "--name", "o", *common, cwd=tmp_path)
    assert_one_line_error(res, "polycl-o", "needs the labels", "extra_001")
    assert not (runs / "o").exists()
    ok = run_cli("pretrain", "--method", "polycl-s", "--name", "s", *common, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert (runs / "s" / "checkpoints" / "last.pt").is_file()


def test_pretrain_too_few_slices_for_a_batch(phantom_root, tmp_path):
    runs = tmp_path / "runs"
    res = run_cli("pretrain", "--config", "demo", "--data", phantom_root, "--method", "simclr", "--name", "big",
                  "train.batch_size=4096", "train.epochs=1", f"output_dir={runs}",
                  f"data.cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    assert_one_line_error(res, "pretraining needs at least 8192 slices")
    assert not (runs / "big").exists()


def test_polycl_with_a_single_scan(phantom_root, tmp_path):
    """PolyCL-S needs negatives from another scan: one pretraining scan is a clear error."""
    runs = tmp_path / "runs"
    res = run_cli("pretrain", "--config", "demo", "--data", phantom_root, "--method", "polycl-s", "--name", "one",
                  "split.n_folds=2", "split.val=3", "split.budget=1", "train.batch_size=2", "pretrain.slab_fraction=1.0",
                  "data.size=32", "train.epochs=1", f"output_dir={runs}", f"data.cache_dir={tmp_path / 'cache'}",
                  cwd=tmp_path)
    assert_one_line_error(res, "polycl-s", "2 pretraining scans")
    assert not (runs / "one").exists()


def test_misspelt_method_option_section_is_an_error_in_every_command(tmp_path):
    """``pretrain.<section>.<key>`` is checked when any command loads its config, not only when a method is built:
    ``finetune`` with a misspelt section used to accept it silently."""
    res = run_cli("finetune", "-c", "demo", "-d", tmp_path, "pretrain.pcll.theta=0.2", cwd=tmp_path)
    assert_one_line_error(res, "unknown config key 'pretrain.pcll'", "pcl")
    res = run_cli("finetune", "-c", "demo", "-d", tmp_path, "pretrain.pcl.thta=0.2", cwd=tmp_path)
    assert_one_line_error(res, "unknown config key 'pretrain.pcl.thta'", "theta")
    assert not list(tmp_path.iterdir())


def test_unknown_channel(tmp_path):
    root = make_msd_multichannel(tmp_path / "P", n_cases=1)
    res = run_cli("check", "--data", root, "data.channel=5", cwd=tmp_path)
    assert_one_line_error(res, "data.channel=5", "has 2 channels (0: T2, 1: ADC)")
