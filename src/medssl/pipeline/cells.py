"""One cell of an experiment grid: pretraining (once per method and fold), fine-tuning (every ``select``
option), evaluation on the test fold, and overlay images of a few test cases for the HTML report.

``step(what)`` is called right before each piece of work that is actually done (a finished run folder is
read back, not redone), so the caller can show what a long grid is busy with.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Callable

from medssl.advise.experiment import DEFAULT as DEFAULT_SELECTION
from medssl.advise.experiment import advised_cases, cell_prefix, parse_selection
from medssl.config import load_config
from medssl.errors import ConfigError
from medssl.pipeline.experiment_config import ExperimentConfig, MethodEntry, method_entries, select_options

OVERLAY_CASES = 3  # test cases per cell drawn for the report (the first ones by case id: the same for every row)


def _quiet(_what: str) -> None:
    return None


def cell_name(method: str, fold: int, budget, seed: int, selection: str = DEFAULT_SELECTION) -> str:
    return f"{cell_prefix(method, selection)}-f{fold}-m{budget}-s{seed}"


def has_folders(out: Path, name: str) -> bool:
    """Whether cell ``name`` (or one of its ``select`` options ``name-o<i>``) has run folders in ``out``."""
    return (out / "cells" / name).exists() or any((out / "cells").glob(f"{name}-o*"))


def _run_once(runner, run_dir: Path, cfg, done: Path, step: Callable[[str], None], what: str):
    """Skip a finished run, resume a killed one, start a new one."""
    if done.is_file():
        return
    step(what)
    runner(cfg, resume=(run_dir / "config.yaml").is_file(), progress=False)


def run_cell(exp: ExperimentConfig, out: Path, entry: MethodEntry, fold: int, budget, seed: int, init,
             selection: str = DEFAULT_SELECTION, step: Callable[[str], None] = _quiet) -> tuple[dict, Path]:
    """Fine-tune one cell (every ``select`` option), keep the best on validation, evaluate it on test.

    A non-default ``selection`` labels the advisor's M patients instead of the seeded draw (medssl.advise): a new
    run gets their cases as ``split.labelled``, a started one resumes with the split it saved."""
    from medssl.engine.finetune import finetune
    from medssl.evaluation.evaluate import evaluate_run

    method, base = entry.name, entry.base or exp.base
    common = [f"data.path={exp.data}"] if exp.data else []
    name = cell_name(method, fold, budget, seed, selection)
    extra = [f"train.init={init}"] if init else []
    tried = []
    options = select_options(exp.select)
    for i, choice in enumerate(options):
        opt_name = name + (f"-o{i}" if exp.select else "")
        run_dir = out / "cells" / opt_name
        overrides = [*common, *exp.finetune, *entry.overrides, *entry.finetune, *extra, *choice,
                     f"output_dir={out / 'cells'}", f"name={opt_name}", f"split.fold={fold}",
                     f"split.budget={budget}", f"split.budget_seed={seed}", f"train.seed={seed}"]
        cfg = load_config(base, overrides=overrides)
        if selection != DEFAULT_SELECTION and not (run_dir / "config.yaml").is_file():
            cases = advised_cases(cfg, selection, _advise_features(exp, out, selection, fold), seed,
                                  out / "advise", out / "advise" / f"{opt_name}.csv")
            cfg = load_config(base, overrides=[*overrides, f"split.labelled={json.dumps(cases)}"])
        what = "fine-tuning" + (f", option {i + 1} of {len(options)}" if exp.select else "")
        _run_once(finetune, run_dir, cfg, run_dir / "train_state.json", step, what)
        state = json.loads((run_dir / "train_state.json").read_text())
        tried.append((state["best_score"], -i, run_dir, choice))
    val_score, _, run_dir, choice = max(tried)  # validation Dice only; the first on ties
    split = json.loads((run_dir / "splits.json").read_text())
    shown = sorted(split["test"])[:OVERLAY_CASES] if selection == DEFAULT_SELECTION else []
    evaluate = not (run_dir / "metrics.json").is_file()
    if evaluate:
        step("evaluating")
        evaluate_run(run_dir, progress=False, save_cases=shown)
    m = json.loads((run_dir / "metrics.json").read_text())
    row = {"method": method, "fold": fold, "budget": budget, "M": split["budget_m"], "seed": seed,
           "dice_mean": m["dice_mean"], "hd95_mean": m["hd95_mean"], "micro_dice": m["micro_dice"]["mean"],
           "n_test": m["n_cases"], "val_dice": round(float(val_score), 6)}
    if exp.select:
        row["choice"] = " ".join(choice)
    if exp.selection != [DEFAULT_SELECTION]:
        row["selection"] = selection
    if exp.legacy_metrics:
        row["slice_mean_dice"] = m["slice_mean_dice"]["mean"]
    if shown and not (run_dir / "overlays" / "overlays.json").is_file():
        if not evaluate:  # a cell evaluated before overlays existed
            step("overlay images")
        save_overlays(run_dir, shown, {k: row[k] for k in ("method", "fold", "budget", "M", "seed")})
    return row, run_dir


def _case_dice(run_dir: Path) -> dict[str, float]:
    path = run_dir / "per_case.csv"
    if not path.is_file():
        return {}
    with open(path, newline="") as fh:
        return {r["case"]: float(r["dice_mean"]) for r in csv.DictReader(fh) if r.get("dice_mean") not in (None, "")}


def save_overlays(run_dir: Path, cases: list[str], meta: dict) -> Path:
    """``<run>/overlays/<case>.png`` (image, ground-truth and predicted contours on the mid-structure slice) and
    ``overlays.json`` for ``cases`` of a fine-tuning run; predictions missing from ``<run>/predictions`` are made
    with the run's best checkpoint first."""
    from medssl.data.atomic import write_json
    from medssl.data.layouts import open_data
    from medssl.data.readers import read_case, read_volume
    from medssl.engine.runs import RunDir
    from medssl.evaluation.evaluate import predict_files, run_checkpoint
    from medssl.report.overlays import mid_slice, overlay_png

    run = RunDir(run_dir)
    cfg = run.saved_config()
    pred_dir = run.path / "predictions"
    missing = [c for c in cases if not (pred_dir / f"{c}.nii.gz").is_file()]
    if missing:
        predict_files(run_checkpoint(run.path), cfg.data.path, pred_dir, cases=missing, progress=False)
    info = open_data(cfg.data)
    dice, axis, shown = _case_dice(run.path), cfg.data.axis, []
    for case in cases:
        image, label = read_case(info.case(case), info)
        if label is None:
            continue
        pred = read_volume(pred_dir / f"{case}.nii.gz", role="label")
        z = mid_slice(label.array, axis)
        png = run.path / "overlays" / f"{case}.png"
        overlay_png(image.array, label.array, pred.array, axis, z, png, spacing=image.spacing)
        shown.append({"case": case, "png": png.name, "axis": axis, "slice": z, "dice": dice.get(case)})
    return write_json(run.path / "overlays" / "overlays.json", {**meta, "cases": shown})


