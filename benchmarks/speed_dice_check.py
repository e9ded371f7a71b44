"""Does the faster code train the same model? Test Dice of two versions, same folds, same seeds.

    python benchmarks/speed_dice_check.py --base 5403e8c --new HEAD [--seeds 0 1 2] [--steps 1000]

Runs ``medssl finetune -c hippocampus_plan split.budget=20`` (fold 0, the plan's schedule shortened to
``--steps`` steps) with each version's code (``git archive``) for each training seed, alternating versions,
and writes per-run test Dice (3D, per volume, mean over the 52 test volumes) to
``benchmarks/results/speed/dice_m20.csv`` plus a summary line: the paired difference new - today per seed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_train import DATA, REPO, export

OUT = REPO / "benchmarks" / "results" / "speed"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="5403e8c")
    ap.add_argument("--new", default="HEAD")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=1000)
    args = ap.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} not found: this check needs ../shared/data/Task04_Hippocampus")
    tmp = Path(tempfile.mkdtemp(prefix="medssl-dice-check-"))
    versions = {"today": export(args.base, tmp / "base"), "new": export(args.new, tmp / "new")}
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    epochs = max(1, args.steps // 250)
    for seed in args.seeds:
        for name, src in versions.items():
            cmd = [sys.executable, "-m", "medssl", "finetune", "-c", "hippocampus_plan", "--data", str(DATA),
                   "--name", f"{name}-s{seed}", "split.budget=20", f"train.seed={seed}", f"train.epochs={epochs}",
                   "train.steps_per_epoch=250", f"output_dir={tmp / 'runs'}", "eval.hd95=false"]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(src)})
            if proc.returncode:
                raise SystemExit(f"{name} seed {seed} failed: {proc.stderr.strip().splitlines()[-1:]}")
            metrics = json.loads((tmp / "runs" / f"{name}-s{seed}" / "metrics.json").read_text())
            rows.append({"version": name, "seed": seed, "steps": epochs * 250, "test_dice": metrics["dice_mean"]})
            print(rows[-1], flush=True)
    with open(OUT / "dice_m20.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    by = {(r["version"], r["seed"]): r["test_dice"] for r in rows}
    diffs = [by[("new", s)] - by[("today", s)] for s in args.seeds]
    today = [by[("today", s)] for s in args.seeds]
    print(f"today {statistics.mean(today):.4f} (seed sd {statistics.stdev(today) if len(today) > 1 else 0:.4f}); "
          f"new - today per seed {[round(d, 4) for d in diffs]}, mean {statistics.mean(diffs):+.4f}")


if __name__ == "__main__":
    main()
