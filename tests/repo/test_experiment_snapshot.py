"""benchmarks/experiment_snapshot.py: the header of a committed grid snapshot names, per fold, the rows, the commits
and the machine from the run folders, and keeps what earlier snapshots recorded for folders no longer on disk."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
COLUMNS = ["method", "fold", "budget", "M", "seed", "dice_mean", "hd95_mean", "micro_dice", "n_test", "val_dice",
           "choice", "slice_mean_dice"]


def _cell(run: Path, name: str, commit: str, machine: dict | None) -> None:
    folder = run / "cells" / name
    folder.mkdir(parents=True)
    env = {"git": {"commit": commit, "dirty": False}, **({"machine": {"cpu": machine}} if machine else {})}
    (folder / "environment.json").write_text(json.dumps(env))
    (folder / "log.jsonl").write_text("{}\n")


def test_snapshot_header_names_commits_and_machines_per_fold(tmp_path):
    run, dest = tmp_path / "runs" / "grid", tmp_path / "results" / "grid"
    run.mkdir(parents=True)
    grid = {"methods": ["random", "pcl", {"name": "unet-c2", "method": "random"}], "budgets": [1], "seeds": [0, 1],
            "folds": [0, 1], "reference": "random"}
    (run / "experiment.yaml").write_text(yaml.safe_dump({**grid, "folds": [1]}))  # a run of a subset of the grid
    whole = tmp_path / "grid.yaml"
    whole.write_text(yaml.safe_dump(grid))
    with (run / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        for method, fold, seed, dice in [("random", 0, 0, 0.6), ("pcl", 0, 0, 0.65), ("random", 0, 1, 0.7),
                                         ("pcl", 0, 1, 0.72), ("random", 1, 0, 0.5), ("pcl", 1, 0, 0.55)]:
            w.writerow({"method": method, "fold": fold, "budget": 1, "M": 1, "seed": seed, "dice_mean": dice,
                        "hd95_mean": 3.0, "micro_dice": dice, "n_test": 5, "val_dice": dice, "choice": "",
                        "slice_mean_dice": dice})
    cpu = {"model": "Test CPU", "logical_cpus": 2, "features": ["avx2"]}
    _cell(run, "random-f1-m1-s0-o0", "a" * 40, cpu)
    _cell(run, "pcl-f1-m1-s0-o1", "b" * 40, cpu)
    dest.mkdir(parents=True)  # fold 0's folders are gone: an earlier snapshot recorded them
    (dest / "provenance.json").write_text(json.dumps({
        "random-f0": {"commits": ["c" * 12], "machine": "old machine", "hours": None},
        "pcl-f0": {"commits": ["d" * 12], "machine": "old machine", "hours": None}}))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "experiment_snapshot.py"), str(run), str(dest),
                           "--grid", str(whole)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    text = (dest / "results.md").read_text()
    assert "6 cells of 3 rows x 1 budgets x 2 seeds x 2 folds" in text  # the whole grid, not the subset
    fold0 = next(ln for ln in text.splitlines() if ln.strip().startswith("- fold 0:"))
    fold1 = next(ln for ln in text.splitlines() if ln.strip().startswith("- fold 1:"))
    assert "random, pcl;" in fold0 and "cccccccccccc, dddddddddddd" in fold0 and "old machine" in fold0
    assert "aaaaaaaaaaaa, bbbbbbbbbbbb" in fold1 and "Test CPU (2 CPUs; avx2)" in fold1
    prov = json.loads((dest / "provenance.json").read_text())
    assert set(prov) == {"random-f0", "pcl-f0", "random-f1", "pcl-f1"}
    assert yaml.safe_load((dest / "experiment.yaml").read_text())["folds"] == [0, 1]
    assert (dest / "dice_vs_m.png").stat().st_size > 0


def test_active_spans_split_idle_nights_and_hand_records_are_kept(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    from experiment_snapshot import active_spans, provenance

    day = 86400
    pts = [("config.yaml", 0), ("events.out.tfevents.20.host.name.1.0", 100), ("log.jsonl", day + 60),
           ("events.out.tfevents.86390.host.2.0", day + 50)]
    assert active_spans(pts) == [[0, 100], [day - 10, day + 60]]  # killed, resumed the next day: the night is idle
    long_run = [("config.yaml", 0), ("events.out.tfevents.0.host.1.0", 3 * day), ("last.pt", 3 * day + 5)]
    assert active_spans(long_run) == [[0, 3 * day + 5]]  # one long process writing only at its end counts whole
    assert active_spans([("x", 5.4)]) == [[5, 5]]
    run = tmp_path / "run"
    _cell(run, "pcl-f0", "e" * 40, {"model": "New CPU", "logical_cpus": 2, "features": ["avx2"]})
    previous = tmp_path / "provenance.json"  # pcl-f0's cells came from a folder that is gone: recorded by hand
    previous.write_text(json.dumps({"pcl-f0": {"commits": ["d" * 12], "machine": "old machine (by hand)"}}))
    prov = provenance(run, previous)
    assert prov["pcl-f0"]["commits"] == ["d" * 12] and prov["pcl-f0"]["machine"] == "old machine (by hand)"
    assert prov["pcl-f0"]["later_folders"]["commits"] == ["e" * 12]
    assert "New CPU" in prov["pcl-f0"]["later_folders"]["machine"]
    previous.write_text(json.dumps(prov))  # a second snapshot keeps the hand record and updates the later folders
    again = provenance(run, previous)
    assert again["pcl-f0"]["commits"] == ["d" * 12] and again["pcl-f0"]["later_folders"] == prov["pcl-f0"]["later_folders"]
