"""Snapshot a running (or finished) ``medssl experiment`` into the repository: results.csv, a results.md with the
paired table as far as the grid got, and the plot.

    python benchmarks/experiment_snapshot.py runs/hippocampus_ssl benchmarks/results/hippocampus_ssl \\
        --grid benchmarks/results/hippocampus_ssl/experiment.yaml

``medssl experiment`` writes results.csv as cells finish but results.md and the plot only at the end; a grid
that runs across sessions is committed from here in between. The header names, per fold, the rows done, the
commits, the machine and the hours (from the run folders' environment.json; ``provenance.json`` beside the results
keeps what folders no longer on disk recorded), and the cells done.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

import yaml

from medssl.data.atomic import write_json
from medssl.pipeline.experiment import read_results
from medssl.report.tables import results_table, save_plot


FOLDER = re.compile(r"^(?P<row>.+)-f(?P<fold>\d+)(?:-m\d+-s\d+(?:-o\d+)?)?$")


def union(spans: list, gap: float = 0) -> list[list[int]]:
    """[start, end] intervals merged where they overlap or lie at most ``gap`` apart (the hours a set of run folders
    took, each counted once)."""
    out: list[list[int]] = []
    for a, b in sorted(spans):
        if out and a - out[-1][1] <= gap:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


IDLE_GAP_S = 3600  # nothing written this long, outside a running process, is idle time (killed, resumed later)
EVENTS = re.compile(r"^events\.out\.tfevents\.(?P<start>\d+)\.")  # TensorBoard: one file per process, named by its start


def active_spans(files: list[tuple[str, float]], gap: float = IDLE_GAP_S) -> list[list[int]]:
    """(name, mtime) of one run folder's files → the [start, end] spans it was being written. A TensorBoard event
    file covers its process from the start time in its name to its last write (a long epoch writes nothing else);
    other files are points. Spans further apart than ``gap`` stay apart, so a cell killed at a session's end and
    resumed the next day does not count the night."""
    parts = []
    for name, t in files:
        m = EVENTS.match(name)
        parts.append([round(min(int(m["start"]), t)) if m else round(t), round(t)])
    return union(parts, gap)


def provenance(run: Path, previous: Path) -> dict:
    """Per ``<row>-f<fold>``: the commits, the machine and the [start, end] spans (epoch seconds) of its run
    folders (pretraining and cells), from their environment.json and file times (:func:`active_spans`); entries of
    folders no longer on disk are kept from ``previous``. An earlier entry recorded by hand (no spans: its folders
    were gone) is merged with, not replaced by, folders found later under the same name (e.g. a pretraining redone
    for another benchmark): its cells came from the recorded run."""
    out = json.loads(previous.read_text()) if previous.is_file() else {}
    found: dict[str, dict] = {}
    for env_path in sorted(run.glob("*/*/environment.json")):
        m = FOLDER.match(env_path.parent.name)
        if not m:
            continue
        env = json.loads(env_path.read_text())
        git = env.get("git") or {}
        cpu = (env.get("machine") or {}).get("cpu")
        entry = found.setdefault(f"{m['row']}-f{m['fold']}", {"commits": set(), "machines": set(), "t": []})
        entry["commits"].add(str(git.get("commit") or "unknown")[:12] + (" (dirty)" if git.get("dirty") else ""))
        entry["machines"].add(f"{cpu['model']} ({cpu['logical_cpus']} CPUs; {', '.join(cpu['features'])})" if cpu
                              else "machine not recorded")
        files = [(p.name, p.stat().st_mtime) for p in env_path.parent.rglob("*")  # overlays may be redrawn later
                 if p.is_file() and "overlays" not in p.relative_to(env_path.parent).parts]
        entry["t"] += active_spans(files)
    for key, e in found.items():
        machine = "; ".join(sorted(e["machines"]))
        before = out.get(key, {})
        if machine == "machine not recorded" and before:  # run folders older than environment.json's machine
            machine = before["machine"]
        now = {"commits": sorted(e["commits"]), "machine": machine, "spans": union(e["t"])}
        hand_record = before and not before.get("spans")  # its folders were gone: keep it, file these beside it
        out[key] = {**before, "later_folders": now} if hand_record else now
    return dict(sorted(out.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("dest", type=Path)
    ap.add_argument("--grid", type=Path, help="the whole grid's experiment file (default: the run's experiment.yaml, "
                    "which a run of a subset of the grid replaces with the subset)")
    args = ap.parse_args()
    src = args.run / "results.csv"
    if not src.is_file():
        raise SystemExit(f"{src}: no results yet")
    rows = read_results(src)
    grid = args.grid or args.run / "experiment.yaml"
    exp = yaml.safe_load(grid.read_text())
    prov = provenance(args.run, args.dest / "provenance.json")
    args.dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, args.dest / "results.csv")
    if grid.resolve() != (args.dest / "experiment.yaml").resolve():
        shutil.copyfile(grid, args.dest / "experiment.yaml")
    write_json(args.dest / "provenance.json", prov)
    n_cells = len(rows)
    names = [m if isinstance(m, str) else m.get("name", m.get("method")) for m in exp["methods"]]
    rows.sort(key=lambda r: names.index(r["method"]) if r["method"] in names else len(names))  # the grid's order
    header = [f"# {args.run.name}: as far as the grid got ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
              f"- {n_cells} cells of {len(names)} rows x {len(exp['budgets'])} budgets x "
              f"{len(exp['seeds'])} seeds x {len(exp['folds'])} folds; command `medssl experiment -c "
              f"{exp.get('name', args.run.name)}` (resumes)",
              f"- fine-tuning choices made on validation: {exp.get('select') or 'none'} (column `choice`)",
              "- per fold: the rows run, the commit(s), the machine, and the wall hours its run folders were being "
              "written (overlaps counted once; includes time slowed by other jobs on the machine). Where a fold "
              "lists two machines, its pairs may mix them (e.g. bf16 and fp32 training):"]
    for fold in sorted({r["fold"] for r in rows}):
        done = [n for n in names if any(r["method"] == n and r["fold"] == fold for r in rows)]
        entries = [prov.get(f"{n}-f{fold}") for n in done]
        known = [e for e in entries if e]
        commits = sorted({c for e in known for c in e["commits"]})
        machines = sorted({e["machine"] for e in known})
        timed = [e for e in known if e.get("spans")]  # entries recorded by hand have no spans
        seconds = sum(b - a for a, b in union([s for e in timed for s in e["spans"]]))
        hours = (f"{seconds / 3600:.1f} h" + (f" ({len(done) - len(timed)} rows not timed)" if len(timed) < len(done)
                                              else "")) if timed else "not timed"
        later = [n for n, e in zip(done, entries) if e and "later_folders" in e]
        rerun = (f"; run folders of {', '.join(later)} on disk were written after the hand-recorded runs "
                 "(provenance.json: later_folders)") if later else ""
        header.append(f"  - fold {fold}: {', '.join(done)}; commit(s) {', '.join(commits) or 'not recorded'}; "
                      f"{'; '.join(machines) or 'machine not recorded'}; {hours}{rerun}")
    header += ["", ""]
    (args.dest / "results.md").write_text("\n".join(header) + results_table(rows, reference=exp.get(
        "reference", "random"), controls=exp.get("controls")) + "\n")
    save_plot(rows, args.dest / "dice_vs_m.png", reference=exp.get("reference", "random"))
    print(f"{n_cells} cells -> {args.dest}")


if __name__ == "__main__":
    sys.exit(main())
