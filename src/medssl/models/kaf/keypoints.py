"""SIFT keypoints for KAF (docs/kaf.md#keypoints): detection with OpenCV and a padded batch type.

Coordinates are float pixel positions ``(x, y)`` (column, row; OpenCV's order) in the frame of the image
that was given, pixel centres at integers. The released code stores (y, x); the order is a convention only, it is
used consistently everywhere here (docs/kaf.md#released-code-defects, 10).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace

import cv2
import numpy as np
import torch
from torch import Tensor

from medssl.data.cache import PAD_VALUE
from medssl.errors import ConfigError

__all__ = ["Keypoints", "KeypointSettings", "detect_keypoints", "detect_batch", "DESC_DIM"]

DESC_DIM = 128


@dataclass(frozen=True)
class KeypointSettings:
    """How keypoints are detected; part of the model options, so training and inference agree."""

    max_keypoints: int = 0  # keep at most this many (strongest SIFT response first); 0 = all (paper)
    upsample: int = 1  # run SIFT on a bicubic x`upsample` copy, coordinates mapped back (cpu preset: 4)
    dedupe: bool = False  # keep the strongest response per integer pixel cell (cpu preset on)
    contrast_threshold: float = 0.04  # OpenCV SIFT_create defaults
    edge_threshold: float = 10.0
    n_octave_layers: int = 3
    sigma: float = 1.6

    def __post_init__(self) -> None:
        if self.max_keypoints < 0:
            raise ConfigError(f"model.options.max_keypoints must be >= 0 (0 = all), got {self.max_keypoints}")
        if self.upsample < 1:
            raise ConfigError(f"model.options.sift_upsample must be >= 1, got {self.upsample}")

    def key(self) -> str:
        """A short hash naming these settings (the on-disk keypoint cache is keyed by it)."""
        blob = json.dumps({"v": 2, **asdict(self)}, sort_keys=True).encode()  # 2: no keypoints on the frame
        return hashlib.sha256(blob).hexdigest()[:12]


FRAME_MARGIN = 2  # px: SIFT answers the step from padding to image within a few pixels of the frame


def content_box(img: np.ndarray) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1) of the pixels that differ from the canvas padding (``PAD_VALUE``); None when the slice
    has no padding around it (or is all padding)."""
    inside = img != PAD_VALUE
    rows, cols = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
    if not len(rows):
        return None
    box = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    return None if box == (0, img.shape[0], 0, img.shape[1]) else box


