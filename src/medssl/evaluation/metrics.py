"""Segmentation metrics on integer label volumes: per-volume 3D Dice and HD95, and the papers' slice-mean Dice.

All functions take label volumes of shape (X, Y, Z) in canonical orientation; axis 2 is the
slice axis unless an ``axis`` argument says otherwise. Only foreground classes
``1..n_classes-1`` are scored; background is never averaged in.

Per-volume scores (:func:`volume_scores`) are a plain dict, keyed by integer class index::

    {
      "n_classes": 3, "shape": [X, Y, Z], "spacing": [sx, sy, sz], "axis": 2,
      "dice":         {1: float, 2: float},      # 3D Dice (MONAI compute_dice, ignore_empty=False)
      "hd95":         {1: float, 2: float},      # symmetric HD95 in mm; NaN when hd95_missing
      "both_empty":   {1: bool, 2: bool},        # GT and prediction both empty: Dice 1.0, HD95 0.0
      "hd95_missing": {1: bool, 2: bool},        # exactly one of GT / prediction empty: HD95 NaN
      "counts":       {1: {"intersection": int, "pred": int, "gt": int}, ...},  # for micro Dice
      "slice_dice":   {1: [float, ...], ...},    # per-slice +1-smoothed Dice along ``axis``
    }

Exactly one empty gives Dice 0.0 (MONAI with ``ignore_empty=False``; with MONAI's default
``ignore_empty=True`` an empty GT would give NaN whatever the prediction). json.dumps works on
it (int keys become strings, NaN is written as ``NaN``); :func:`aggregate` accepts both int and
str class keys, so scores read back from JSON can be aggregated.

:func:`aggregate` produces the metrics.json summary. Standard deviations are **sample** sd
(ddof=1), and 0.0 when only one value exists. NaN / undefined values become ``None``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance

from medssl.errors import DataError

__all__ = [
    "volume_scores",
    "micro_dice",
    "case_means",
    "aggregate",
    "per_case_rows",
]


# --------------------------------------------------------------------------- helpers
def _as_labels(arr: np.ndarray, n_classes: int, what: str) -> np.ndarray:
    """Check that ``arr`` holds integer labels in [0, n_classes); return it as an int array."""
    arr = np.asarray(arr)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    elif not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.floating) or not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise DataError(f"{what}: labels must be integers, got dtype {arr.dtype} with non-integer values")
        arr = arr.astype(np.int64)
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= n_classes:
            raise DataError(f"{what}: label values span [{lo}, {hi}], outside [0, {n_classes - 1}] (n_classes={n_classes})")
    return arr


def _bbox(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    """Bounding box of ``mask`` (non-empty) grown by ``margin`` voxels, clipped to the array."""
    out = []
    for ax in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != ax)
        idx = np.flatnonzero(mask.any(axis=other))
        out.append(slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + 1 + margin, mask.shape[ax])))
    return tuple(out)


def _hd95(p: np.ndarray, t: np.ndarray, spacing: Sequence[float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance (mm) of two non-empty boolean masks (MONAI)."""
    # Cropping with a 1-voxel margin leaves edges and distances unchanged (MONAI crops the same
    # way internally) but avoids a float copy of the whole volume.
    box = _bbox(p | t, margin=1)
    yp = torch.from_numpy(np.ascontiguousarray(p[box]))[None, None]
    yt = torch.from_numpy(np.ascontiguousarray(t[box]))[None, None]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"monai\..*")
        hd = compute_hausdorff_distance(
            yp, yt, include_background=True, percentile=95, directed=False, spacing=[float(s) for s in spacing]
        )
    return float(hd[0, 0])


def _slice_dice(p: np.ndarray, t: np.ndarray, axis: int) -> np.ndarray:
    """Per-slice (2Σpt + 1)/(Σp + Σt + 1) of two boolean masks along ``axis``."""
    other = tuple(a for a in range(p.ndim) if a != axis)
    inter = np.logical_and(p, t).sum(axis=other, dtype=np.int64)
    sp = p.sum(axis=other, dtype=np.int64)
    st = t.sum(axis=other, dtype=np.int64)
    return (2.0 * inter + 1.0) / (sp + st + 1.0)


def _num(x: Any) -> float | None:
    """A plain float, or None for NaN / inf / None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _mean_sd(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample sd (ddof=1; 0.0 for one value); (None, None) when empty."""
    if len(values) == 0:
        return None, None
    arr = np.asarray(values, dtype=np.float64)
    sd = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return float(arr.mean()), sd


def _by_class(d: Mapping) -> dict[int, Any]:
    """Re-key a per-class mapping by int (JSON round trips turn keys into strings)."""
    return {int(k): v for k, v in d.items()}


