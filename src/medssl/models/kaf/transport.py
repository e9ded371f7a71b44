"""Exact transport of keypoint coordinates through the spatial augmentation (docs/kaf.md#exact-transport).

The released code painted keypoint ids into a label map, warped it with nearest neighbour and read each
id back as the mean of its pixels; padding and borders were filled with 0, which is also keypoint 0's id
(docs/kaf.md#released-code-defects, 1). Here the points go through the same parameters as the image instead:

* pad / crop / flip / the slice fit: closed-form shifts and reflections;
* the batch warp of :class:`medssl.data.augment.BatchAugment` (``grid_sample``, ``align_corners=False``):
  output pixel o samples the input at m(o) = A·o + t + e(o) (normalised coordinates, e the elastic
  displacement). A point p of the input appears at the o that solves m(o) = p. The affine part is
  inverted exactly (2x2 inverse, float64); with an elastic field the solution is the fixed point of
  o ← A⁻¹(p − t − e(o)), with e bilinearly interpolated between output pixel centres (the same
  continuous field the image warp sees), iterated at most ``max_iter`` times. It contracts because the
  field is smooth (|A⁻¹ ∇e| ≪ 1 for the displacements used); a point whose residual |m(o) − p| stays above
  ``tol`` pixels, or that lands outside [0, W−1] × [0, H−1], is marked invalid (dropped).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from medssl.data.augment import BatchAugment, Warp
from medssl.data.slicing import SliceFit
from medssl.models.kaf.keypoints import Keypoints

__all__ = [
    "transport_points",
    "augment_with_keypoints",
    "inside",
    "crop_points",
    "pad_points",
    "flip_points",
    "fit_points",
]


def inside(xy: Tensor, h: int, w: int) -> Tensor:
    """(..., 2) (x, y) -> bool mask of points within [0, W-1] x [0, H-1]."""
    return (xy[..., 0] >= 0) & (xy[..., 0] <= w - 1) & (xy[..., 1] >= 0) & (xy[..., 1] <= h - 1)


def _to_norm(xy: Tensor, size: Tensor) -> Tensor:
    return (2 * xy + 1) / size - 1  # pixel centres, align_corners=False


def _to_pixel(n: Tensor, size: Tensor) -> Tensor:
    return ((n + 1) * size - 1) / 2


def _sample_field(field: Tensor, o: Tensor) -> Tensor:
    """field (B, 2, H, W), o (B, N, 2) normalised -> (B, N, 2), bilinear between pixel centres."""
    out = F.grid_sample(field, o[:, None], mode="bilinear", padding_mode="border", align_corners=False)
    return out[:, :, 0].transpose(1, 2)


@torch.no_grad()
def transport_points(warp: Warp, xy: Tensor, valid: Tensor, *, max_iter: int = 20, tol: float = 0.5,
                     step_tol: float = 1e-5) -> tuple[Tensor, Tensor]:
    """Move input-frame points (B, N, 2) (x, y) through ``warp``; return output positions and validity.

    Invalid input rows stay invalid; a point is also invalid when it leaves the field of view or its
    elastic inversion misses by ``tol`` pixels or more. Computed in float64, returned as ``xy.dtype``.
    """
    h, w = warp.size
    dev = warp.theta.device
    size = torch.tensor([w, h], dtype=torch.float64, device=dev)
    p = _to_norm(xy.to(dev, torch.float64), size)
    a = warp.theta[:, :, :2].to(torch.float64)
    t = warp.theta[:, :, 2].to(torch.float64)
    a_inv = torch.linalg.inv(a)  # (B, 2, 2)
    rhs = p - t[:, None]

    def solve(e: Tensor | None) -> Tensor:
        r = rhs if e is None else rhs - e
        return torch.einsum("bij,bnj->bni", a_inv, r)

    o = solve(None)
    ok = valid.to(dev).clone()
    if warp.disp is not None and xy.shape[1]:
        field = warp.disp.to(torch.float64).permute(0, 3, 1, 2)  # (B, 2, H, W), normalised (x, y)
        step_n = step_tol * 2 / size  # stop when every point moved less than step_tol pixels
        for _ in range(max_iter):
            o_new = solve(_sample_field(field, o))
            done = ((o_new - o).abs() <= step_n).all()
            o = o_new
            if done:
                break
        m = torch.einsum("bij,bnj->bni", a, o) + t[:, None] + _sample_field(field, o)
        resid = ((m - p) * size / 2).norm(dim=-1)  # pixels
        ok &= resid < tol
    out = _to_pixel(o, size)
    ok &= inside(out, h, w)
    return out.to(xy.dtype), ok


def augment_with_keypoints(pipeline: BatchAugment | None, image: Tensor, label: Tensor | None,
                           keypoints: Keypoints, generator: torch.Generator, *, max_iter: int = 20,
                           tol: float = 0.5) -> tuple[Tensor, Tensor | None, Keypoints]:
    """Augment a batch like ``pipeline(image, label, generator)`` (same draws, identical image) and carry
    ``keypoints`` (input-frame pixels) through the same spatial warp. ``desc`` travels unchanged."""
    kp = keypoints.to(image.device)
    if pipeline is None:
        return image, label, kp
    img, lab, warp = pipeline.apply(image, label, generator)
    xy, valid = transport_points(warp, kp.xy, kp.valid, max_iter=max_iter, tol=tol)
    return img, lab, Keypoints(xy, valid, kp.desc)


def crop_points(xy: Tensor, valid: Tensor, start_xy: tuple[float, float] | Tensor, size_hw: tuple[int, int]
                ) -> tuple[Tensor, Tensor]:
    """A crop of ``size_hw`` starting at (x0, y0): p ← p − start; points outside the crop become invalid."""
    start = torch.as_tensor(start_xy, dtype=xy.dtype, device=xy.device)
    out = xy - start
    return out, valid & inside(out, *size_hw)


def pad_points(xy: Tensor, before_xy: tuple[float, float] | Tensor) -> Tensor:
    """Padding with (left, top) = ``before_xy`` pixels: p ← p + before."""
    return xy + torch.as_tensor(before_xy, dtype=xy.dtype, device=xy.device)


def flip_points(xy: Tensor, size_hw: tuple[int, int], axis: int) -> Tensor:
    """Mirror along ``axis`` (0 = rows / y, 1 = columns / x): v ← size − 1 − v."""
    out = xy.clone()
    col = 1 if axis == 0 else 0
    out[..., col] = size_hw[0 if axis == 0 else 1] - 1 - out[..., col]
    return out


def fit_points(fit: SliceFit, xy: Tensor) -> Tensor:
    """Points of an (h, w) slice -> the (size, size) canvas of :class:`SliceFit` (crop, rescale, centre pad).

    The rescale follows ``cv2.resize``'s pixel-centre convention: dst = (src + 0.5)·(dst_n / src_n) − 0.5.
    """
    sh, sw = fit.scaled_shape
    oy, ox = fit.offsets
    y0, _, x0, _ = fit.box
    ch, cw = fit.cropped_shape
    scale = torch.tensor([sw / cw, sh / ch], dtype=xy.dtype, device=xy.device)
    xy = xy - torch.tensor([x0, y0], dtype=xy.dtype, device=xy.device)
    return (xy + 0.5) * scale - 0.5 + torch.tensor([ox, oy], dtype=xy.dtype, device=xy.device)
