"""The LiteMedSAM slice chain of ``medssl propagate``: plain box chain and the registration hybrid.

Both walk from the annotated slice k to k+1 .. Z-1, then k-1 .. 0; all classes still alive on a slice share
one ``set_image`` and one ``predict`` call. They differ in where each slice's box prompt comes from:

* ``backend="litemedsam"`` (plain chain): the previous slice's mask, grown by ``margin`` px;
* ``backend="hybrid"``: the previous slice's mask **registered onto this slice**
  (:mod:`medssl.sam.register`), grown by ``margin``. SAM's answer is accepted only where it agrees with the
  registered mask (Dice >= ``hybrid_min_dice``) and passes the chain's own stops; otherwise
  ``on_disagree="register"`` (default) keeps the registered mask for that slice and goes on from it, and
  ``on_disagree="stop"`` stops the class in that direction. Where the registration itself stops (empty,
  area change, divergence), that slice falls back to the plain chain's box and SAM's answer is judged by
  the chain's stops alone. ``reg_max_steps`` caps the slices per direction.

``dense_prompt=True`` also gives SAM a dense mask prompt: the registered mask (hybrid) or the previous
mask (plain chain); see :mod:`medssl.sam.mask_prompt`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from medssl.sam.register import DIRECTIONS, FlowCache, combine  # noqa: F401  (combine re-exported)
from medssl.sam.segmenter import expand_box, mask_to_box

if TYPE_CHECKING:
    from medssl.sam.propagate import Annotation, PropagateConfig


def chain_margin(cfg: PropagateConfig, shape: tuple[int, int]) -> float:
    """Box growth in original pixels: ``cfg.margin``, or 3 px of the 256 model frame."""
    return 3.0 * max(shape) / 256.0 if cfg.margin is None else float(cfg.margin)


def stop_reason(mask: np.ndarray, iou: float, prev_area: int, cfg: PropagateConfig) -> str | None:
    """Why the chain stops at a SAM mask (None: it goes on)."""
    area = int(mask.sum())
    if area == 0:
        return "empty"
    if iou < cfg.iou_threshold:
        return f"predicted IoU {iou:.2f} < {cfg.iou_threshold:g}"
    if cfg.min_area_ratio > 0 and area < cfg.min_area_ratio * prev_area:
        return f"area {prev_area} -> {area} px (< x{cfg.min_area_ratio:g})"
    if cfg.max_area_ratio > 0 and area > cfg.max_area_ratio * prev_area:
        return f"area {prev_area} -> {area} px (> x{cfg.max_area_ratio:g})"
    return None


def dice2d(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two 2D bool masks (1 when both are empty)."""
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


