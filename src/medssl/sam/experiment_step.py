"""The "+SAM" post-step of an experiment cell: predict the test cases of a fine-tuning run, refine the
predictions with box prompts, and score both against the labels.

    from medssl.sam.experiment_step import refine_run, sam_row
    result = refine_run(run_dir)                 # -> <run>/sam/{coarse,refined}/, <run>/metrics_sam.json
    row.update(sam_row(result))                  # dice_mean_coarse, dice_mean_sam, hd95_mean_sam, ...

A finished step (``metrics_sam.json`` present, same settings) is read back instead of recomputed, so a
killed experiment resumes cheaply. The coarse predictions come from :func:`medssl.evaluation.evaluate.
predict_files` with the run's checkpoint -- the same predictions ``medssl evaluate`` scores.

With ``policy="auto"`` the run's validation cases are predicted the same way (``<out>/validation/coarse``) and
the policy per class is chosen on them (:mod:`medssl.sam.policy`) before the test cases are refined; the
choice is in the result under ``"policy"`` and in :func:`sam_row`'s ``sam_policy``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from medssl.data.splits import load_split
from medssl.engine.runs import RunDir
from medssl.errors import ConfigError
from medssl.sam.inputs import write_json
from medssl.sam.refine import RefineConfig
from medssl.sam.refine_folder import refine_predictions

METRICS_FILE = "metrics_sam.json"


def refine_run(run_dir: str | Path, cfg: RefineConfig | None = None, *, part: str = "test",
               checkpoint: str = "best", cases: list[str] | None = None, out_dir: str | Path | None = None,
               segmenter=None, progress: bool = False, force: bool = False) -> dict:
    """Predict ``part`` of a run's split with its ``checkpoint``, refine, and score before/after.

    ``cases`` restricts the run to a subset of that part (e.g. for a quick benchmark). Writes
    ``<out_dir>/coarse/*.nii.gz``, ``<out_dir>/refined/*.nii.gz`` (+ ``refine_metrics.json``,
    ``refine_per_case.csv``) with ``out_dir`` defaulting to ``<run>/sam``, and the result dict to
    ``<run>/metrics_sam.json``. Returns that dict (see :func:`medssl.sam.refine_folder.refine_predictions`),
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
        from medssl.sam.policy import run_validation

        validation = run_validation(run.path, out / "validation" / "coarse", checkpoint=checkpoint, progress=progress)
    ckpt = run_checkpoint(run.path, checkpoint)
    predict_files(ckpt, saved.data.path, out / "coarse", cases=part_cases, progress=progress)
    result = refine_predictions(out / "coarse", saved.data.path, saved.data.path, out_dir=out / "refined", cfg=cfg,
                                data=saved.data, segmenter=segmenter, progress=progress, validation=validation)
    result.update(settings)
    result["run"] = str(run.path)
    write_json(metrics_path, result)
    return result


def sam_row(result: dict) -> dict:
    """Flat columns for an experiment results row: mean 3D Dice / HD95 before and after refinement."""
    if "before" not in result:
        return {}
    b, a = result["before"], result["after"]
    row = {"dice_mean_coarse": b["dice_mean"], "dice_mean_sam": a["dice_mean"],
           "hd95_mean_coarse": b["hd95_mean"], "hd95_mean_sam": a["hd95_mean"]}
    if "policy" in result:
        row["sam_policy"] = " ".join(f"{name}={d['choice']}" for name, d in result["policy"]["classes"].items())
    return row
