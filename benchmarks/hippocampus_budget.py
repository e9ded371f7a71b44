"""Hippocampus Dice vs label budget M for random init (mean ± sd over seeds), and bf16 vs fp32.

    python benchmarks/hippocampus_budget.py --out runs/budget --budgets 1 2 5 20 all --seeds 0 1 2
    python benchmarks/hippocampus_budget.py --out runs/budget --budgets 20 --seeds 0 1 2 --amp off

Each cell fine-tunes the `hippocampus` preset (fold 0, 4 validation patients, checkpoint chosen on
validation) with train.seed = split.budget_seed = seed, then evaluates on the 52 test-fold volumes.
Finished cells are skipped, so a killed grid resumes. Writes results.csv and a Markdown table in --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path

from medssl.config import load_config
from medssl.engine.finetune import finetune
from medssl.evaluation.evaluate import evaluate_run

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "Task04_Hippocampus"


def cell(out: Path, budget: str, seed: int, amp: str, extra: list[str]) -> dict:
    name = f"m{budget}-s{seed}-{amp}"
    run = out / name
    metrics = run / "metrics.json"
    if not metrics.is_file():
        cfg = load_config("hippocampus", overrides=[
            f"data.path={DATA}", f"output_dir={out}", f"name={name}", f"data.cache_dir={out / 'cache'}",
            f"split.budget={budget}", f"split.budget_seed={seed}", f"train.seed={seed}", f"train.amp={amp}",
            *extra])
        t0 = time.time()
        finetune(cfg, resume=(run / "checkpoints" / "last.pt").is_file(), progress=False)
        evaluate_run(run, progress=False)
        (run / "wall_seconds.txt").write_text(f"{time.time() - t0:.1f}\n")
    m = json.loads(metrics.read_text())
    split = json.loads((run / "splits.json").read_text())
    wall = (run / "wall_seconds.txt").read_text().strip() if (run / "wall_seconds.txt").exists() else ""
    return {"budget": budget, "M": split["budget_m"], "seed": seed, "amp": amp, "dice_mean": m["dice_mean"],
            "dice_anterior": m["dice"]["Anterior"]["mean"], "dice_posterior": m["dice"]["Posterior"]["mean"],
            "hd95_mean": m["hd95_mean"], "micro_dice": m["micro_dice"]["mean"], "n_test": m["n_cases"],
            "seconds": wall}


def table(rows: list[dict]) -> str:
    lines = ["| M (patients) | amp | 3D Dice mean ± sd (3 seeds) | per seed | HD95 mm | micro Dice | test volumes |",
             "|---|---|---|---|---|---|---|"]
    keys = sorted({(r["M"], r["amp"]) for r in rows})
    for m, amp in keys:
        rs = [r for r in rows if r["M"] == m and r["amp"] == amp]
        d = [r["dice_mean"] for r in rs]
        sd = statistics.stdev(d) if len(d) > 1 else 0.0
        hd = statistics.mean(r["hd95_mean"] for r in rs)
        mi = statistics.mean(r["micro_dice"] for r in rs)
        lines.append(f"| {m} | {amp} | {statistics.mean(d):.3f} ± {sd:.3f} | "
                     f"{', '.join(f'{x:.3f}' for x in d)} | {hd:.2f} | {mi:.3f} | {rs[0]['n_test']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/budget"))
    ap.add_argument("--budgets", nargs="+", default=["1", "2", "5", "20", "all"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--amp", default="auto")
    ap.add_argument("overrides", nargs="*", help="extra config overrides, e.g. train.epochs=10")
    args = ap.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} not found: this benchmark needs ../shared/data/Task04_Hippocampus")
    args.out.mkdir(parents=True, exist_ok=True)
    for b in args.budgets:
        for s in args.seeds:
            r = cell(args.out, b, s, args.amp, args.overrides)
            print(json.dumps(r), flush=True)
    rows = []
    for run in sorted(args.out.glob("m*-s*-*")):
        if (run / "metrics.json").is_file():
            b, s, amp = run.name[1:].split("-s")[0], int(run.name.split("-s")[1].split("-")[0]), run.name.split("-")[-1]
            rows.append(cell(args.out, b, s, amp, args.overrides))
    with open(args.out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (args.out / "results.md").write_text(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