def _to_uint8(image: np.ndarray, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Per-slice min-max scaling to uint8, over the content ``box`` only (padding excluded);
    a constant slice gives zeros."""
    img = np.asarray(image, dtype=np.float32)
    ref = img if box is None else img[box[0]:box[1], box[2]:box[3]]
    lo, hi = float(ref.min()), float(ref.max())
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros(img.shape, np.uint8)
    return np.clip(np.round((img - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


_SIFT: dict[tuple, cv2.SIFT] = {}


def _sift(s: KeypointSettings) -> cv2.SIFT:
    key = (s.n_octave_layers, s.contrast_threshold, s.edge_threshold, s.sigma)
    if key not in _SIFT:
        _SIFT[key] = cv2.SIFT_create(nfeatures=0, nOctaveLayers=s.n_octave_layers,
                                     contrastThreshold=s.contrast_threshold, edgeThreshold=s.edge_threshold,
                                     sigma=s.sigma)
    return _SIFT[key]


def detect_keypoints(image2d: np.ndarray, settings: KeypointSettings | None = None, *, with_desc: bool = True,
                     **overrides) -> tuple[np.ndarray, np.ndarray | None]:
    """SIFT on one (H, W) slice -> ``xy`` (n, 2) float32 (x, y) and ``desc`` (n, 128) float32.

    Sorted by SIFT response, strongest first (ties by position, so the order is deterministic). With
    ``upsample`` = k, SIFT runs on a bicubic k-times copy and a position u maps back to (u + 0.5) / k - 0.5
    (pixel-centre convention of ``cv2.resize``). When the slice sits on a padded canvas (a border of
    ``PAD_VALUE``), keypoints within ``FRAME_MARGIN`` px of the frame are dropped and the uint8 scaling uses the
    content only, so keypoints never mark the frame. Positions are clipped to [0, W-1] x [0, H-1] (the released
    code's rounding could reach H) and stay sub-pixel; the model rounds them at the gather.
    ``with_desc=False`` skips the descriptors (``desc`` is None): the same keypoints, about half the time.
    """
    s = replace(settings or KeypointSettings(), **overrides) if overrides else (settings or KeypointSettings())
    img = np.asarray(image2d)
    if img.ndim != 2:
        raise ConfigError(f"detect_keypoints: expected a 2D slice, got shape {img.shape}")
    h, w = img.shape
    box = content_box(img)  # canvas padding around the slice: no keypoint on its frame
    u8 = _to_uint8(img, box)
    if s.upsample > 1:
        u8 = cv2.resize(u8, (w * s.upsample, h * s.upsample), interpolation=cv2.INTER_CUBIC)
    if with_desc:
        kps, desc = _sift(s).detectAndCompute(u8, None)
    else:
        kps, desc = _sift(s).detect(u8, None), None
    if not kps:
        return np.zeros((0, 2), np.float32), (np.zeros((0, DESC_DIM), np.float32) if with_desc else None)
    xy = np.array([kp.pt for kp in kps], dtype=np.float64)
    resp = np.array([kp.response for kp in kps], dtype=np.float64)
    if s.upsample > 1:
        xy = (xy + 0.5) / s.upsample - 0.5
    xy[:, 0] = np.clip(xy[:, 0], 0, w - 1)
    xy[:, 1] = np.clip(xy[:, 1], 0, h - 1)
    order = np.lexsort((xy[:, 0], xy[:, 1], -resp))  # strongest first; ties by (y, x)
    if box is not None:
        y0, y1, x0, x1 = box
        p = xy[order]
        inside = ((p[:, 0] >= x0 + FRAME_MARGIN) & (p[:, 0] <= x1 - 1 - FRAME_MARGIN)
                  & (p[:, 1] >= y0 + FRAME_MARGIN) & (p[:, 1] <= y1 - 1 - FRAME_MARGIN))
        order = order[inside]
    keep = order
    if s.dedupe:  # the first occurrence per rounded cell is the strongest one (sorted above)
        cells = np.floor(xy[order] + 0.5).astype(np.int64)
        _, first = np.unique(cells[:, 1] * (w + 1) + cells[:, 0], return_index=True)
        keep = order[np.sort(first)]
    if s.max_keypoints:
        keep = keep[: s.max_keypoints]
    out_desc = None if desc is None else np.asarray(desc, np.float32)[keep]
    return xy[keep].astype(np.float32), out_desc


@dataclass
class Keypoints:
    """A padded batch of keypoints: ``xy`` (B, N, 2) float (x, y) pixels, ``valid`` (B, N) bool,
    optional ``desc`` (B, N, 128). Padded or dropped rows have ``valid`` False; order within a sample is
    kept by every operation (transport only clears ``valid``)."""

    xy: Tensor
    valid: Tensor
    desc: Tensor | None = None

    def __post_init__(self) -> None:
        if self.xy.dim() != 3 or self.xy.shape[-1] != 2 or self.valid.shape != self.xy.shape[:2]:
            raise ConfigError(f"Keypoints: expected xy (B, N, 2) and valid (B, N), got {tuple(self.xy.shape)} "
                              f"and {tuple(self.valid.shape)}")

    @property
    def batch_size(self) -> int:
        return self.xy.shape[0]

    @property
    def n(self) -> int:
        return self.xy.shape[1]

    def counts(self) -> Tensor:
        """(B,) number of valid keypoints per sample."""
        return self.valid.sum(1)

    def to(self, device) -> Keypoints:
        return Keypoints(self.xy.to(device), self.valid.to(device),
                         None if self.desc is None else self.desc.to(device))

    def select(self, index: Tensor | list[int]) -> Keypoints:
        """Rows ``index`` of the batch."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.xy.device)
        return Keypoints(self.xy[idx], self.valid[idx], None if self.desc is None else self.desc[idx])

    def sample(self, b: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The valid keypoints of sample ``b`` as numpy arrays (xy (n, 2), desc (n, 128) or None)."""
        m = self.valid[b].cpu()
        xy = self.xy[b].detach().cpu()[m].numpy()
        return xy, (None if self.desc is None else self.desc[b].detach().cpu()[m].numpy())

    @staticmethod
    def from_lists(xys: list[np.ndarray], descs: list[np.ndarray] | None = None, n: int | None = None
                   ) -> Keypoints:
        """Pad per-sample arrays to ``n`` rows (default: the largest count; more than ``n`` is an error)."""
        counts = [len(a) for a in xys]
        n_max = max(counts, default=0) if n is None else int(n)
        if counts and max(counts) > n_max:
            raise ConfigError(f"Keypoints.from_lists: a sample has {max(counts)} keypoints, more than n={n_max}")
        b = len(xys)
        xy = torch.zeros(b, n_max, 2, dtype=torch.float32)
        valid = torch.zeros(b, n_max, dtype=torch.bool)
        desc = torch.zeros(b, n_max, DESC_DIM, dtype=torch.float32) if descs is not None else None
        for i, a in enumerate(xys):
            k = len(a)
            if k:
                xy[i, :k] = torch.as_tensor(np.asarray(a, np.float32).reshape(k, 2))
                valid[i, :k] = True
                if desc is not None:
                    desc[i, :k] = torch.as_tensor(np.asarray(descs[i], np.float32).reshape(k, DESC_DIM))
        return Keypoints(xy, valid, desc)


def detect_batch(images: Tensor | np.ndarray, settings: KeypointSettings | None = None, *,
                 with_desc: bool = True) -> Keypoints:
    """SIFT on every slice of a (B, 1, H, W) or (B, H, W) batch -> padded :class:`Keypoints` (on the CPU)."""
    arr = images.detach().float().cpu().numpy() if torch.is_tensor(images) else np.asarray(images, np.float32)
    if arr.ndim == 4:
        if arr.shape[1] != 1:
            raise ConfigError(f"detect_batch: expected one channel, got shape {arr.shape}")
        arr = arr[:, 0]
    if arr.ndim != 3:
        raise ConfigError(f"detect_batch: expected (B, 1, H, W) or (B, H, W), got shape {arr.shape}")
    found = [detect_keypoints(a, settings, with_desc=with_desc) for a in arr]  # padded to the largest count
    return Keypoints.from_lists([xy for xy, _ in found], [d for _, d in found] if with_desc else None)
