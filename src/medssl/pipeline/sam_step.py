"""The "+SAM" post-step of an experiment cell: predict the test cases of a fine-tuning run, refine the
predictions with box prompts, and score both against the labels.

    from medssl.pipeline.sam_step import refine_run, sam_rows
    result = refine_run(run_dir)                 # -> <run>/sam/{coarse,refined}/, <run>/metrics_sam.json
    rows = sam_rows(exp, run_dir, row)           # in an experiment: refine_run, then a coarse and a "+SAM" row

A finished step (``metrics_sam.json`` present, same settings) is read back instead of recomputed, so a
killed experiment resumes cheaply. The coarse predictions come from :func:`medssl.evaluation.evaluate.
predict_files` with the run's checkpoint -- the same predictions ``medssl evaluate`` scores.

With ``policy="auto"`` the run's validation cases are predicted the same way (``<out>/validation/coarse``,
:func:`run_validation`) and the policy per class is chosen on them (:mod:`medssl.sam.policy`) before the test
cases are refined; the choice is in the result under ``"policy"`` and in :func:`sam_rows`' ``choice_<class>``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

from medssl.data.atomic import write_json
from medssl.data.splits import load_split
from medssl.engine.runs import RunDir
from medssl.errors import ConfigError, DataError
from medssl.pipeline.refine import refine_predictions
from medssl.sam.refine import RefineConfig

if TYPE_CHECKING:
    from medssl.pipeline.experiment_config import ExperimentConfig

METRICS_FILE = "metrics_sam.json"


def refine_run(run_dir: str | Path, cfg: RefineConfig | None = None, *, part: str = "test",
               checkpoint: str = "best", cases: list[str] | None = None, out_dir: str | Path | None = None,
               segmenter=None, progress: bool = False, force: bool = False) -> dict:
    """Predict ``part`` of a run's split with its ``checkpoint``, refine, and score before/after.

    ``cases`` restricts the run to a subset of that part (e.g. for a quick benchmark). Writes
    ``<out_dir>/coarse/*.nii.gz``, ``<out_dir>/refined/*.nii.gz`` (+ ``refine_metrics.json``,
    ``refine_per_case.csv``) with ``out_dir`` defaulting to ``<run>/sam``, and the result dict to
    ``<run>/metrics_sam.json``. Returns that dict (see :func:`medssl.pipeline.refine.refine_predictions`),
    plus ``run``, ``part``, ``checkpoint``.
    """
    from medssl.evaluation.evaluate import predict_files, run_checkpoint

    cfg = cfg or RefineConfig()
    cfg.validate()
    run = RunDir(run_dir)
    saved = run.saved_config()
    split = load_split(run.path / "splits.json")
    part_cases = list(getattr(split, part, None) or [])
    if not part_cases:
        raise ConfigError(f"{run.path}: split part '{part}' is empty or unknown")
    if cases is not None:
        unknown = sorted(set(cases) - set(part_cases))
        if unknown:
            raise ConfigError(f"{run.path}: cases {unknown[:3]} are not in split part '{part}'")
        part_cases = [c for c in part_cases if c in set(cases)]
    settings = {"config": dataclasses.asdict(cfg), "part": part, "checkpoint": checkpoint, "cases": part_cases}
    metrics_path = run.path / METRICS_FILE
    if not force and metrics_path.is_file():
        old = json.loads(metrics_path.read_text())
        # options added after a result was written had their default value then
        old_cfg = {**dataclasses.asdict(RefineConfig()), **(old.get("config") or {})}
        if {**{k: old.get(k) for k in settings}, "config": old_cfg} == settings:
            return old
    out = Path(out_dir).expanduser() if out_dir is not None else run.path / "sam"
    validation = None
    if cfg.policy == "auto":
        validation = run_validation(run.path, out / "validation" / "coarse", checkpoint=checkpoint, progress=progress)
    ckpt = run_checkpoint(run.path, checkpoint)
    predict_files(ckpt, saved.data.path, out / "coarse", cases=part_cases, progress=progress)
    result = refine_predictions(out / "coarse", saved.data.path, saved.data.path, out_dir=out / "refined", cfg=cfg,
                                data=saved.data, segmenter=segmenter, progress=progress, validation=validation)
    result.update(settings)
    result["run"] = str(run.path)
    write_json(metrics_path, result, nan_as_null=True)
    return result


def run_validation(run_dir, out_dir, *, checkpoint: str = "best", progress: bool = False) -> tuple[Path, str, str]:
    """Predict a fine-tuning run's validation cases with its model into ``out_dir``.

    Returns the ``validation`` triple for :func:`medssl.pipeline.refine.refine_predictions` (coarse, images,
    labels). A run without validation cases, or without labels for them, is a one-line ConfigError naming the run.
    """
    from medssl.data.discover import find_volumes
    from medssl.evaluation.evaluate import predict_files, run_checkpoint

    run = RunDir(run_dir)
    val = sorted(load_split(run.path / "splits.json").val or [])
    if not val:
        raise ConfigError(f"{run.path}: refine policy 'auto' chooses on the run's validation patients, "
                          "but its splits.json lists none")
    saved = run.saved_config()
    try:
        labels = find_volumes(saved.data.path, "label")
    except DataError:
        labels = {}
    missing = [c for c in val if c not in labels]
    if missing:
        raise ConfigError(f"{run.path}: refine policy 'auto' needs labels for the validation cases; "
                          f"{len(missing)} of {len(val)} have none ({', '.join(missing[:3])})")
    out = Path(out_dir).expanduser()
    for stale in out.glob("*.nii.gz") if out.is_dir() else []:
        if stale.name[:-len(".nii.gz")] not in val:
            stale.unlink()
    predict_files(run_checkpoint(run.path, checkpoint), saved.data.path, out, cases=val, progress=progress)
    return out, saved.data.path, saved.data.path


def sam_rows(exp: ExperimentConfig, run_dir: Path, row: dict) -> list[dict]:
    """The "+SAM" post-step of one experiment cell: a coarse row and a refined row, scored on the same test cases.

    With ``sam: {policy: auto}`` the refined row is "<method>+SAM (auto)" and records, per class, the policy
    chosen on the cell's validation patients (``choice_<class>``) with its and keep's validation Dice."""
    from medssl.pipeline.experiment_config import refine_config

    cases = None
    if exp.sam_cases:
        cases = sorted(json.loads((run_dir / "splits.json").read_text())["test"])[:exp.sam_cases]
    rc = refine_config(exp)
    result = refine_run(run_dir, rc, cases=cases)
    refined = f"{row['method']}+SAM" + (" (auto)" if rc.policy == "auto" else "")
    out = []
    for name, when in ((row["method"], "before"), (refined, "after")):
        r = {k: row[k] for k in ("fold", "budget", "M", "seed")}
        r.update(method=name, dice_mean=result[when]["dice_mean"], hd95_mean=result[when]["hd95_mean"],
                 n_test=len(result["cases"]))
        for cls, pc in result["per_class"].items():
            r[f"dice_{cls}"] = pc[f"dice_{when}"]
        if when == "after" and "policy" in result:
            r["n_val"] = len(result["policy"]["validation_cases"])
            for cls, d in result["policy"]["classes"].items():
                r[f"choice_{cls}"] = d["choice"]
                r[f"val_keep_{cls}"] = round(d["val_dice_keep"], 6)
                r[f"val_choice_{cls}"] = round(d["val_dice_choice"], 6)
        out.append(r)
    return out
