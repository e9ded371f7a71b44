"""Refine a folder of coarse predictions (``medssl refine``): read, refine every case, score, write.

The per-slice and per-volume mechanics are in :mod:`medssl.sam.refine`; the per-class choice of ``policy: auto``
in :mod:`medssl.sam.policy`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from medssl.config import DataConfig
from medssl.data.discover import read_item
from medssl.errors import ConfigError
from medssl.sam.inputs import write_metrics
from medssl.sam.policy import auto_config, write_policy
from medssl.sam.refine import (RefineConfig, merge_volume, plan_refinement, predict_volume, prediction_stats,
                               sam_intensity)


def refine_predictions(pred_dir: str | Path, image_source: str | Path, label_source: str | Path | None = None,
                       *, out_dir: str | Path, cfg: RefineConfig | None = None, data: DataConfig | None = None,
                       segmenter=None, progress: bool = True, validation=None) -> dict:
    """Refine every coarse label map in ``pred_dir`` (a file or a folder); write ``{case}.nii.gz`` to ``out_dir``.

    Images (and the optional ground-truth labels) are matched by case id: a dataset folder (MSD, nnU-Net
    v2), a folder of NIfTI files, or single files. Each output has the shape, affine and header of its
    coarse input. With labels, per-class 3D Dice / HD95 before and after are written to
    ``refine_metrics.json`` and ``refine_per_case.csv``; ``refine.json`` always records the settings.

    Returns ``{"cases", "stats", "config", "before", "after", "per_class"}`` (the last three only with
    labels; ``before``/``after`` are :func:`medssl.evaluation.metrics.aggregate` dicts).

    ``cfg.policy == "auto"`` needs ``validation``: the (coarse, image, label) sources of validation cases, or a
    function returning them (called once the inputs are checked). The policy per class is chosen there
    (:mod:`medssl.sam.policy`), recorded under ``"policy"`` and in ``refine_policy.md``, then applied here.
    """
    from tqdm.auto import tqdm

    from medssl.data.volume import save_like
    from medssl.evaluation.metrics import volume_scores

    cfg = cfg or RefineConfig()
    data = data or DataConfig()
    axis = data.axis if cfg.axis is None else cfg.axis
    out = Path(out_dir).expanduser()
    if Path(pred_dir).expanduser().resolve() == out.resolve():
        raise ConfigError(f"{out}: the output folder must differ from the coarse-prediction folder")
    job = plan_refinement(pred_dir, image_source, label_source, cfg, data)
    if cfg.policy == "auto" and validation is None:
        raise ConfigError("refine policy 'auto' chooses per class on validation cases, but none were given")
    validation = validation() if callable(validation) else validation
    if segmenter is None:
        from medssl.sam.engines import engine_options
        from medssl.sam.segmenter import build_segmenter

        segmenter = build_segmenter(cfg.backend, checkpoint=cfg.checkpoint, device=cfg.device,
                                    **engine_options(cfg.backend, cfg.engine))
    chosen, applied = None, cfg
    if cfg.policy == "auto":
        applied, chosen = auto_config(cfg, validation, data, segmenter, job, progress)
    n_classes = max(job.class_names) + 1
    before, after, rows, case_stats = [], [], [], {}
    t0 = time.perf_counter()
    for coarse_item, image_item, label_item in tqdm(job.pairs, desc="refine", unit="case",
                                                     disable=None if progress else True):
        coarse, image = read_item(coarse_item, "label"), read_item(image_item, "image")
        norm = sam_intensity(image.array, job.modalities[coarse_item.case_id], data)
        preds = predict_volume(norm, coarse.array, segmenter, applied, axis)
        refined = merge_volume(coarse.array, preds, applied, axis)
        save_like(refined, coarse, out / f"{coarse_item.case_id}.nii.gz", dtype=coarse.array.dtype)
        case_stats[coarse_item.case_id] = prediction_stats(preds)
        if label_item is not None:
            gt = read_item(label_item, "label").array
            b = volume_scores(coarse.array, gt, n_classes, image.spacing, axis=axis)
            a = volume_scores(refined, gt, n_classes, image.spacing, axis=axis)
            before.append(b)
            after.append(a)
            rows.append(_row(coarse_item.case_id, b, a, job.class_names))
    result: dict[str, Any] = {
        "cases": [p[0].case_id for p in job.pairs], "config": dataclasses.asdict(cfg), "axis": axis,
        "modality": job.modalities, "stats": case_stats, "seconds": round(time.perf_counter() - t0, 2)}
    if before:
        result.update(compare(before, after, job.class_names))
    if chosen is not None:
        write_policy(out, result, chosen)
    write_metrics(out, result, rows)
    return result


def compare(before: list[dict], after: list[dict], class_names: dict[int, str]) -> dict:
    """Aggregate per-case scores before and after refinement into a per-class comparison."""
    from medssl.evaluation.metrics import aggregate

    names = {c: n for c, n in class_names.items() if c != 0}
    b, a = aggregate(before, names), aggregate(after, names)
    per_class = {}
    for name in b["dice"]:
        db, da = b["dice"][name]["mean"], a["dice"][name]["mean"]
        per_class[name] = {"dice_before": db, "dice_after": da,
                           "dice_delta": None if db is None or da is None else da - db,
                           "hd95_before": b["hd95"][name]["mean"], "hd95_after": a["hd95"][name]["mean"],
                           "n": b["dice"][name]["n"]}
    return {"before": b, "after": a, "per_class": per_class}


def _row(case_id: str, b: dict, a: dict, class_names: dict[int, str]) -> dict:
    row: dict[str, Any] = {"case": case_id}
    for c in sorted(b["dice"]):
        name = class_names.get(int(c), str(c))
        row[f"dice_before_{name}"] = round(float(b["dice"][c]), 6)
        row[f"dice_after_{name}"] = round(float(a["dice"][c]), 6)
        row[f"hd95_before_{name}"] = b["hd95"][c]
        row[f"hd95_after_{name}"] = a["hd95"][c]
    return row
