"""Registration propagation: carry an annotated mask from slice to slice with dense optical flow.

What annotation tools classically do with one annotated slice: register each slice to its neighbour and
move the mask along. For a step from slice ``z`` (current mask) to slice ``z'`` (``z +- 1``):

1. the stack is put on one 8-bit scale for the whole volume (0.5 / 99.5 percentiles of all slices,
   :func:`volume_u8`), so that brightness constancy holds between neighbours;
2. the dense flow ``f`` with ``next(p) ~ current(p + f(p))`` is computed by OpenCV's Farneback method
   (:func:`slice_flow`) -- ``next`` is the reference, so the flow is defined on the pixels the mask lands on;
3. the current mask, as float, is pulled through the flow (``cv2.remap``, linear interpolation, zero outside)
   and thresholded at 0.5 (:func:`warp_mask`).

**Why Farneback.** It is deterministic (no random initialisation; each pixel's solution does not depend
on thread scheduling), gives a smooth dense field from a Gaussian pyramid of polynomial expansions, and
behaves on very small slices (a hippocampus slice is ~35 x 50 px; DIS matches 8 px patches, a large share
of such an image, and SimpleITK demons need more tuning and time per pair for the same result). Slices
whose longest side is below :data:`MIN_SIZE` px are upsampled (bicubic) before the flow is computed and
the flow is scaled back, so that the pyramid has levels to work with.

**Stops** (per class and direction; :func:`check_step`): the warped mask is empty; its area changed by more
than ``reg_max_area_change`` (ratio, either way) against the previous slice; the mean 8-bit intensity inside
it drifted from the key slice's by more than ``reg_max_intensity_drift`` standard deviations of the key slice
inside the annotation (the flow cannot make a structure end, so this is what stops the walk where the
structure's appearance ends); or the registration diverged: non-finite flow, a mean displacement over the mask
region above ``reg_max_shift`` x the slice's longest side, or folding (Jacobian determinant <= 0) on more
than ``reg_max_fold`` of the region. A stop is a reported
fallback: the class keeps what was propagated so far in that direction, and the reason goes to
``info["stops"]``. ``reg_max_steps`` caps the number of slices per direction.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    from medssl.sam.propagate import Annotation, PropagateConfig

MIN_SIZE = 128  # slices with a longer side below this are upsampled for the flow
FARNEBACK = dict(pyr_scale=0.5, levels=3, winsize=25, iterations=5, poly_n=5, poly_sigma=1.1,
                 flags=cv2.OPTFLOW_FARNEBACK_GAUSSIAN)
DIRECTIONS = ((1, "forward"), (-1, "backward"))  # forward = increasing slice index


def volume_u8(slices: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5)) -> np.ndarray:
    """(Z, h, w) float slices -> uint8 on one scale for the whole stack (clip to the percentiles)."""
    x = np.asarray(slices, dtype=np.float32)
    finite = x[np.isfinite(x)]
    if finite.size == 0:
        return np.zeros(x.shape, np.uint8)
    lo, hi = (float(v) for v in np.percentile(finite, percentiles))
    y = (np.nan_to_num(x, nan=lo) - lo) / max(hi - lo, 1e-8) * 255.0
    return np.clip(y, 0, 255).astype(np.uint8)


def slice_flow(reference: np.ndarray, moving: np.ndarray) -> np.ndarray:
    """Farneback flow (h, w, 2) as (dx, dy) with ``reference(p) ~ moving(p + flow(p))``; uint8 inputs."""
    h, w = reference.shape
    scale = max(1.0, MIN_SIZE / max(h, w))
    if scale > 1.0:
        size = (int(round(w * scale)), int(round(h * scale)))
        ref = cv2.resize(reference, size, interpolation=cv2.INTER_CUBIC)
        mov = cv2.resize(moving, size, interpolation=cv2.INTER_CUBIC)
    else:
        ref, mov = reference, moving
    flow = cv2.calcOpticalFlowFarneback(ref, mov, None, **FARNEBACK)
    if scale > 1.0:
        flow = cv2.resize(flow, (w, h), interpolation=cv2.INTER_LINEAR) / scale
    return flow.astype(np.float32)


def warp_mask(mask: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Pull a 2D mask through ``flow``: float values in [0, 1] (linear interpolation, 0 outside)."""
    h, w = mask.shape
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return cv2.remap(np.asarray(mask, np.float32), gx + flow[..., 0], gy + flow[..., 1], cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)


def fold_fraction(flow: np.ndarray, region: np.ndarray) -> float:
    """Share of ``region`` where the map p -> p + flow(p) folds (Jacobian determinant <= 0)."""
    if not region.any():
        return 0.0
    dux_dy, dux_dx = np.gradient(flow[..., 0])
    duy_dy, duy_dx = np.gradient(flow[..., 1])
    det = (1.0 + dux_dx) * (1.0 + duy_dy) - dux_dy * duy_dx
    return float((det[region] <= 0).mean())


