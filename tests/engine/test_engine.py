"""Engine: resume after a real kill, DDP with two CPU processes, non-finite loss, predict geometry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medssl.config import load_config
from medssl.data.phantom import write_phantom_dataset
from medssl.engine.checkpoint import load_checkpoint

TINY = ["data.size=32", "model.features=8", "train.batch_size=4", "train.amp=off", "train.threads=1",
        "aug.elastic_prob=0", "split.n_folds=4", "split.val=1", "split.budget=2"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("phantom"), n_cases=8, shape=(32, 32, 16), seed=3)


def _cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "medssl", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, **kw)


def _epochs_logged(run: Path) -> int:
    log = run / "log.jsonl"
    return len(log.read_text().splitlines()) if log.exists() else 0


def _weights(path: Path) -> dict:
    return load_checkpoint(path)["model"]


def test_resume_after_kill_matches_uninterrupted(tiny_data, tmp_path):
    common = ["finetune", "--config", "demo", "--data", str(tiny_data), "--no-evaluate", *TINY,
              "train.epochs=6", "train.steps_per_epoch=12", "train.deterministic=true",
              f"output_dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}"]
    full = _cli([*common, "--name", "full"])
    out, _ = full.communicate(timeout=600)
    assert full.returncode == 0, out

    killed = _cli([*common, "--name", "killed"])
    run = tmp_path / "killed"
    deadline = time.time() + 300
    while _epochs_logged(run) < 2 and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    done = _epochs_logged(run)
    assert 1 <= done < 6, f"the run was not interrupted mid-way ({done} epochs logged)"
    assert load_checkpoint(run / "checkpoints" / "last.pt")["meta"]["state"]["epoch"] < 6

    resumed = _cli([*common, "--name", "killed", "--resume"])
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "resuming" in out
    a, b = _weights(tmp_path / "full" / "checkpoints" / "last.pt"), _weights(run / "checkpoints" / "last.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    full_best = load_checkpoint(tmp_path / "full" / "checkpoints" / "best.pt")["meta"]["state"]["best_epoch"]
    res_best = load_checkpoint(run / "checkpoints" / "best.pt")["meta"]["state"]["best_epoch"]
    assert full_best == res_best


def test_ddp_two_cpu_processes(tiny_data, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "medssl", "finetune", "--config", "demo", "--data", str(tiny_data), "--name", "ddp", *TINY,
           "train.epochs=2", "train.steps_per_epoch=4", f"output_dir={tmp_path}",
           f"data.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "ddp"
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]  # rank 0 alone writes the log
    assert all(np.isfinite(r["train_loss"]) for r in records)
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["meta"]["state"]["step"] == 8
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert (run / "metrics.json").is_file()  # evaluation ran once, on rank 0


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    import medssl.engine.finetune as ft
    from medssl.engine.finetune import finetune
    from medssl.errors import TrainingError

    real = ft.DiceCELoss
    calls = {"n": 0}

    class PoisonedLoss(real):
        def forward(self, input, target):  # noqa: A002 - MONAI's signature
            calls["n"] += 1
            loss = super().forward(input, target)
            return loss * float("nan") if calls["n"] > 5 else loss

    monkeypatch.setattr(ft, "DiceCELoss", PoisonedLoss)
    cfg = load_config("demo", overrides=[*TINY, "train.epochs=3", "train.steps_per_epoch=4", "name=nan",
                                         f"output_dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}",
                                         f"data.path={tiny_data}"])
    with pytest.raises(TrainingError, match="non-finite loss"):
        finetune(cfg, progress=False)
    ckpt = load_checkpoint(tmp_path / "nan" / "checkpoints" / "last.pt")
    assert ckpt["meta"]["state"]["epoch"] == 1  # epoch 1 finished (4 steps), epoch 2 hit NaN at step 6
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_predict_keeps_input_geometry(tmp_path):
    """An LPS/oblique input: the prediction has the input's shape and affine, voxel for voxel."""
    from medssl.config import DataConfig, ModelConfig
    from medssl.engine.checkpoint import save_checkpoint
    from medssl.evaluation.evaluate import predict_files
    from medssl.models import build_model
    import dataclasses

    model = build_model("unet", in_channels=1, n_classes=2, features=8)
    meta = {"kind": "finetune", "model": dataclasses.asdict(ModelConfig(features=8)),
            "data": dataclasses.asdict(DataConfig(size=32)), "modality": "CT",
            "labels": {"0": "background", "1": "organ"}, "n_classes": 2, "in_channels": 1}
    ckpt = save_checkpoint(tmp_path / "model.pt", model=model.state_dict(), meta=meta)
    affine = np.array([[-1.5, 0, 0, 10], [0, 0, -2.0, 5], [0, 3.0, 0, -7], [0, 0, 0, 1]])  # LIA-like
    rng = np.random.default_rng(0)
    data = (rng.normal(0, 100, size=(20, 9, 26))).astype(np.int16)
    src = tmp_path / "case_a.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), src)
    (out,) = predict_files(ckpt, src, tmp_path / "pred", progress=False)
    img = nib.load(out)
    assert img.shape == data.shape
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    assert set(np.unique(np.asarray(img.dataobj))) <= {0, 1}


