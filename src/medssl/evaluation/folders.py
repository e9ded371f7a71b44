"""Score label maps made elsewhere against ground truth: ``medssl evaluate PRED_DIR GT_DIR``.

    summary = evaluate_folders("pred/", "../data/Task04_Hippocampus/labelsTr", labels=[1, 2])

Like nnU-Net's ``evaluate_simple``: every ``{CASE}.nii.gz`` (or ``.nii``) in ``PRED_DIR`` is paired by case id
with a ground-truth label file. The ground truth is a folder of label files or a dataset folder (its labelled
cases); ground-truth cases without a prediction are left out (and counted). Per pair and class: 3D Dice and
HD95 in mm (:func:`medssl.evaluation.metrics.volume_scores`, MONAI), in the volumes' canonical orientation.

Class names come from the ``dataset.json`` of the ground truth (or of its parent, for ``labelsTr``), else from
``PRED_DIR/predictions.json`` (``medssl predict``'s manifest), else ``class_N``. With declared classes, a label
value outside them is an error naming the file; ``labels`` restricts the scored classes.

``summary.json`` (:func:`~medssl.evaluation.metrics.aggregate` plus the pairing) and ``per_case.csv`` are written
atomically, and only after every pair was read and checked: a missing ground truth, a shape or affine mismatch or
an unknown label is a one-line error and nothing is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medssl.data.atomic import write_csv, write_json
from medssl.data.discover import VolumeItem, find_volumes, read_item
from medssl.data.layouts import open_dataset
from medssl.data.readers import grid_mismatch
from medssl.errors import ConfigError, DataError
from medssl.evaluation.metrics import aggregate, per_case_rows, volume_scores

NOTES = {"dice_mean": "per-volume 3D Dice (MONAI), mean over cases of the mean foreground Dice",
         "hd95_mean": "symmetric 95th-percentile Hausdorff distance in mm (MONAI)",
         "micro_dice": "dataset-level Dice over all voxels of the paired cases",
         "slice_mean_dice": "per-slice +1-smoothed Dice along axis 2, averaged over slices (PolyCL legacy)"}


def declared_classes(gt_source: str | Path) -> dict[int, str]:
    """Class names of the ``dataset.json`` of the ground truth, or of its parent for a ``labels*`` folder."""
    path = Path(gt_source).expanduser()
    for root in (path, path.parent if path.name.startswith("labels") else None):
        if root is not None and root.is_dir() and (root / "dataset.json").is_file():
            return {int(k): str(v) for k, v in open_dataset(root).labels.items()}
    return {}


def pair_cases(pred_source: str | Path, gt_source: str | Path) -> tuple[list[tuple[str, VolumeItem, VolumeItem]], int]:
    """``([(case id, prediction, ground truth)], ground-truth cases without a prediction)``."""
    preds, truth = find_volumes(pred_source, "label"), find_volumes(gt_source, "label")
    if len(preds) == len(truth) == 1 and next(iter(preds.values())).single and next(iter(truth.values())).single:
        (cid, p), (_, t) = next(iter(preds.items())), next(iter(truth.items()))  # two files: paired by position
        return [(cid, p, t)], 0
    missing = [cid for cid in sorted(preds) if cid not in truth]
    if missing:
        more = f" ({len(missing)} predictions without ground truth)" if len(missing) > 1 else ""
        raise DataError(f"{preds[missing[0]].path}: no ground truth for case '{missing[0]}' in {gt_source}{more}")
    return [(cid, preds[cid], truth[cid]) for cid in sorted(preds)], len(set(truth) - set(preds))


def manifest_names(pred_dir: Path) -> dict[int, str]:
    """Class names of ``pred_dir/predictions.json`` (``medssl predict``'s manifest); {} without one."""
    manifest = pred_dir / "predictions.json"
    if not manifest.is_file():
        return {}
    try:
        return {int(k): str(v) for k, v in json.loads(manifest.read_text()).get("labels", {}).items()}
    except (ValueError, AttributeError):
        raise DataError(f"{manifest}: invalid predictions manifest") from None


def _check_values(arr: np.ndarray, allowed: set[int] | None, source: str) -> set[int]:
    values = {int(v) for v in np.unique(arr)}
    if allowed is not None and values - allowed:
        raise DataError(f"{source}: label value(s) {sorted(values - allowed)} are not declared classes "
                        f"(declared: {sorted(allowed)})")
    return values


def _pick(wanted: list[int] | None, names: dict[int, str], present: set[int]) -> list[int]:
    """The foreground classes to score: ``wanted``, checked against the declared (else present) classes."""
    known = sorted(c for c in (names or present) if c > 0)
    if wanted is None:
        return known or [1]
    bad = sorted({int(c) for c in wanted} - set(known))
    if any(int(c) <= 0 for c in wanted):
        raise ConfigError(f"--labels: class ids must be positive, got {sorted(wanted)}")
    if bad:
        where = "declared" if names else "present in the predictions or the ground truth"
        raise ConfigError(f"--labels: unknown class id(s) {bad}; {where}: {', '.join(map(str, known)) or 'none'}")
    return sorted({int(c) for c in wanted})


def _remap(arr: np.ndarray, classes: list[int]) -> np.ndarray:
    out = np.zeros(arr.shape, np.int16)
    for i, c in enumerate(classes, 1):
        out[arr == c] = i
    return out


def _compact(arr: np.ndarray) -> np.ndarray:
    return arr.astype(np.uint8) if arr.size and arr.min() >= 0 and arr.max() < 256 else arr


def _scores(pred: np.ndarray, gt: np.ndarray, spacing, classes: list[int]) -> dict:
    """MONAI 3D Dice / HD95 of ``classes`` (renumbered 1..k; everything else is background)."""
    return volume_scores(_remap(pred, classes), _remap(gt, classes), len(classes) + 1, spacing, axis=2)


def evaluate_folders(pred_dir: str | Path, gt_source: str | Path, *, labels: list[int] | None = None,
                     out_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Score every prediction in ``pred_dir`` against ``gt_source``; write summary.json and per_case.csv."""
    from tqdm.auto import tqdm

    pred_path = Path(pred_dir).expanduser()
    pairs_in, unpaired = pair_cases(pred_path, gt_source)
    names = declared_classes(gt_source) or manifest_names(pred_path)
    allowed = set(names) | {0} if names else None
    classes = _pick(labels, names, set()) if names else None  # else known once every volume was read
    scored, kept, present = [], [], set()
    for cid, p_item, t_item in tqdm(pairs_in, desc="evaluate", unit="case", disable=None if progress else True):
        pred, gt = read_item(p_item, "label"), read_item(t_item, "label")
        problem = grid_mismatch(pred, gt, "prediction", "ground truth")
        if problem:
            raise DataError(problem)
        present |= _check_values(pred.array, allowed, str(p_item.path))
        present |= _check_values(gt.array, allowed, str(t_item.path))
        if classes is None:
            kept.append((cid, _compact(pred.array), _compact(gt.array), gt.spacing))
        else:
            scored.append((cid, _scores(pred.array, gt.array, gt.spacing, classes)))
    if classes is None:
        classes = _pick(labels, names, present)
        scored = [(cid, _scores(p, t, sp, classes)) for cid, p, t, sp in kept]
    class_names = {i: names.get(c, f"class_{c}") for i, c in enumerate(classes, 1)}
    per_case = [s for _, s in scored]
    rows = [per_case_rows(cid, s, class_names) for cid, s in scored]
    summary = aggregate(per_case, class_names)
    default = pred_path if pred_path.is_dir() else pred_path.parent
    out = Path(out_dir).expanduser() if out_dir is not None else default / "evaluation"
    summary.update({"part": "prediction", "predictions": str(pred_path), "ground_truth": str(gt_source),
                    "labels": {str(c): class_names[i] for i, c in enumerate(classes, 1)},
                    "cases": [cid for cid, _ in scored], "ground_truth_without_prediction": unpaired,
                    "metric_notes": NOTES})
    write_csv(out / "per_case.csv", rows)
    write_json(out / "summary.json", summary, nan_as_null=True)
    summary["out_dir"] = str(out)
    return summary