def check_step(prev: np.ndarray, flow: np.ndarray, cfg: PropagateConfig, image: np.ndarray | None = None,
               ref: tuple[float, float] | None = None) -> tuple[np.ndarray, dict | None]:
    """Warp ``prev`` (bool) by ``flow`` -> (new bool mask, None) or (new mask, stop {"reason", "detail"}).

    ``image`` (the 8-bit target slice) and ``ref`` (mean, sd of the key slice inside the annotation) enable
    the intensity stop ``reg_max_intensity_drift``."""
    if not np.isfinite(flow).all():
        return np.zeros_like(prev), {"reason": "diverged", "detail": "non-finite flow"}
    new = warp_mask(prev, flow) >= 0.5
    region = new | prev
    shift = float(np.linalg.norm(flow[region], axis=1).mean())
    bound = cfg.reg_max_shift * max(prev.shape)
    if cfg.reg_max_shift > 0 and shift > bound:
        return new, {"reason": "diverged", "detail": f"mean displacement {shift:.1f} px > {bound:.1f} px"}
    fold = fold_fraction(flow, region)
    if fold > cfg.reg_max_fold:
        return new, {"reason": "diverged", "detail": f"folding on {fold:.0%} of the mask region"}
    area, prev_area = int(new.sum()), int(prev.sum())
    if area == 0:
        return new, {"reason": "empty", "detail": "the warped mask is empty"}
    r = cfg.reg_max_area_change
    if r > 0 and not prev_area / r <= area <= prev_area * r:
        return new, {"reason": "area", "detail": f"area {prev_area} -> {area} px (limit x{r:g})"}
    if cfg.reg_max_intensity_drift > 0 and image is not None and ref is not None:
        drift = abs(float(image[new].mean()) - ref[0]) / ref[1]
        if drift > cfg.reg_max_intensity_drift:
            return new, {"reason": "intensity", "detail": f"mean intensity drifted {drift:.2f} sd from the key slice's"}
    return new, None


class FlowCache:
    """Flows between neighbouring slices of one stack, computed once and shared by every class."""

    def __init__(self, slices: np.ndarray):
        self.u8 = volume_u8(slices)
        self._flows: dict[tuple[int, int], np.ndarray] = {}
        self.errors: dict[tuple[int, int], str] = {}

    def __call__(self, src: int, dst: int) -> np.ndarray:
        """Flow that pulls a mask on slice ``src`` onto slice ``dst`` (NaN where OpenCV failed)."""
        key = (src, dst)
        if key not in self._flows:
            try:
                self._flows[key] = slice_flow(self.u8[dst], self.u8[src])
            except cv2.error as exc:  # reported as a divergence, never raised
                self.errors[key] = str(exc).strip().splitlines()[-1][:120]
                self._flows[key] = np.full(self.u8.shape[1:] + (2,), np.nan, np.float32)
        return self._flows[key]

    def reference(self, k: int, mask: np.ndarray) -> tuple[float, float]:
        """(mean, sd) of the 8-bit key slice ``k`` inside ``mask`` (sd at least one grey level)."""
        v = self.u8[k][np.asarray(mask, bool)].astype(np.float64)
        return float(v.mean()), max(float(v.std()), 1.0)

    def step(self, src: int, dst: int, prev: np.ndarray, cfg: PropagateConfig,
             ref: tuple[float, float] | None = None) -> tuple[np.ndarray, dict | None]:
        """:func:`check_step` for the mask ``prev`` on ``src`` moved to ``dst``."""
        new, why = check_step(prev, self(src, dst), cfg, self.u8[dst], ref)
        if why is not None and (src, dst) in self.errors:
            why["detail"] = f"OpenCV: {self.errors[(src, dst)]}"
        return new, why


def register_masks(slices: np.ndarray, ann: Annotation, cfg: PropagateConfig, flows: FlowCache | None = None
                   ) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], dict]:
    """Per class: (Z, h, w) bool masks from registration propagation, per-slice scores, and the stops.

    The score (used where classes overlap) is 1 on the key slice and falls with the distance to it.
    ``stops[c][direction]`` is ``{"reason", "slice", "detail"}``; ``"volume_end"`` when the walk ran out of
    slices, ``"max_steps"`` at the ``reg_max_steps`` cap.
    """
    flows = flows or FlowCache(slices)
    z_n = slices.shape[0]
    masks, score, stops = {}, {}, {}
    for c, (k, m) in ann.keys.items():
        masks[c] = np.zeros((z_n,) + m.shape, bool)
        score[c] = np.zeros(z_n)
        masks[c][k], score[c][k] = m, 1.0
        stops[c] = {}
        ref = flows.reference(k, m)
        for step, name in DIRECTIONS:
            prev, z = np.asarray(m, bool), k + step
            stop = {"reason": "volume_end", "slice": None, "detail": ""}
            while 0 <= z < z_n:
                if cfg.reg_max_steps is not None and abs(z - k) > cfg.reg_max_steps:
                    stop = {"reason": "max_steps", "slice": z, "detail": f"{cfg.reg_max_steps} slices reached"}
                    break
                new, why = flows.step(z - step, z, prev, cfg, ref)
                if why is not None:
                    stop = {**why, "slice": z}
                    break
                masks[c][z], score[c][z], prev = new, 1.0 / (1 + abs(z - k)), new
                z += step
            stops[c][name] = stop
    return masks, score, stops


def register_chain(slices: np.ndarray, ann: Annotation, cfg: PropagateConfig) -> tuple[np.ndarray, dict]:
    """Registration propagation over (Z, h, w) slices -> ((Z, h, w) labels, info with extents and stops)."""
    masks, score, stops = register_masks(slices, ann, cfg)
    extent = {}
    for c, m in masks.items():
        present = np.flatnonzero(m.reshape(m.shape[0], -1).any(axis=1))
        extent[c] = (int(present[0]), int(present[-1]))
    return combine(masks, score), {"extent": extent, "stops": stops}


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
