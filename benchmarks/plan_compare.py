"""Planned vs hand-written configurations at the same compute (issue: ``medssl plan``).

    python benchmarks/plan_compare.py phantom       # write the demo phantom, plan it, run plan_phantom.yaml
    python benchmarks/plan_compare.py hippocampus   # re-plan Hippocampus, run plan_hippocampus.yaml
    python benchmarks/plan_compare.py scanners      # the multi-scanner phantom, run plan_scanners.yaml

Both experiments resume; results land in runs/plan_<name>/ (results.csv, results.md, dice_vs_m.png), and are
copied to benchmarks/results/plan/<name>/ with the machine's CPU flags.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HIPPOCAMPUS = "../shared/data/Task04_Hippocampus"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("which", choices=["phantom", "hippocampus", "scanners"])
    args = ap.parse_args(argv)
    from medssl.data.phantom import write_phantom_dataset
    from medssl.data.phantom_scanners import write_scanner_phantom
    from medssl.planning import write_plan
    from medssl.pipeline.experiment import load_experiment, run_experiment

    if args.which == "phantom":
        data = write_phantom_dataset(ROOT / "runs" / "plan_phantom" / "phantom", n_cases=16, seed=0)
        plan_file = ROOT / "benchmarks" / "experiments" / "phantom_plan.yaml"
        write_plan(data.relative_to(ROOT), plan_file, progress=False)
    elif args.which == "scanners":
        data = write_scanner_phantom(ROOT / "runs" / "plan_scanners" / "phantom", n_cases=16, seed=0)
        plan_file = ROOT / "benchmarks" / "experiments" / "scanners_plan.yaml"
        write_plan(data.relative_to(ROOT), plan_file, progress=False)
    else:
        if not (ROOT / HIPPOCAMPUS).is_dir():
            print(f"skip: {HIPPOCAMPUS} not found", file=sys.stderr)
            return 0
        plan_file = ROOT / "src" / "medssl" / "configs" / "hippocampus_plan.yaml"
        write_plan(HIPPOCAMPUS, plan_file, progress=False)
    fingerprint = plan_file.with_name(plan_file.name + ".fingerprint.json")
    out = ROOT / "benchmarks" / "results" / "plan"
    out.mkdir(parents=True, exist_ok=True)
    shutil.move(fingerprint, out / f"{args.which}.fingerprint.json")
    exp = load_experiment(ROOT / "benchmarks" / "experiments" / f"plan_{args.which}.yaml")
    run_experiment(exp)
    dest = out / args.which
    dest.mkdir(exist_ok=True)
    for name in ("results.csv", "results.md", "dice_vs_m.png"):
        shutil.copy(Path(exp.output_dir) / name, dest / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
