"""Overlay images for the experiment report: one slice of the image with the ground-truth and predicted contours.

    z = mid_slice(label, axis)                   # middle of the structure's extent along the slicing axis
    overlay_png(image, label, pred, axis, z, "case.png", spacing=image_spacing)

Ground truth is drawn in green, the prediction in red (every foreground class, one contour each); the picture is
at most 256 x 256 pixels with the voxel spacing's aspect ratio, intensities clipped to the slice's 1st-99th
percentiles, saved with a palette of grays and the two contour colours (about 20 kB). Plain matplotlib (Agg) and Pillow, no training and no
files read here.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

TRUTH_COLOR = "#00e000"
PRED_COLOR = "#ff2020"
GRAYS = 62  # the saved PNG has a palette: this many grays, and the two contour colours (about 20 kB a picture)


def mid_slice(label: np.ndarray, axis: int) -> int:
    """The slice in the middle of the foreground's extent along ``axis`` (the middle of the volume if empty)."""
    other = tuple(i for i in range(label.ndim) if i != axis)
    present = np.flatnonzero(np.asarray(label != 0).any(axis=other))
    if present.size == 0:
        return label.shape[axis] // 2
    return int((present[0] + present[-1]) // 2)


def _palette():
    """A palette image: :data:`GRAYS` gray levels, then the ground-truth and the prediction colour."""
    colors = [(int(v),) * 3 for v in np.linspace(0, 255, GRAYS).round()]
    colors += [tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in (TRUTH_COLOR, PRED_COLOR)]
    pal = Image.new("P", (1, 1))
    pal.putpalette([v for rgb in colors for v in rgb] + [0] * 3 * (256 - len(colors)))
    return pal


def _view(slice2d: np.ndarray) -> np.ndarray:
    """Canonical (RAS) slice -> display orientation (second axis up)."""
    return np.rot90(np.asarray(slice2d))


def overlay_png(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, axis: int, index: int, path: str | Path,
                spacing=(1.0, 1.0, 1.0), size: int = 256) -> Path:
    """Write slice ``index`` along ``axis`` of ``image`` with the contours of ``truth`` and ``pred`` as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medssl.data.atomic import atomic_path

    img, gt, pr = (_view(np.take(np.asarray(v), index, axis=axis)) for v in (image, truth, pred))
    lo, hi = np.percentile(img, [1, 99]) if img.size else (0.0, 1.0)
    sp = [float(s) for i, s in enumerate(spacing) if i != axis]
    fig = plt.figure(figsize=(size / 100, size / 100), dpi=100, facecolor="black")
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    # after rot90 rows run along the slice's second axis and columns along its first
    ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, aspect=sp[1] / sp[0],
              interpolation="bilinear")
    for mask, color in ((gt, TRUTH_COLOR), (pr, PRED_COLOR)):
        for c in np.unique(mask):
            if c != 0:
                ax.contour((mask == c).astype(float), levels=[0.5], colors=[color], linewidths=1.2)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, facecolor="black")
    plt.close(fig)
    picture = Image.open(buf).convert("RGB").quantize(palette=_palette(), dither=Image.Dither.NONE)
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG", optimize=True)
    return Path(path)
