"""Snapshot a running (or finished) ``medssl experiment`` into the repository: results.csv, a results.md with the
paired table as far as the grid got, and the plot.

    python benchmarks/experiment_snapshot.py runs/hippocampus_ssl benchmarks/results/hippocampus_ssl

``medssl experiment`` writes results.csv as cells finish but results.md and the plot only at the end; a grid
that runs across sessions is committed from here in between. The header names the commit each run was
trained with (from the run folders), the cells done and the wall time so far.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import yaml

from medssl.pipeline.experiment import read_results
from medssl.report.tables import results_table, save_plot


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("dest", type=Path)
    args = ap.parse_args()
    src = args.run / "results.csv"
    if not src.is_file():
        raise SystemExit(f"{src}: no results yet")
    rows = read_results(src)
    exp = yaml.safe_load((args.run / "experiment.yaml").read_text())
    commits = set()
    for env in args.run.glob("*/*/environment.json"):
        git = json.loads(env.read_text()).get("git") or {}
        commits.add(str(git.get("commit", "unknown"))[:12] + (" (dirty)" if git.get("dirty") else ""))
    stamps = [p.stat().st_mtime for p in args.run.glob("*/*/config.yaml")]
    wall = (max(stamps) - min(stamps)) / 3600 if stamps else 0.0
    args.dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, args.dest / "results.csv")
    shutil.copyfile(args.run / "experiment.yaml", args.dest / "experiment.yaml")
    n_cells = len(rows)
    header = [f"# {args.run.name}: as far as the grid got ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
              f"- {n_cells} cells of {len(exp['methods'])} rows x {len(exp['budgets'])} budgets x "
              f"{len(exp['seeds'])} seeds x {len(exp['folds'])} folds; wall time so far {wall:.1f} h on this machine",
              f"- trained with commit(s) {', '.join(sorted(commits)) or 'unknown'}; command `medssl experiment -c "
              f"{exp.get('name', args.run.name)}` (resumes)",
              f"- fine-tuning choices made on validation: {exp.get('select') or 'none'} (column `choice`)", "", ""]
    (args.dest / "results.md").write_text("\n".join(header) + results_table(rows, reference=exp.get(
        "reference", "random")) + "\n")
    save_plot(rows, args.dest / "dice_vs_m.png", reference=exp.get("reference", "random"))
    print(f"{n_cells} cells -> {args.dest}")


if __name__ == "__main__":
    sys.exit(main())
