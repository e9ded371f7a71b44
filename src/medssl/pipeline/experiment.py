"""``medssl experiment CONFIG.yaml``: methods x label budgets x seeds x folds, under one protocol.

    base: hippocampus                 # preset or file every run starts from
    data: ../shared/data/Task04_Hippocampus
    output_dir: runs/exp
    methods: [random, simclr, pcl]    # "random" = no pretraining
    # an entry may also be a mapping: a display name, the pretraining method (or random) and overrides
    # applied to both its pretraining and its cells, e.g. another backbone:
    #   - {name: kaf-random, method: random, base: kaf_hippocampus}
    budgets: [1, 2, 5]
    seeds: [0, 1, 2]
    folds: [0]
    pretrain: ["train.epochs=20"]     # dotted overrides for the pretraining runs
    finetune: ["train.epochs=20"]     # dotted overrides for the fine-tuning cells

``medssl experiment hippocampus_cpu`` runs a packaged experiment preset
(``medssl/configs/experiments/*.yaml``). Each method is pretrained once per fold (cached in ``pretrain/``); every cell fine-tunes with
``train.seed = split.budget_seed = seed``, selects on the validation patients and is evaluated on the
test fold. Finished runs are skipped and a killed run is resumed, so a killed experiment continues
where it stopped. A cell already in ``output_dir/results.csv`` is not trained again even when its run folders
are gone, provided the protocol is the same (:func:`~medssl.pipeline.results.previous_rows`); rows outside the
current grid are kept.
Outputs: ``results.csv``, ``results.md`` (mean ± sd per method and M, with a paired Wilcoxon test and a
bootstrap CI of each method against random init), ``dice_vs_m.png`` and ``report.html`` (the tables, the plot and
overlay images of a few test cases per method, one self-contained page; :mod:`medssl.report.html`, rebuilt by
``medssl report OUTPUT_DIR``). Each evaluated cell draws its first test cases (by case id) into
``<cell>/overlays/``. While it runs, one line per step of each cell says which cell of how many, what it is
doing, the time elapsed and the estimated time left (:class:`medssl.report.console.GridProgress`).

``select: {KEY: [values]}`` trains every cell once per combination and keeps the best on validation.
``selection: [seeded, kcenter, typical@pcl]`` adds cells whose labelled patients come from the label-budget
advisor (:mod:`medssl.advise`) instead of the seeded draw, paired with the seeded cells.

With ``sam_methods`` set, each listed method's cells also get a "+SAM" row: the cell's test predictions are
refined with LiteMedSAM box prompts (:mod:`medssl.pipeline.sam_step`, settings in ``sam``) and scored
against the same cases before and after, in ``results_sam.csv`` / ``results_sam.md``::

    sam_methods: [random, pcl]
    sam_budgets: [1, 2]
    sam_cases: 20                     # first 20 test cases of each cell (0 = all)
    sam: {merge: replace, iou_threshold: 0.0, box_pad: 0}

``sam: {policy: auto}`` chooses the merge policy per class on each cell's validation patients (keep the coarse
mask unless a policy beats it there; :mod:`medssl.sam.policy`); the refined row is then "<method>+SAM (auto)"
with the choice per class, and ``results_sam.md`` adds the per-class paired differences and the choices.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from medssl.advise.experiment import DEFAULT as DEFAULT_SELECTION
from medssl.data.atomic import write_text
from medssl.pipeline.cells import cell_name, has_folders, pretrained, run_cell
from medssl.pipeline.experiment_config import (EXPERIMENT_PRESETS, ExperimentConfig, MethodEntry,
                                               load_experiment, method_entries, select_options, wants_sam)
from medssl.pipeline.results import previous_rows, read_results, row_key, write_results
from medssl.pipeline.sam_step import sam_rows as refine_cell
from medssl.report.console import GridProgress
from medssl.report.html import write_report
from medssl.report.tables import results_table, sam_table, save_plot

__all__ = ["EXPERIMENT_PRESETS", "ExperimentConfig", "MethodEntry", "PlannedCell", "load_experiment", "method_entries",
           "plan_cells", "read_results", "run_experiment", "select_options"]


@dataclass
class PlannedCell:
    """One cell of the grid in run order; ``earlier`` is its row when it is taken from the earlier results.csv."""

    fold: int
    entry: MethodEntry
    budget: object
    seed: int
    selection: str
    earlier: dict | None = None

    @property
    def label(self) -> str:
        name = self.entry.name + ("" if self.selection == DEFAULT_SELECTION else f" [{self.selection}]")
        return f"{name} fold {self.fold} M={self.budget} seed {self.seed}"


def plan_cells(exp: ExperimentConfig, out: Path, earlier: dict[tuple, dict], progress_print=print
               ) -> list[PlannedCell]:
    """Every cell in run order (fold, method, selection, budget, seed), with the earlier rows it reuses.

    A cell already in results.csv whose run folders are gone is taken from there (its "+SAM" row needs the
    folders, so a seeded cell of a ``sam_methods`` row is not)."""
    plan = []
    for fold in exp.folds:
        for entry in method_entries(exp):
            method = entry.name
            cells = [(b, s, sel) for sel in exp.selection for b in exp.budgets for s in exp.seeds]
            reuse = {c for c in cells if (method, fold, str(c[0]), c[1], c[2]) in earlier
                     and not (c[2] == DEFAULT_SELECTION and wants_sam(exp, method, c[0]))
                     and not has_folders(out, cell_name(method, fold, c[0], c[1], c[2]))}
            if reuse:
                progress_print(f"{method} fold {fold}: {len(reuse)} cell(s) taken from the earlier results.csv")
            for budget, seed, sel in cells:
                old = earlier[(method, fold, str(budget), seed, sel)] if (budget, seed, sel) in reuse else None
                plan.append(PlannedCell(fold, entry, budget, seed, sel, old))
    return plan


def _not_in(earlier: dict[tuple, dict], rows: list[dict]) -> list[dict]:
    """The earlier rows whose cell is not among ``rows``."""
    visited = {row_key(r) for r in rows}
    return [r for k, r in earlier.items() if k not in visited]


def run_experiment(exp: ExperimentConfig, progress_print=print, console=None) -> list[dict]:
    """Run (or resume) the grid; write results.csv, results.md, dice_vs_m.png, results_sam.* and report.html.

    ``progress_print`` gets the rows as they finish and notes about reused rows; ``console`` (a
    :class:`rich.console.Console`, default stdout) shows which cell runs, what it does and the time left."""
    out = Path(exp.output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    earlier = previous_rows(exp, out)
    write_text(out / "experiment.yaml", yaml.safe_dump(dataclasses.asdict(exp), sort_keys=False))
    plan = plan_cells(exp, out, earlier, progress_print)
    rows, sam_rows, inits = [], [], {}
    with GridProgress(len(plan), done=sum(c.earlier is not None for c in plan), console=console) as progress:
        for i, cell in enumerate(plan, 1):
            if cell.earlier is not None:
                old = cell.earlier
                rows.append(old if exp.selection == [DEFAULT_SELECTION] else {**old, "selection": cell.selection})
                continue
            progress.start(i, cell.label)
            key = (cell.fold, cell.entry.name)
            if key not in inits:
                inits[key] = pretrained(exp, out, cell.entry, cell.fold, step=progress.step)
            row, run_dir = run_cell(exp, out, cell.entry, cell.fold, cell.budget, cell.seed, inits[key],
                                    cell.selection, step=progress.step)
            rows.append(row)
            # as cells finish, with every earlier row not yet passed: a killed grid loses no row, ours or older
            write_results(out / "results.csv", rows + _not_in(earlier, rows))
            progress_print(json.dumps(row))
            if cell.selection == DEFAULT_SELECTION and wants_sam(exp, cell.entry.name, cell.budget):
                progress.step("+SAM")
                sam_rows += refine_cell(exp, run_dir, row)
                progress_print(json.dumps(sam_rows[-1]))
            progress.finish()
    kept = _not_in(earlier, rows)  # cells of an earlier, larger grid: never lost
    if kept:
        progress_print(f"{len(kept)} row(s) of cells outside this grid kept from the earlier results.csv")
        rows += kept
    write_results(out / "results.csv", rows)
    shown = [{**r, "method": f"{r['method']} [{r['selection']}]"} if r.get("selection") not in (None, "",
             DEFAULT_SELECTION) else r for r in rows]  # a selection is its own row in the tables
    write_text(out / "results.md", results_table(shown, reference=exp.reference, controls=exp.controls) + "\n")
    save_plot(shown, out / "dice_vs_m.png", reference=exp.reference)
    if sam_rows:
        write_results(out / "results_sam.csv", sam_rows)
        write_text(out / "results_sam.md", sam_table(sam_rows) + "\n")
    write_report(out)
    return rows
