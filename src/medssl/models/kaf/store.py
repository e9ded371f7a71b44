"""Keypoints of every cached slice, computed once and kept next to the slice cache (SIFT is
deterministic, so it runs once per slice; docs/kaf.md#keypoints).

Layout: ``<cache root>/keypoints-<settings key>/<case id>.npz`` with ``xy`` (n_total, 2) float32,
``desc`` (n_total, 128) uint8 (OpenCV's SIFT descriptors are integers in 0..255, so this is lossless) and
``offsets`` (Z + 1,) int64: slice k of the case owns rows offsets[k]:offsets[k+1]. A case's file is written
on first use, atomically (temporary name, then rename), so concurrent readers never see half a file; the
slice cache itself is immutable (a new cache key gives a new folder), so its sidecar can never go stale.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from medssl.data.atomic import atomic_path
from medssl.data.cache import SliceCache
from medssl.errors import DataError
from medssl.models.kaf.keypoints import DESC_DIM, Keypoints, KeypointSettings, detect_keypoints

__all__ = ["KeypointStore"]


def _file_name(case_id: str) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in case_id)
    return f"{safe}-{hashlib.sha1(case_id.encode()).hexdigest()[:8]}.npz"


class KeypointStore:
    """Per-row keypoints of a :class:`SliceCache` under fixed :class:`KeypointSettings`."""

    def __init__(self, cache: SliceCache, settings: KeypointSettings, folder: str | Path | None = None):
        self.cache, self.settings = cache, settings
        self.folder = Path(folder) if folder is not None else Path(cache.root) / f"keypoints-{settings.key()}"
        self._cases: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    # ------------------------------------------------------------------ per case
    def _compute(self, case_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        images, _ = self.cache.case_volume(case_id)
        xys, descs, offsets = [], [], [0]
        for img in images:
            xy, desc = detect_keypoints(np.asarray(img), self.settings)
            xys.append(xy)
            descs.append(desc.astype(np.uint8))
            offsets.append(offsets[-1] + len(xy))
        xy = np.concatenate(xys) if xys else np.zeros((0, 2), np.float32)
        desc = np.concatenate(descs) if descs else np.zeros((0, DESC_DIM), np.uint8)
        return xy.astype(np.float32), desc, np.asarray(offsets, np.int64)

    def _case(self, case_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if case_id in self._cases:
            return self._cases[case_id]
        path = self.folder / _file_name(case_id)
        arrays = None
        if path.is_file():
            try:
                with np.load(path) as z:
                    arrays = (z["xy"], z["desc"], z["offsets"])
            except (OSError, KeyError, ValueError) as exc:
                raise DataError(f"{path}: unreadable keypoint file ({exc}); delete it to recompute") from None
            a, b = self.cache.span(case_id)
            if len(arrays[2]) != b - a + 1:
                raise DataError(f"{path}: {len(arrays[2]) - 1} slices, the cache has {b - a}; delete it to recompute")
        else:
            arrays = self._compute(case_id)
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                with atomic_path(path) as tmp:
                    np.savez(tmp, xy=arrays[0], desc=arrays[1], offsets=arrays[2])
            except OSError as exc:  # a read-only cache: keep the keypoints in memory for this process only
                warnings.warn(f"{path}: keypoints not cached on disk ({exc}); recomputed in each process",
                              stacklevel=2)
        self._cases[case_id] = arrays
        return arrays

    # ------------------------------------------------------------------ per row
    def arrays(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """Keypoints of cache row ``row``: ``xy`` (n, 2) float32 and ``desc`` (n, 128) float32."""
        row = int(row)
        if not 0 <= row < len(self.cache.case_ids):
            raise DataError(f"{self.cache.root}: row {row} is not in the slice cache")
        case = str(self.cache.case_ids[row])
        xy, desc, offsets = self._case(case)
        k = row - self.cache.span(case)[0]
        a, b = int(offsets[k]), int(offsets[k + 1])
        return xy[a:b], desc[a:b].astype(np.float32)

    def count(self, row: int) -> int:
        return len(self.arrays(row)[0])

    def get(self, rows: Sequence[int] | torch.Tensor | np.ndarray, *, with_desc: bool = True,
            n: int | None = None) -> Keypoints:
        """Padded :class:`Keypoints` for a batch of cache rows (padding to the batch's largest count or ``n``)."""
        rows = rows.tolist() if hasattr(rows, "tolist") else list(rows)
        found = [self.arrays(r) for r in rows]
        return Keypoints.from_lists([xy for xy, _ in found], [d for _, d in found] if with_desc else None, n=n)