# --------------------------------------------------------------------------- per volume
def volume_scores(
    pred: np.ndarray, gt: np.ndarray, n_classes: int, spacing: Sequence[float] | None = None, axis: int = 2
) -> dict:
    """Score one predicted label volume against its ground truth (see the module doc for the dict).

    ``spacing`` is the voxel size in mm per array axis (default 1 mm isotropic).
    """
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise DataError(f"prediction shape {pred.shape} does not match ground-truth shape {gt.shape}")
    if pred.ndim != 3:
        raise DataError(f"expected 3D label volumes (X, Y, Z), got shape {pred.shape}")
    if n_classes < 2:
        raise DataError(f"n_classes must be >= 2 (background + one foreground class), got {n_classes}")
    if not -3 <= axis < 3:
        raise DataError(f"slice axis {axis} is out of range for a 3D volume")
    axis %= 3
    spacing = [1.0, 1.0, 1.0] if spacing is None else [float(s) for s in spacing]
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise DataError(f"spacing must be three positive numbers (mm), got {spacing}")
    pred = _as_labels(pred, n_classes, "prediction")
    gt = _as_labels(gt, n_classes, "ground truth")

    fg = list(range(1, n_classes))
    p_masks = [pred == c for c in fg]
    t_masks = [gt == c for c in fg]

    # 3D Dice via MONAI on one-hot (background channel first, excluded).
    onehot_p = torch.from_numpy(np.stack([pred == 0] + p_masks))[None]
    onehot_t = torch.from_numpy(np.stack([gt == 0] + t_masks))[None]
    dice_t = compute_dice(onehot_p, onehot_t, include_background=False, ignore_empty=False)[0]

    out: dict[str, Any] = {
        "n_classes": int(n_classes),
        "shape": [int(s) for s in pred.shape],
        "spacing": spacing,
        "axis": axis,
        "dice": {},
        "hd95": {},
        "both_empty": {},
        "hd95_missing": {},
        "counts": {},
        "slice_dice": {},
    }
    for i, c in enumerate(fg):
        p, t = p_masks[i], t_masks[i]
        n_p, n_t = int(np.count_nonzero(p)), int(np.count_nonzero(t))
        n_i = int(np.count_nonzero(np.logical_and(p, t)))
        both_empty = n_p == 0 and n_t == 0
        one_empty = (n_p == 0) != (n_t == 0)
        if both_empty:
            hd = 0.0
        elif one_empty:
            hd = float("nan")
        else:
            hd = _hd95(p, t, spacing)
        out["dice"][c] = float(dice_t[i])
        out["hd95"][c] = hd
        out["both_empty"][c] = both_empty
        out["hd95_missing"][c] = one_empty
        out["counts"][c] = {"intersection": n_i, "pred": n_p, "gt": n_t}
        out["slice_dice"][c] = [float(v) for v in _slice_dice(p, t, axis)]
    return out


# --------------------------------------------------------------------------- dataset level
def micro_dice(counts_list: Iterable[Mapping], n_classes: int) -> dict:
    """Dataset-level (micro) Dice, KAF/PCL faithful.

    Per class c: 2·ΣI_c / (ΣP_c + ΣL_c) with the sums over all volumes (equivalently over all 2D
    slices); a class absent from both prediction and GT everywhere scores 0. ``counts_list``
    holds the ``"counts"`` dicts of :func:`volume_scores` (whole score dicts are accepted too).
    Returns ``{"dice": {c: float}, "mean": float}`` (mean over foreground classes).
    """
    tot = {c: [0, 0, 0] for c in range(1, n_classes)}
    for item in counts_list:
        counts = _by_class(item["counts"] if "counts" in item else item)
        for c in tot:
            if c not in counts:
                raise DataError(f"counts for class {c} are missing (n_classes={n_classes})")
            tot[c][0] += int(counts[c]["intersection"])
            tot[c][1] += int(counts[c]["pred"])
            tot[c][2] += int(counts[c]["gt"])
    dice = {c: (2.0 * i / (p + t) if p + t > 0 else 0.0) for c, (i, p, t) in tot.items()}
    mean = float(np.mean(list(dice.values()))) if dice else None
    return {"dice": dice, "mean": mean}


def case_means(scores: Mapping) -> dict:
    """Per-case class means: Dice over non-both-empty classes, HD95 over classes with a value.

    Returns ``{"dice": float | None, "hd95": float | None}`` (None when no class qualifies).
    HD95 skips missing (one-empty) and both-empty classes, mirroring the Dice exclusion.
    """
    dice, hd, both, miss = (_by_class(scores[k]) for k in ("dice", "hd95", "both_empty", "hd95_missing"))
    d = [float(dice[c]) for c in dice if not both[c]]
    h = [float(hd[c]) for c in hd if not both[c] and not miss[c]]
    return {"dice": float(np.mean(d)) if d else None, "hd95": float(np.mean(h)) if h else None}


