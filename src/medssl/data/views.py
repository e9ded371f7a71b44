"""Contrastive views for grayscale slices (the project's default augmentation for SimCLR, PCL and GCL).

Used by SimCLR, PCL and GCL's global stage: two independent draws of :class:`ContrastiveViews` on the
same batch give the two views. Everything runs batched on the training device from PyTorch ops:

* spatial, one ``grid_sample`` per batch: random resized crop (area fraction ``crop_scale``, aspect
  ratio ``crop_ratio`` relative to the slice's own, log-uniform, anywhere inside the slice, resized back to the
  input size; given the slices' content boxes, inside the content only, so that no view shows the padding), flips
  per axis, rotation ±``rotate_deg``;
* intensity on [0, 1]-rescaled intensities (each view's 1st-99th percentile range, mapped back afterwards,
  so the views of z-scored MRI and windowed CT are treated alike and never on raw HU, and a few bright
  voxels cannot squeeze the anatomy into a sliver of the range): additive brightness
  and multiplicative contrast (together, p ``intensity_prob``), gamma, Gaussian noise, Gaussian blur
  (separable, per-sample sigma, grouped convolution).

The natural-image crop scale 0.08 is not used: at 64-128 px it leaves a few voxels of anatomy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from medssl.config import ViewAugConfig


class ContrastiveViews:
    """``(x (B,1,H,W), generator) -> one augmented view``; call twice for two views."""

    def __init__(self, cfg: ViewAugConfig):
        self.cfg = cfg

    @staticmethod
    def _u(g, n, lo, hi, dev):
        return lo + (hi - lo) * torch.rand(n, generator=g, device=dev)

    @staticmethod
    def _coin(g, n, p, dev):
        return torch.rand(n, generator=g, device=dev) < p

    def _theta(self, g, b: int, h: int, w: int, dev, boxes: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 2, 3) output->input maps (normalised coordinates, x first): crop ∘ rotation ∘ flip.

        With ``boxes`` (B, 4) canvas boxes (y0, y1, x0, x1) of the image content, each crop is drawn inside
        its box, relative to the largest square in it (``ratio`` 1 = a square crop), and shrunk so that
        its rotation stays inside too: no view shows padding or the frame's size and shape.
        """
        c = self.cfg
        lo, hi = c.crop_scale
        area = self._u(g, b, lo, hi, dev)
        log_r = self._u(g, b, math.log(c.crop_ratio[0]), math.log(c.crop_ratio[1]), dev)
        ratio = torch.exp(log_r)  # crop aspect relative to the slice's own (1 = same shape as the slice)
        angle = torch.zeros(b, device=dev)
        if c.rotate_prob > 0 and c.rotate_deg > 0:
            r = math.radians(c.rotate_deg)
            angle = torch.where(self._coin(g, b, c.rotate_prob, dev), self._u(g, b, -r, r, dev), angle)
        if boxes is None:
            sw = torch.sqrt(area * ratio).clamp(max=1.0)  # fractions of the width / height
            sh = torch.sqrt(area / ratio).clamp(max=1.0)
            cx = self._u(g, b, -1, 1, dev) * (1 - sw)  # crop centre, crop kept inside the slice
            cy = self._u(g, b, -1, 1, dev) * (1 - sh)
        else:
            bx = boxes.to(dev, torch.float32)
            bh, bw = bx[:, 1] - bx[:, 0], bx[:, 3] - bx[:, 2]  # content size in pixels
            side = torch.minimum(bh, bw)
            pw, ph = torch.sqrt(area * ratio) * side, torch.sqrt(area / ratio) * side  # crop size in pixels
            ca, sa = angle.cos().abs(), angle.sin().abs()
            ew, eh = pw * ca + ph * sa, pw * sa + ph * ca  # the rotated crop's bounding box
            k = torch.minimum(torch.ones_like(ew), torch.minimum(bw / ew, bh / eh))  # shrunk to fit the box
            pw, ph, ew, eh = pw * k, ph * k, ew * k, eh * k
            sw, sh = pw / w, ph / h
            mx = bx[:, 2] + ew / 2 + self._u(g, b, 0, 1, dev) * (bw - ew)  # crop centre in pixels
            my = bx[:, 0] + eh / 2 + self._u(g, b, 0, 1, dev) * (bh - eh)
            cx, cy = 2 * mx / w - 1, 2 * my / h - 1
        flip = torch.ones(b, 2, device=dev)
        for ax in c.flip_axes:  # axis 0 = rows (y), axis 1 = columns (x)
            hit = self._coin(g, b, c.flip_prob, dev)
            flip[:, 1 - int(ax)] = torch.where(hit, -1.0, 1.0)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.zeros(b, 2, 3, device=dev)
        theta[:, 0, 0], theta[:, 0, 1] = sw * cos * flip[:, 0], -sw * sin * flip[:, 1]
        theta[:, 1, 0], theta[:, 1, 1] = sh * sin * flip[:, 0], sh * cos * flip[:, 1]
        theta[:, 0, 2], theta[:, 1, 2] = cx, cy
        return theta

    def _blur(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian blur with one sigma per sample (sigma 0 = identity)."""
        b, _, h, w = x.shape
        radius = max(1, math.ceil(3 * max(self.cfg.blur_sigma)))
        t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
        k = torch.exp(-0.5 * (t[None] / sigma.clamp(min=1e-3)[:, None]) ** 2)
        k = k / k.sum(1, keepdim=True)  # (B, K); sigma -> 0 gives a delta
        y = x.reshape(1, b, h, w)
        y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), k[:, None, None, :], groups=b)
        y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), k[:, None, :, None], groups=b)
        return y.reshape(b, 1, h, w)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, generator: torch.Generator, boxes: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """One view of each slice; ``boxes`` (B, 4): crop inside each slice's content (see ``_theta``)."""
        with torch.profiler.record_function("medssl.views"):
            return self._views(x, generator, boxes)

    def _views(self, x: torch.Tensor, generator: torch.Generator, boxes: torch.Tensor | None) -> torch.Tensor:
        c, g = self.cfg, generator
        b, _, h, w = x.shape
        dev = x.device
        x = x.float()
        grid = F.affine_grid(self._theta(g, b, h, w, dev, boxes), [b, 1, h, w], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        # intensity ops on a robust per-view scale: the 1st-99th percentile range maps to [0, 1] (a few bright
        # voxels would inflate a min-max range and let brightness / gamma jitter wipe out the slice)
        q = torch.quantile(x.flatten(1), torch.tensor([0.01, 0.99], device=dev), dim=1).T  # (B, 2)
        lo = q[:, :1, None, None]
        span = (q[:, 1:, None, None] - lo).clamp(min=1e-6)
        y = (x - lo) / span  # [0, 1] per view, between its percentiles
        if c.intensity_prob > 0:
            hit = self._coin(g, b, c.intensity_prob, dev)
            add = torch.where(hit, self._u(g, b, -c.brightness, c.brightness, dev), 0.0)
            mul = torch.where(hit, self._u(g, b, c.contrast[0], c.contrast[1], dev), 1.0)
            y = y * mul[:, None, None, None] + add[:, None, None, None]
        if c.gamma_prob > 0:
            gam = torch.where(self._coin(g, b, c.gamma_prob, dev), self._u(g, b, c.gamma[0], c.gamma[1], dev), 1.0)
            y = y.clamp(min=0).pow(gam[:, None, None, None])
        if c.noise_prob > 0:
            std = torch.where(self._coin(g, b, c.noise_prob, dev), self._u(g, b, 0, c.noise_std, dev), 0.0)
            y = y + torch.randn(y.shape, generator=g, device=dev) * std[:, None, None, None]
        if c.blur_prob > 0:
            sig = torch.where(self._coin(g, b, c.blur_prob, dev),
                              self._u(g, b, c.blur_sigma[0], c.blur_sigma[1], dev), 0.0)
            y = self._blur(y, sig)
        return y * span + lo


def content_windows(x: torch.Tensor, boxes: torch.Tensor, side: int, generator: torch.Generator) -> torch.Tensor:
    """A ``side`` x ``side`` pixel window at a random position inside each slice's content box, resized to
    the canvas: every slice at the same scale, and no pixel of padding or of the frame in any of them.

    ``x`` (B, 1, H, W) canvas slices, ``boxes`` (B, 4) their content boxes (y0, y1, x0, x1), as in
    ``SliceCache.content``; ``side`` at most the smallest box side (PolyCL: the smallest over its slices).
    """
    b, _, h, w = x.shape
    dev = x.device
    bx = boxes.to(dev, torch.float32)
    s = torch.minimum(bx[:, 1] - bx[:, 0], bx[:, 3] - bx[:, 2]).clamp(max=float(side))
    u = torch.rand(b, 2, generator=generator, device=dev)
    mx = bx[:, 2] + s / 2 + u[:, 0] * (bx[:, 3] - bx[:, 2] - s)
    my = bx[:, 0] + s / 2 + u[:, 1] * (bx[:, 1] - bx[:, 0] - s)
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 1, 1] = s / w, s / h
    theta[:, 0, 2], theta[:, 1, 2] = 2 * mx / w - 1, 2 * my / h - 1
    grid = F.affine_grid(theta, [b, 1, h, w], align_corners=False)
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False).to(x.dtype)
