"""Dense mask prompts and shared embeddings for medssl's LiteMedSAM segmenter.

**Dense mask prompt.** medssl's prompt encoder implements SAM's mask path (``mask_downscaling``: two
stride-2 convolutions from a 256 x 256 logit map onto the 64 x 64 embedding grid), and the LiteMedSAM
checkpoint carries its weights, so a mask can be given next to the box. :class:`MaskPromptSegmenter` adds
``predict(boxes, masks=...)`` to a :class:`~medssl.sam.predictor.LiteMedSAMSegmenter` without changing it:
each (H, W) mask is taken to the model frame exactly as the image is (display orientation, longest side
resized to 256 with linear interpolation, zero padding bottom/right) and given as logits
``+MASK_LOGIT`` inside / ``-MASK_LOGIT`` outside. Caveat: LiteMedSAM (like MedSAM) was trained with box
prompts only, so these weights are SAM's, not tuned on medical images; measure before relying on it.

**Shared embeddings.** :class:`CachedSegmenter` keeps the image embedding of every slice it has seen
(keyed by the slice's bytes), so that several propagation variants on one volume encode each slice once.
"""

from __future__ import annotations

import hashlib

import cv2
import numpy as np
import torch

from medssl.errors import ConfigError
from medssl.sam.litemedsam import IMAGE_SIZE
from medssl.sam.predictor import (LiteMedSAMSegmenter, boxes_to_model, postprocess, ras_boxes_to_display,
                                  ras_to_display, resized_shape)

MASK_LOGIT = 10.0  # magnitude of the logits a binary mask prompt is turned into


def masks_to_model(masks: np.ndarray, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(K, H, W) masks (already in the model's orientation) -> K x 1 x size x size prompt logits."""
    k, h, w = masks.shape
    nh, nw = resized_shape((h, w), size)
    out = np.full((k, 1, size, size), -MASK_LOGIT, np.float32)
    for i, m in enumerate(np.asarray(masks, np.float32)):
        small = cv2.resize(m, (nw, nh), interpolation=cv2.INTER_LINEAR)
        out[i, 0, :nh, :nw] = (2.0 * small - 1.0) * MASK_LOGIT
    return torch.from_numpy(out)


class MaskPromptSegmenter:
    """A LiteMedSAM segmenter whose ``predict`` also takes ``masks`` (K, H, W) as dense prompts."""

    name = "litemedsam"

    def __init__(self, segmenter):
        self.outer = segmenter  # set_image goes through a CachedSegmenter when there is one
        self.base: LiteMedSAMSegmenter = getattr(segmenter, "base", segmenter)

    def set_image(self, image: np.ndarray) -> None:
        self.outer.set_image(image)

    def predict(self, boxes: np.ndarray | None = None,
                masks: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Boxes (K, 4) and optional masks (K, H, W) in the slice's frame -> (masks K x H x W bool, iou K)."""
        if masks is None:
            return self.base.predict(boxes=boxes)
        b = self.base
        if b._shape is None:
            raise ConfigError("litemedsam: call set_image before predict")
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        masks = np.asarray(masks)
        if masks.shape != (len(boxes),) + b._shape:
            raise ConfigError(f"litemedsam predict: mask prompts must have shape {(len(boxes),) + b._shape}, "
                              f"got {masks.shape}")
        if len(boxes) == 0:
            return np.zeros((0,) + b._shape, bool), np.zeros((0,), np.float32)
        shape = b._shape
        if b.orientation == "ras":
            boxes, shape = ras_boxes_to_display(boxes, shape), (shape[1], shape[0])
            masks = np.stack([ras_to_display(m) for m in masks])
        emb = b.embedding()
        mb = torch.from_numpy(boxes_to_model(boxes, shape, truncate=b.truncate_boxes)).to(b.device)
        model = b.model
        with torch.inference_mode():
            sparse, dense = model.prompt_encoder(points=None, boxes=mb, masks=masks_to_model(masks).to(b.device))
            low, iou = model.mask_decoder(emb, model.dense_pe(), sparse.to(emb.dtype), dense.to(emb.dtype))
            logits = postprocess(low, shape)
            if b.orientation == "ras":
                logits = logits.flip(1, 2).transpose(1, 2)
        return (logits > 0).cpu().numpy(), iou[:, 0].float().cpu().numpy()


def with_mask_prompts(segmenter):
    """``segmenter`` able to take mask prompts: LiteMedSAM (also behind a :class:`CachedSegmenter`) is wrapped;
    any other segmenter is returned as is (it takes ``masks=`` itself, or raises its own ``ConfigError``)."""
    if isinstance(segmenter, (LiteMedSAMSegmenter, CachedSegmenter)):
        return MaskPromptSegmenter(segmenter)
    return segmenter


class CachedSegmenter:
    """A LiteMedSAM segmenter that reuses the embedding of a slice it has already encoded."""

    name = "litemedsam"

    def __init__(self, base: LiteMedSAMSegmenter):
        self.base = base
        self.cache: dict[str, torch.Tensor] = {}
        self.encoded = 0

    def set_image(self, image: np.ndarray) -> None:
        self.base.set_image(image)
        arr = np.ascontiguousarray(image)
        key = hashlib.sha1(arr.tobytes() + str((arr.shape, arr.dtype)).encode()).hexdigest()
        if key in self.cache:
            self.base._embedding = self.cache[key]
        else:
            self.cache[key] = self.base.embedding()
            self.encoded += 1

    def predict(self, boxes: np.ndarray | None = None, masks: np.ndarray | None = None):
        if masks is not None:
            return MaskPromptSegmenter(self).predict(boxes=boxes, masks=masks)
        return self.base.predict(boxes=boxes)

    def clear(self) -> None:
        self.cache.clear()
