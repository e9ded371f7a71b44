"""Per-class merge policies for SAM refinement, and their choice on validation cases (``policy: auto``).

A policy says what happens to one class's coarse mask M on the slices where it is prompted (S = the union of
the class's accepted SAM masks, :mod:`medssl.sam.refine`):

* ``keep``: M unchanged (the class is not prompted at all);
* ``replace``: S;  ``intersect``: M & S;  ``union``: M | S;
* ``gate<t>`` (e.g. ``gate0.8``): the predicted-IoU gate -- each prompt's SAM mask where its predicted IoU
  is >= t, else that prompt's coarse pixels (``replace`` with ``iou_threshold=t``);
* the prefix ``component-`` (``component-union``, ``component-gate0.8``...): one box per 8-connected
  component of the class mask on the slice instead of one box around all of it.

``policy: auto`` (:func:`choose_policies`) tries keep and every candidate (default :data:`DEFAULT_CANDIDATES`)
on **validation** cases only: one SAM pass per case serves all candidates (every box mode's boxes share the
slice embedding); each class is scored with every other class left coarse, by its 3D Dice per case (MONAI;
a class empty in both prediction and label counts 1.0), averaged over the validation cases. The rule
(:data:`RULE`): the best candidate (the first in candidate order on ties) is chosen only when its mean
beats keep's by more than ``auto_margin``; otherwise -- ties included -- the class keeps its coarse mask.
The choice, keep's and every candidate's validation Dice are recorded (``refine.json``,
``refine_metrics.json``, ``refine_policy.md``); then the chosen policies are applied to the test cases
(``RefineConfig.class_policies``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice

from medssl.errors import ConfigError
from medssl.sam.policy_names import DEFAULT_CANDIDATES, KEEP, RULE, Policy, candidates_of, parse_policy  # noqa: F401
from medssl.sam.refine import (RefineConfig, SlicePrediction, merge_slice, plan_refinement, predict_volume_multi,
                               sam_intensity)

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------- scoring
def class_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """3D Dice of two boolean masks (MONAI ``compute_dice``; both empty = 1.0, one empty = 0.0)."""
    p = torch.from_numpy(np.ascontiguousarray(pred, dtype=bool))[None, None]
    t = torch.from_numpy(np.ascontiguousarray(truth, dtype=bool))[None, None]
    return float(compute_dice(p, t, include_background=True, ignore_empty=False)[0, 0])


def only_class(pred, c: int):
    """One slice's :class:`~medssl.sam.refine.SlicePrediction` restricted to class ``c`` (None if c has no prompt)."""

    if pred is None:
        return None
    idx = [i for i, p in enumerate(pred.prompts) if p.cls == c]
    if not idx:
        return None
    return SlicePrediction([pred.prompts[i] for i in idx], pred.masks[idx], pred.iou[idx],
                           {k: v for k, v in pred.passthrough.items() if k == c})


def candidate_scores(coarse: np.ndarray, gt: np.ndarray, preds: dict, classes: Sequence[int],
                     candidates: Sequence[Policy], overlap: str, axis: int) -> dict[int, dict[str, float]]:
    """Per class: the 3D Dice of keep and of every candidate on one case, the other classes left coarse.

    ``preds`` maps a box mode to that mode's per-slice predictions (:func:`~medssl.sam.refine.predict_volume_multi`).
    """
    from medssl.data.slicing import volume_slices

    lab, truth = volume_slices(coarse, axis), volume_slices(gt, axis)
    out: dict[int, dict[str, float]] = {}
    for c in classes:
        base, t = lab == c, truth == c
        scores = {KEEP: class_dice(base, t)}
        own = {b: [(z, only_class(s, c)) for z, s in enumerate(pr)] for b, pr in preds.items()}
        for p in candidates:
            sub = [(z, s) for z, s in own[p.box_mode] if s is not None]
            if not sub:  # never prompted: identical to keep
                scores[p.name] = scores[KEEP]
                continue
            cfg = RefineConfig(box_mode=p.box_mode, merge=p.merge, iou_threshold=p.iou_threshold, overlap=overlap)
            m = base.copy()
            for z, s in sub:
                m[z] = merge_slice(lab[z], s, cfg) == c
            scores[p.name] = class_dice(m, t)
        out[c] = scores
    return out


def pick(means: dict[str, float], names: Sequence[str], margin: float) -> str:
    """:data:`RULE`: the best candidate if it beats keep by more than ``margin``, else keep."""
    if not names:
        return KEEP
    best = max(names, key=lambda n: (means[n], -list(names).index(n)))
    return best if means[best] > means[KEEP] + margin else KEEP