def test_init_from_checkpoint_encoder_full_and_mismatch(tmp_path):
    from medssl.engine.checkpoint import save_checkpoint
    from medssl.engine.finetune import init_from_checkpoint
    from medssl.errors import ConfigError
    from medssl.models import build_model

    torch.manual_seed(0)
    src = build_model("unet", in_channels=1, n_classes=3, features=8)
    meta = {"kind": "finetune", "model": {"backbone": "unet", "features": 8, "options": {}}}
    path = save_checkpoint(tmp_path / "src.pt", model=src.state_dict(), meta=meta)

    enc = build_model("unet", in_channels=1, n_classes=3, features=8)
    init_from_checkpoint(enc, str(path), "encoder", "unet")
    for k, v in enc.state_dict().items():
        same = torch.equal(v, src.state_dict()[k])
        if k.startswith("encoder."):
            assert same, k
        elif v.dim() >= 2:  # conv kernels (BN weights start at 1 in both models)
            assert not same, f"{k} should not have been transferred"

    full = build_model("unet", in_channels=1, n_classes=3, features=8)
    init_from_checkpoint(full, str(path), "full", "unet")
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in full.state_dict().items())

    wider = build_model("unet", in_channels=1, n_classes=3, features=16)
    with pytest.raises(ConfigError):
        init_from_checkpoint(wider, str(path), "encoder", "unet")
    with pytest.raises(ConfigError, match="backbone"):
        init_from_checkpoint(wider, str(path), "encoder", "monai-basicunet")


def test_resume_before_first_checkpoint_still_applies_init(tiny_data, tmp_path, monkeypatch):
    """A run killed before its first checkpoint has nothing to resume from: --resume must start it again *with*
    its pretrained init (it used to start from random weights, silently)."""
    from medssl.engine import finetune as ft

    base = [f"data.path={tiny_data}", *TINY, "train.epochs=1", "train.steps_per_epoch=3", "train.deterministic=true",
            f"output_dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}"]
    ft.finetune(load_config("demo", overrides=[*base, "name=source", "train.lr=0.05"]), progress=False)
    init = [f"train.init={tmp_path / 'source' / 'checkpoints' / 'last.pt'}"]
    ft.finetune(load_config("demo", overrides=[*base, *init, "name=fresh"]), progress=False)

    real_fit = ft.Trainer.fit
    monkeypatch.setattr(ft.Trainer, "fit", lambda self, resume=False: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # "killed" after the run folder exists, before any checkpoint
        ft.finetune(load_config("demo", overrides=[*base, *init, "name=killed"]), progress=False)
    killed = tmp_path / "killed"
    assert (killed / "config.yaml").is_file() and not (killed / "checkpoints" / "last.pt").exists()
    monkeypatch.setattr(ft.Trainer, "fit", real_fit)
    ft.finetune(load_config("demo", overrides=[*base, *init, "name=killed"]), resume=True, progress=False)
    a, b = _weights(tmp_path / "fresh" / "checkpoints" / "last.pt"), _weights(killed / "checkpoints" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_accepts_the_same_init_checkpoint_by_another_path(tmp_path, monkeypatch):
    """A grid resumed from another working directory names the same pretrained checkpoint by a relative path where
    the run folder saved an absolute one: that is the same file, so --resume must accept it; another file is not."""
    from medssl.engine.finetune import _same_file

    ckpt = tmp_path / "pretrain" / "last.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert _same_file(str(ckpt), "pretrain/last.pt")
    assert _same_file(str(ckpt), "./pretrain/../pretrain/last.pt")
    assert not _same_file(str(ckpt), "other/last.pt")
    assert _same_file(None, None) and not _same_file(None, "pretrain/last.pt")
