"""2D slicing of canonical volumes and the exact, invertible fit of a slice to the network canvas.

``SliceFit`` maps an (h, w) slice onto a (size, size) canvas in three steps, each optional:

1. **crop** to a box ``(y0, y1, x0, x1)`` (``data.crop=foreground``: the volume's body bounding box);
2. **resample** to a target in-plane spacing (``data.spacing``: ``zoom`` = native / target spacing per axis),
   merged with the fit's own isotropic rescale (``fit: pad`` downscales only what is too large, ``fit: resize``
   always scales to fit) into one OpenCV resize: cubic for images, linear on one-hot labels then argmax
   (what nnU-Net and the KAF preprocessing do), so a label is never shifted against its image;
3. **centre padding** to the canvas.

``inverse`` maps network outputs (class probabilities) back onto the (h, w) grid: un-pad, linear resize to the
cropped box, and paste into the full slice with probability 1 for background outside the box. Predictions are
therefore made at the input's own resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


def volume_slices(array: np.ndarray, axis: int) -> np.ndarray:
    """Return the volume with the slicing axis first: shape (Z, h, w)."""
    return np.moveaxis(array, axis, 0)


def stack_slices(slices: np.ndarray, axis: int) -> np.ndarray:
    """Inverse of :func:`volume_slices` for arrays of shape (Z, h, w[, ...])."""
    return np.moveaxis(slices, 0, axis)


def foreground_box(volume: np.ndarray, axis: int) -> tuple[int, int, int, int] | None:
    """In-plane bounding box ``(y0, y1, x0, x1)`` of the voxels above the volume's minimum, over all slices.

    The volume is an intensity-normalised image, whose minimum is the background (air in CT after the window,
    the zero or clipped background of MRI), as nnU-Net's non-zero crop. None when nothing is above it.
    """
    sl = volume_slices(volume, axis)
    mask = (sl > sl.min()).any(0) if sl.size else np.zeros(sl.shape[1:], bool)
    if not mask.any():
        return None
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def resize_label(lab: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a label slice to ``shape`` (h, w): linear interpolation of each present class's one-hot, argmax."""
    values = np.unique(lab)
    if len(values) == 1:
        return np.full(shape, values[0], dtype=lab.dtype)
    onehot = np.stack([cv2.resize((lab == v).astype(np.float32), (shape[1], shape[0]),
                                  interpolation=cv2.INTER_LINEAR) for v in values])
    return values[onehot.argmax(0)].astype(lab.dtype)


@dataclass(frozen=True)
class SliceFit:
    h: int
    w: int
    size: int
    mode: str = "pad"  # "pad" (downscale only when larger) or "resize" (always scale to fit)
    zoom: tuple[float, float] = (1.0, 1.0)  # native / target spacing along rows and columns
    crop: tuple[int, int, int, int] | None = None  # (y0, y1, x0, x1) on the (h, w) slice; None = all of it

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.crop if self.crop is not None else (0, self.h, 0, self.w)

    @property
    def cropped_shape(self) -> tuple[int, int]:
        y0, y1, x0, x1 = self.box
        return y1 - y0, x1 - x0

    @property
    def scale(self) -> float:
        """The fit's isotropic rescale of the resampled slice (1 = none)."""
        ch, cw = self.cropped_shape
        rh, rw = ch * self.zoom[0], cw * self.zoom[1]
        s = min(self.size / rh, self.size / rw)
        return min(1.0, s) if self.mode == "pad" else s

    @property
    def scaled_shape(self) -> tuple[int, int]:
        """Shape of the cropped, resampled and rescaled slice on the canvas."""
        ch, cw = self.cropped_shape
        s = self.scale
        if s == 1.0 and tuple(self.zoom) == (1.0, 1.0):
            return ch, cw
        return (max(1, min(self.size, round(ch * self.zoom[0] * s))),
                max(1, min(self.size, round(cw * self.zoom[1] * s))))

    @property
    def offsets(self) -> tuple[int, int]:
        sh, sw = self.scaled_shape
        return (self.size - sh) // 2, (self.size - sw) // 2

    @property
    def content_box(self) -> tuple[int, int, int, int]:
        """(y0, y1, x0, x1) of the slice on the canvas; ``forward`` fills the rest."""
        sh, sw = self.scaled_shape
        oy, ox = self.offsets
        return oy, oy + sh, ox, ox + sw

    def forward(self, img: np.ndarray, *, label: bool = False, fill: float = 0.0) -> np.ndarray:
        """(h, w) -> (size, size)."""
        y0, y1, x0, x1 = self.box
        img = img[y0:y1, x0:x1]
        sh, sw = self.scaled_shape
        if (sh, sw) != img.shape:
            if label:
                img = resize_label(img.astype(np.uint8), (sh, sw))
            else:
                img = cv2.resize(img.astype(np.float32), (sw, sh), interpolation=cv2.INTER_CUBIC)
        out = np.full((self.size, self.size), fill, dtype=img.dtype)
        y0, y1, x0, x1 = self.content_box
        out[y0:y1, x0:x1] = img
        return out

    def inverse(self, probs: np.ndarray) -> np.ndarray:
        """(C, size, size) class scores -> (C, h, w): linear back to the cropped box, background outside it."""
        sh, sw = self.scaled_shape
        oy, ox = self.offsets
        crop = probs[:, oy:oy + sh, ox:ox + sw]
        ch, cw = self.cropped_shape
        if (sh, sw) != (ch, cw):
            crop = np.stack([cv2.resize(c.astype(np.float32), (cw, ch), interpolation=cv2.INTER_LINEAR)
                             for c in crop])
        if (ch, cw) == (self.h, self.w):
            return crop
        out = np.zeros((probs.shape[0], self.h, self.w), np.float32)
        out[0] = 1.0  # outside the kept region: background
        y0, y1, x0, x1 = self.box
        out[:, y0:y1, x0:x1] = crop
        return out