def _advise_features(exp: ExperimentConfig, out: Path, selection: str, fold: int) -> str | None:
    """The checkpoint whose encoder embeds the patients for ``STRATEGY@ROW`` (None: intensity statistics)."""
    source = parse_selection(selection)[1]
    if source == "intensity":
        return None
    return str(pretrained(exp, out, {e.name: e for e in method_entries(exp)}[source], fold))


def pretrained(exp: ExperimentConfig, out: Path, entry: MethodEntry, fold: int,
               step: Callable[[str], None] = _quiet) -> Path | None:
    """The checkpoint a row's cells start from in this fold: its own ``init``, a pretraining run, or none."""
    from medssl.engine.pretrain import pretrain

    if entry.init:
        init = Path(entry.init.replace("{fold}", str(fold))).expanduser()
        if not init.is_file():
            raise ConfigError(f"methods[{entry.name}].init: checkpoint not found: {init}")
        return init
    if entry.method == "random":
        return None
    name = f"{entry.name}-f{fold}"
    common = [f"data.path={exp.data}"] if exp.data else []
    cfg = load_config(entry.base or exp.base,
                      overrides=[*common, *exp.pretrain, *entry.overrides, *entry.pretrain,
                                 f"output_dir={out / 'pretrain'}", f"name={name}",
                                 f"pretrain.method={entry.method}", f"split.fold={fold}"])
    run_dir = out / "pretrain" / name
    _run_once(pretrain, run_dir, cfg, run_dir / "train_state.json", step, f"pretraining {entry.method}")
    return run_dir / "checkpoints" / "last.pt"