def box_chain(slices: np.ndarray, ann: Annotation, segmenter, cfg: PropagateConfig,
              record: dict | None = None) -> tuple[np.ndarray, dict]:
    """LiteMedSAM chain over (Z, h, w) slices -> ((Z, h, w) labels, info).

    ``info``: ``extent`` per class, ``set_image_calls``, ``stops[c][direction]`` (``{"reason", "slice",
    "detail"}``) and, for the hybrid, ``registered_slices`` (slices where the registered mask was kept) and
    ``register_fallbacks`` (slices prompted from the previous mask because the registration stopped).
    ``record``, when given, receives ``{(class, z): (mask, iou)}`` for every SAM prediction, so that
    :func:`replay_chain` can apply stricter stops to a plain chain afterwards without running the model again.
    """

    hybrid = cfg.backend == "hybrid"
    flows = FlowCache(slices) if hybrid else None
    if cfg.dense_prompt:
        from medssl.sam.mask_prompt import with_mask_prompts

        segmenter = with_mask_prompts(segmenter)
    z_n, hw = slices.shape[0], slices.shape[1:]
    margin = chain_margin(cfg, hw)
    classes = ann.classes
    masks = {c: np.zeros(slices.shape, bool) for c in classes}
    score = {c: np.zeros(z_n) for c in classes}
    key_box = {c: expand_box(mask_to_box(m), margin, hw) for c, (_, m) in ann.keys.items()}
    calls, registered, fallbacks = 0, {c: [] for c in classes}, {c: [] for c in classes}
    refs = {c: flows.reference(k, m) for c, (k, m) in ann.keys.items()} if hybrid else {}
    if cfg.key_output == "sam":
        for k in sorted({k for k, _ in ann.keys.values()}):
            on_k = [c for c in classes if ann.keys[c][0] == k]
            segmenter.set_image(slices[k])
            calls += 1
            pm, _ = segmenter.predict(boxes=np.stack([mask_to_box(ann.keys[c][1]) for c in on_k]))
            for i, c in enumerate(on_k):
                masks[c][k], score[c][k] = np.asarray(pm[i], bool), 1.0
    else:
        for c, (k, m) in ann.keys.items():
            masks[c][k], score[c][k] = m, 1.0
    extent = {c: [ann.keys[c][0], ann.keys[c][0]] for c in classes}
    stops: dict = {c: {} for c in classes}
    for step, direction in DIRECTIONS:
        alive = set(classes)
        prev = {c: np.asarray(m, bool) for c, (_, m) in ann.keys.items()}  # the annotation seeds both directions
        start = min(k for k, _ in ann.keys.values()) if step == 1 else max(k for k, _ in ann.keys.values())
        for z in range(start + step, z_n if step == 1 else -1, step):
            if not alive:
                break
            active = [c for c in classes if c in alive and (z - ann.keys[c][0]) * step > 0]
            for c in list(active):
                if cfg.reg_max_steps is not None and hybrid and abs(z - ann.keys[c][0]) > cfg.reg_max_steps:
                    stops[c][direction] = {"reason": "max_steps", "slice": z, "detail": f"{cfg.reg_max_steps} slices"}
                    alive.discard(c)
                    active.remove(c)
            if not active:
                continue  # the other classes' key slices lie further on
            guide = {}
            for c in active:
                if hybrid:
                    warped, why = flows.step(z - step, z, prev[c], cfg, refs[c])
                    if why is None:
                        guide[c] = warped
                    else:
                        fallbacks[c].append(z)
            segmenter.set_image(slices[z])
            calls += 1
            boxes = np.stack([expand_box(mask_to_box(guide.get(c, prev[c])), margin, hw) for c in active])
            dense = np.stack([guide.get(c, prev[c]) for c in active]) if cfg.dense_prompt else None
            pm, pq = segmenter.predict(boxes=boxes, masks=dense) if dense is not None else \
                segmenter.predict(boxes=boxes)
            pm, pq = np.asarray(pm, bool), np.asarray(pq, float).reshape(-1)
            retry = [i for i, c in enumerate(active) if not pm[i].any()] if cfg.on_empty == "key_box" else []
            if retry:
                rm, rq = segmenter.predict(boxes=np.stack([key_box[active[i]] for i in retry]))
                for j, i in enumerate(retry):
                    pm[i], pq[i] = np.asarray(rm[j], bool), float(np.asarray(rq).reshape(-1)[j])
            for i, c in enumerate(active):
                if record is not None:
                    record[(c, z)] = (pm[i].copy(), float(pq[i]))
                why = stop_reason(pm[i], float(pq[i]), int(prev[c].sum()), cfg)
                if why is None and c in guide:
                    d = dice2d(pm[i], guide[c])
                    if d < cfg.hybrid_min_dice:
                        why = f"SAM and the registered mask disagree (Dice {d:.2f} < {cfg.hybrid_min_dice:g})"
                if why is None:
                    new, s = pm[i], float(pq[i])
                elif c in guide and cfg.on_disagree == "register":
                    new, s = guide[c], 0.0
                    registered[c].append(z)
                else:
                    stops[c][direction] = {"reason": "sam", "slice": z, "detail": why}
                    alive.discard(c)
                    continue
                masks[c][z], score[c][z], prev[c] = new, s, new
                extent[c][0 if step == -1 else 1] = z
        for c in classes:
            stops[c].setdefault(direction, {"reason": "volume_end", "slice": None, "detail": ""})
    info = {"extent": {c: tuple(v) for c, v in extent.items()}, "set_image_calls": calls, "stops": stops}
    if hybrid:
        info.update(registered_slices=registered, register_fallbacks=fallbacks)
    return combine(masks, score), info


def replay_chain(record: dict, ann: Annotation, z_n: int, cfg: PropagateConfig) -> np.ndarray:
    """(Z, h, w) labels that a plain :func:`box_chain` would give with ``cfg``'s stops, from the ``record`` of
    a run with stops at least as permissive (same margin, key output ``annotation`` and ``on_empty``)."""
    masks, score = {}, {}
    for c, (k, m) in ann.keys.items():
        masks[c] = np.zeros((z_n,) + m.shape, bool)
        score[c] = np.zeros(z_n)
        masks[c][k], score[c][k] = m, 1.0
        for step in (1, -1):
            prev_area, z = int(m.sum()), k + step
            while 0 <= z < z_n and (c, z) in record:
                pm, q = record[(c, z)]
                if stop_reason(pm, q, prev_area, cfg) is not None:
                    break
                masks[c][z], score[c][z], prev_area = pm, q, int(pm.sum())
                z += step
    return combine(masks, score)