# ----------------------------------------------------------------------------------------- choosing
def choose_policies(pred_source, image_source, label_source, *, cfg, data, segmenter, progress: bool = False) -> dict:
    """Choose a policy per class on validation cases (coarse predictions + images + labels, by case id).

    Returns ``{"rule", "margin", "candidates", "validation_cases", "class_policies" {id: name},
    "classes" {name: {"id", "choice", "val_dice_keep", "val_dice_choice", "best_candidate", "val_dice_best",
    "n_val", "n_present", "val_dice" {policy: mean}}}, "seconds"}``.
    """
    from tqdm.auto import tqdm

    from medssl.data.discover import read_item

    if label_source is None:
        raise ConfigError("refine policy 'auto' needs labels for its validation cases")
    fixed = dataclasses.replace(cfg, policy="fixed", class_policies={})
    job = plan_refinement(pred_source, image_source, label_source, fixed, data)
    axis = data.axis if cfg.axis is None else cfg.axis
    cands = candidates_of(cfg)
    names = [p.name for p in cands]
    boxes = list(dict.fromkeys(p.box_mode for p in cands))
    excluded = {int(e) for e in cfg.exclude}
    classes = [c for c in job.class_names if c != 0 and c not in excluded]
    per_case = {c: {n: [] for n in (KEEP, *names)} for c in classes}
    present = {c: 0 for c in classes}
    t0 = time.perf_counter()
    for coarse_item, image_item, label_item in tqdm(job.pairs, desc="choose policy", unit="case",
                                                     disable=None if progress else True):
        coarse, image = read_item(coarse_item, "label").array, read_item(image_item, "image")
        gt = read_item(label_item, "label").array
        norm = sam_intensity(image.array, job.modalities[coarse_item.case_id], data)
        jobs = [(coarse, dataclasses.replace(fixed, box_mode=b)) for b in boxes]
        preds = dict(zip(boxes, predict_volume_multi(norm, jobs, segmenter, axis))) if boxes else {}
        for c, scores in candidate_scores(coarse, gt, preds, classes, cands, cfg.overlap, axis).items():
            for n, v in scores.items():
                per_case[c][n].append(v)
            present[c] += bool((coarse == c).any() or (gt == c).any())
    chosen, out = {}, {}
    for c in classes:
        means = {n: float(np.mean(v)) for n, v in per_case[c].items()}
        choice = pick(means, names, float(cfg.auto_margin))
        best = max(names, key=lambda n: (means[n], -names.index(n))) if names else KEEP
        chosen[str(c)] = choice  # str keys: the record reads back from JSON unchanged
        out[job.class_names[c]] = {
            "id": c, "choice": choice, "val_dice_keep": means[KEEP], "val_dice_choice": means[choice],
            "best_candidate": best, "val_dice_best": means[best], "n_val": len(job.pairs), "n_present": present[c],
            "val_dice": {n: round(v, 6) for n, v in means.items()}}
        log.info("refine policy for %s: %s (validation Dice keep %.4f, %s %.4f)", job.class_names[c], choice,
                 means[KEEP], best, means[best])
    return {"rule": RULE, "margin": float(cfg.auto_margin), "candidates": names,
            "validation_cases": [p[0].case_id for p in job.pairs], "class_policies": chosen, "classes": out,
            "seconds": round(time.perf_counter() - t0, 2)}


def auto_config(cfg, validation: tuple, data, segmenter, job, progress: bool = False):
    """``(config with the chosen class_policies, choice record)`` for ``policy: auto`` on the cases of ``job``
    (a :class:`~medssl.sam.refine.RefineJob`). A class the validation cases never had is kept."""
    chosen = choose_policies(*validation, cfg=cfg, data=data, segmenter=segmenter, progress=progress)
    overlap = sorted(set(chosen["validation_cases"]) & {p[0].case_id for p in job.pairs})
    if overlap:
        log.warning("refine: %d case(s) are also the validation cases the policy was chosen on (%s)",
                    len(overlap), ", ".join(overlap[:3]))
    unseen = {str(c): KEEP for c in job.class_names if c != 0 and str(c) not in chosen["class_policies"]}
    return dataclasses.replace(cfg, policy="fixed", class_policies={**unseen, **chosen["class_policies"]}), chosen


# ----------------------------------------------------------------------------------------- records
def write_policy(out: Path, result: dict, chosen: dict) -> None:
    from medssl.data.atomic import write_text

    result["policy"] = chosen
    text = policy_markdown(chosen, result.get("per_class")) + "\n"
    write_text(Path(out) / "refine_policy.md", text)


def policy_markdown(chosen: dict, per_class: dict | None = None) -> str:
    """The per-class choices as a markdown table (with the refined cases' Dice before -> after when known)."""
    lines = [f"Refinement policy chosen per class on {len(chosen['validation_cases'])} validation case(s) "
             f"(margin {chosen['margin']}): {chosen['rule']}.", "",
             "| class | choice | validation Dice keep | validation Dice choice | best candidate (Dice) |"
             + (" refined cases: Dice before → after |" if per_class else ""),
             "|---|---|---|---|---|" + ("---|" if per_class else "")]
    for name, d in chosen["classes"].items():
        row = (f"| {name} | {d['choice']} | {d['val_dice_keep']:.4f} | {d['val_dice_choice']:.4f} | "
               f"{d['best_candidate']} ({d['val_dice_best']:.4f}) |")
        if per_class:
            pc = per_class.get(name, {})
            b, a = pc.get("dice_before"), pc.get("dice_after")
            row += " – |" if b is None or a is None else f" {b:.4f} → {a:.4f} |"
        lines.append(row)
    return "\n".join(lines)