def aggregate(per_case: Sequence[Mapping], class_names: Mapping[int, str]) -> dict:
    """Summarise the :func:`volume_scores` of many cases into the metrics.json dict.

    - ``dice_mean`` / ``dice_sd``: over cases of the per-case mean 3D Dice (both-empty classes left
      out; cases whose classes are all both-empty are skipped, ``dice_n`` counts the rest).
    - ``dice``: {name: {mean, sd, n, n_both_empty}} over cases, both-empty cases excluded.
    - ``hd95_mean`` / ``hd95_sd`` / ``hd95_n``: likewise for the per-case mean HD95 (mm).
    - ``hd95``: {name: {mean, sd, n, n_missing, n_both_empty}}; missing and both-empty excluded.
    - ``micro_dice``: {name: float, ..., "mean": float} (dataset-level Dice).
    - ``slice_mean_dice``: {name: float, ..., "mean": float}, averaged over all slices of all cases.
    - ``n_cases``, ``sd_ddof`` (= 1: sample sd; sd is 0.0 for a single value).

    All numbers are plain floats/ints; undefined values are None, so ``json.dumps`` works.
    """
    cases = list(per_case)
    if cases:
        classes = sorted(_by_class(cases[0]["dice"]))
        for i, s in enumerate(cases):
            if sorted(_by_class(s["dice"])) != classes:
                raise DataError(f"case #{i} has classes {sorted(_by_class(s['dice']))}, expected {classes}")
        n_classes = int(cases[0].get("n_classes", max(classes, default=0) + 1))
    else:
        classes, n_classes = sorted(int(c) for c in class_names if int(c) != 0), 0
    names = {c: str(class_names.get(c, class_names.get(str(c), c))) for c in classes}

    means = [case_means(s) for s in cases]
    dice_case = [m["dice"] for m in means if m["dice"] is not None]
    hd_case = [m["hd95"] for m in means if m["hd95"] is not None]
    dice_mean, dice_sd = _mean_sd(dice_case)
    hd_mean, hd_sd = _mean_sd(hd_case)

    dice_cls: dict[str, dict] = {}
    hd_cls: dict[str, dict] = {}
    slice_cls: dict[str, float | None] = {}
    for c in classes:
        d_vals, h_vals, sl_vals = [], [], []
        n_both = n_missing = 0
        for s in cases:
            both = bool(_by_class(s["both_empty"])[c])
            miss = bool(_by_class(s["hd95_missing"])[c])
            n_both += both
            n_missing += miss
            if not both:
                d_vals.append(float(_by_class(s["dice"])[c]))
                if not miss:
                    h_vals.append(float(_by_class(s["hd95"])[c]))
            sl_vals.extend(float(v) for v in _by_class(s["slice_dice"])[c])
        m, sd = _mean_sd(d_vals)
        dice_cls[names[c]] = {"mean": m, "sd": sd, "n": len(d_vals), "n_both_empty": n_both}
        m, sd = _mean_sd(h_vals)
        hd_cls[names[c]] = {"mean": _num(m), "sd": _num(sd), "n": len(h_vals), "n_missing": n_missing,
                            "n_both_empty": n_both}
        slice_cls[names[c]] = float(np.mean(sl_vals)) if sl_vals else None

    defined = [v for v in slice_cls.values() if v is not None]
    slice_out: dict[str, float | None] = dict(slice_cls)
    slice_out["mean"] = float(np.mean(defined)) if defined else None

    micro_out: dict[str, float | None] = {}
    if cases:
        md = micro_dice(cases, n_classes)
        micro_out = {names[c]: float(md["dice"][c]) for c in classes}
        micro_out["mean"] = _num(float(np.mean([md["dice"][c] for c in classes]))) if classes else None

    return {
        "n_cases": len(cases),
        "sd_ddof": 1,
        "dice_mean": _num(dice_mean),
        "dice_sd": _num(dice_sd),
        "dice_n": len(dice_case),
        "dice": dice_cls,
        "hd95_mean": _num(hd_mean),
        "hd95_sd": _num(hd_sd),
        "hd95_n": len(hd_case),
        "hd95": hd_cls,
        "micro_dice": micro_out,
        "slice_mean_dice": slice_out,
    }


def per_case_rows(case_id: str, scores: Mapping, class_names: Mapping[int, str]) -> dict:
    """One flat CSV row for a case.

    Columns: ``case``, then per class ``dice_<name>``, ``hd95_<name>`` (None when missing),
    ``both_empty_<name>``, ``hd95_missing_<name>``, ``slice_dice_<name>`` (mean over slices),
    then ``dice_mean`` and ``hd95_mean`` (per-case means as in :func:`case_means`).
    """
    row: dict[str, Any] = {"case": str(case_id)}
    dice, hd, both, miss, sl = (
        _by_class(scores[k]) for k in ("dice", "hd95", "both_empty", "hd95_missing", "slice_dice")
    )
    for c in sorted(dice):
        name = str(class_names.get(c, class_names.get(str(c), c)))
        row[f"dice_{name}"] = _num(dice[c])
        row[f"hd95_{name}"] = _num(hd[c])
        row[f"both_empty_{name}"] = bool(both[c])
        row[f"hd95_missing_{name}"] = bool(miss[c])
        row[f"slice_dice_{name}"] = float(np.mean(sl[c])) if len(sl[c]) else None
    m = case_means(scores)
    row["dice_mean"] = _num(m["dice"])
    row["hd95_mean"] = _num(m["hd95"])
    return row
