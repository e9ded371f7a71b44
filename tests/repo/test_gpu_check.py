"""``scripts/gpu_check.sh``: valid bash, a one-line skip without CUDA, and the whole sequence on CPU (--allow-cpu)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
PARTS = ("data", "pretrain", "finetune", "evaluate", "predict", "ddp_finetune", "sam_refine", "sam_propagate",
         "hippocampus")


def _no_cuda_env() -> dict:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # torch.cuda.is_available() is False even on a GPU host


def test_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_without_cuda_prints_one_line_and_exits_0(tmp_path):
    out = tmp_path / "gc"
    proc = subprocess.run(["bash", str(SCRIPT), "--out", str(out)], capture_output=True, text=True,
                          env=_no_cuda_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1
    assert proc.stdout.startswith("gpu_check: no CUDA device; skipped")
    assert not out.exists()  # nothing else was done


def test_refuses_a_foreign_non_empty_folder(tmp_path):
    (tmp_path / "runs").mkdir()  # the check clears <out>/runs: never in a folder it did not create
    proc = subprocess.run(["bash", str(SCRIPT), "--allow-cpu", "--out", str(tmp_path)], capture_output=True,
                          text=True, env=_no_cuda_env(), timeout=300)
    assert proc.returncode == 2 and "choose another --out" in proc.stderr
    assert (tmp_path / "runs").is_dir() and not (tmp_path / "gpu_check.json").exists()


@pytest.mark.slow
def test_allow_cpu_runs_every_part(tmp_path):
    """The tiny CPU sequence (about 3 minutes on 2 busy cores): every part present in an atomic JSON."""
    out = tmp_path / "gc"
    proc = subprocess.run(["bash", str(SCRIPT), "--allow-cpu", "--out", str(out)], capture_output=True, text=True,
                          env=_no_cuda_env(), timeout=1800)
    report = json.loads((out / "gpu_check.json").read_text())
    assert set(report["parts"]) == set(PARTS)
    assert report["mode"] == "cpu" and report["environment"]["torch"]
    assert not list(out.glob(".gpu_check.json.*.tmp"))
    for name, part in report["parts"].items():
        assert part["status"] in ("ok", "failed", "skipped"), name
        if part["status"] == "failed":
            assert part["error"] and "\n" not in part["error"], name
    assert report["parts"]["hippocampus"]["status"] == "skipped"  # not requested
    assert proc.returncode == (1 if report["failed_parts"] else 0), proc.stdout[-2000:]
    # the wiring works end to end here: every requested part is ok, with its numbers
    assert report["failed_parts"] == [], proc.stdout[-2000:]
    parts = report["parts"]
    from medssl.methods import available_methods

    assert set(parts["pretrain"]["methods"]) == set(available_methods())
    assert all(r["steps"] > 0 and r["ms_per_step"] > 0 for r in parts["pretrain"]["methods"].values())
    assert parts["pretrain"]["methods"]["kaf"]["backbone"] == "kaf-unet"
    assert parts["finetune"]["amp"] == "bf16" and parts["finetune"]["images_per_s"] > 0
    assert 0.0 <= parts["evaluate"]["dice_mean"] <= 1.0
    assert len(parts["predict"]["files"]) == 2 and all(Path(f).is_file() for f in parts["predict"]["files"])
    ddp = parts["ddp_finetune"]
    assert ddp["returncode"] == 0 and ddp["backend"] == "gloo" and ddp["ddp_active"] and ddp["steps"] > 0
    assert parts["sam_refine"]["dice_before"] is not None and parts["sam_refine"]["dice_after"] is not None
    assert 0.0 <= parts["sam_propagate"]["dice"] <= 1.0
    assert all(p.get("peak_mem_mib") is None for p in parts.values() if p["status"] == "ok")
