"""2D slicing of canonical volumes and the exact, invertible fit of a slice to the network size.

``SliceFit`` maps an (h, w) slice onto a (size, size) canvas: an optional isotropic rescale (OpenCV;
bilinear for images, centre-aligned nearest for labels), then centre padding. ``inverse`` maps network outputs
(class probabilities) back onto the (h, w) grid, so predictions are made at the input's own
resolution.
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


@dataclass(frozen=True)
class SliceFit:
    h: int
    w: int
    size: int
    mode: str = "pad"  # "pad" (downscale only when larger) or "resize" (always scale to fit)

    @property
    def scale(self) -> float:
        s = min(self.size / self.h, self.size / self.w)
        return min(1.0, s) if self.mode == "pad" else s

    @property
    def scaled_shape(self) -> tuple[int, int]:
        s = self.scale
        if s == 1.0:
            return self.h, self.w
        return max(1, min(self.size, round(self.h * s))), max(1, min(self.size, round(self.w * s)))

    @property
    def offsets(self) -> tuple[int, int]:
        sh, sw = self.scaled_shape
        return (self.size - sh) // 2, (self.size - sw) // 2

    def forward(self, img: np.ndarray, *, label: bool = False, fill: float = 0.0) -> np.ndarray:
        """(h, w) -> (size, size)."""
        sh, sw = self.scaled_shape
        if (sh, sw) != (self.h, self.w):
            # INTER_NEAREST samples floor(dst * scale): labels would sit ~half an output pixel off the
            # (centre-aligned) bilinear image; INTER_NEAREST_EXACT samples pixel centres like INTER_LINEAR
            interp = cv2.INTER_NEAREST_EXACT if label else cv2.INTER_LINEAR
            src = img.astype(np.float32) if not label else img.astype(np.uint8)
            img = cv2.resize(src, (sw, sh), interpolation=interp)
        out = np.full((self.size, self.size), fill, dtype=img.dtype)
        oy, ox = self.offsets
        out[oy:oy + sh, ox:ox + sw] = img
        return out

    def inverse(self, probs: np.ndarray) -> np.ndarray:
        """(C, size, size) class scores -> (C, h, w), bilinear when the fit rescaled."""
        sh, sw = self.scaled_shape
        oy, ox = self.offsets
        crop = probs[:, oy:oy + sh, ox:ox + sw]
        if (sh, sw) == (self.h, self.w):
            return crop
        return np.stack([cv2.resize(c.astype(np.float32), (self.w, self.h), interpolation=cv2.INTER_LINEAR)
                         for c in crop])
