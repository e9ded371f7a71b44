"""Training augmentation for batches of 2D slices, on the training device, from PyTorch primitives.

Spatial: flips, rotation, isotropic scaling (one affine matrix per sample) and a smooth elastic
displacement (random control-point offsets, bicubically upsampled), composed into a single sampling
grid and applied with ``torch.nn.functional.grid_sample``: bilinear for images, nearest for labels,
border padding. Intensity, on normalised intensities: multiplicative and additive jitter and
Gaussian noise.

Why not MONAI's per-sample dictionary transforms: on 2 CPU cores they cost about 8 ms per 64x64
sample (MetaTensor bookkeeping and eight transforms per sample), 126 ms per batch of 16, about as
long as the network's own step; one warp per batch costs 3.5 ms and runs on the GPU when training
does (benchmarks/bench_augment.py).

Randomness comes from an explicit ``torch.Generator`` seeded from (run seed, epoch, step, rank),
so a resumed or distributed run draws exactly the same augmentation as an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medssl.config import AugConfig


@dataclass(frozen=True)
class Warp:
    """The spatial part of one batch augmentation, in ``grid_sample`` terms (``align_corners=False``).

    Output pixel o (normalised coordinates o_n, x first) samples the input at
    ``theta[:, :, :2] @ o_n + theta[:, :, 2] + disp(o)``; ``disp`` (B, H, W, 2) is the elastic displacement
    in normalised units at each output pixel centre, or None. ``medssl.models.kaf.transport`` inverts it
    to move point coordinates from input to output.
    """

    theta: torch.Tensor  # (B, 2, 3)
    disp: torch.Tensor | None  # (B, H, W, 2) or None
    size: tuple[int, int]  # (H, W)


def sample_seed(base: int, epoch: int, row: int) -> int:
    """A seed that is a pure function of (run seed, epoch, step or row)."""
    return int((base * 1_000_003 + epoch * 100_003 + row * 7919 + 17) % (2**32 - 1))


class BatchAugment:
    """``(image (B,1,H,W) float, label (B,H,W) int) -> augmented copies``, all ops per sample."""

    def __init__(self, cfg: AugConfig):
        self.cfg = cfg

    def _uniform(self, g, n, lo, hi, device):
        return lo + (hi - lo) * torch.rand(n, generator=g, device=device)

    def _coin(self, g, n, p, device):
        return torch.rand(n, generator=g, device=device) < p

    def _affine(self, g, b: int, device) -> torch.Tensor:
        """(B, 2, 3) matrices mapping output to input coordinates (normalised, x first)."""
        c = self.cfg
        angle = torch.zeros(b, device=device)
        if c.rotate_prob > 0 and c.rotate_deg > 0:
            r = math.radians(c.rotate_deg)
            angle = torch.where(self._coin(g, b, c.rotate_prob, device), self._uniform(g, b, -r, r, device), angle)
        scale = torch.ones(b, device=device)
        if c.scale_prob > 0:
            lo, hi = c.scale_range
            scale = torch.where(self._coin(g, b, c.scale_prob, device), self._uniform(g, b, lo, hi, device), scale)
        flip = torch.ones(b, 2, device=device)  # (x, y) signs
        for ax in c.flip_axes:  # axis 0 = rows (y), axis 1 = columns (x)
            hit = self._coin(g, b, c.flip_prob, device)
            flip[:, 1 - int(ax)] = torch.where(hit, -1.0, 1.0) * flip[:, 1 - int(ax)]
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale  # zoom in by `scale`
        theta = torch.zeros(b, 2, 3, device=device)
        theta[:, 0, 0], theta[:, 0, 1] = cos * flip[:, 0], -sin * flip[:, 1]
        theta[:, 1, 0], theta[:, 1, 1] = sin * flip[:, 0], cos * flip[:, 1]
        return theta

    def _elastic(self, g, b: int, h: int, w: int, device) -> torch.Tensor | None:
        c = self.cfg
        if c.elastic_prob <= 0:
            return None
        hit = self._coin(g, b, c.elastic_prob, device).float()
        gh, gw = max(2, round(h / c.elastic_spacing) + 1), max(2, round(w / c.elastic_spacing) + 1)
        lo, hi = c.elastic_magnitude
        mag = self._uniform(g, b, lo, hi, device) * hit  # pixels
        coarse = (torch.rand(b, 2, gh, gw, generator=g, device=device) * 2 - 1) * mag[:, None, None, None]
        field = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)  # (B, 2, H, W) px
        scale = torch.tensor([2.0 / w, 2.0 / h], device=device)[None, :, None, None]  # px -> normalised
        return (field * scale).permute(0, 2, 3, 1)  # (B, H, W, 2), (x, y)

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, label: torch.Tensor, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        img, lab, _ = self.apply(image, label, generator)
        return img, lab

    @torch.no_grad()
    def apply(self, image: torch.Tensor, label: torch.Tensor | None, generator: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor | None, Warp]:
        """As ``__call__`` (same draws, identical outputs) but ``label`` may be None, and the spatial
        :class:`Warp` used is returned too (to carry point coordinates through the same warp)."""
        c, g = self.cfg, generator
        b, _, h, w = image.shape
        dev = image.device
        theta = self._affine(g, b, dev)
        grid = F.affine_grid(theta, [b, 1, h, w], align_corners=False)
        disp = self._elastic(g, b, h, w, dev)
        if disp is not None:
            grid = grid + disp
        img = F.grid_sample(image.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
        lab = None
        if label is not None:
            lab = F.grid_sample(label[:, None].float(), grid, mode="nearest", padding_mode="border",
                                align_corners=False)[:, 0].round().to(label.dtype)
        if c.intensity_prob > 0:
            s = torch.where(self._coin(g, b, c.intensity_prob, dev),
                            self._uniform(g, b, 1 - c.intensity_scale, 1 + c.intensity_scale, dev), 1.0)
            t = torch.where(self._coin(g, b, c.intensity_prob, dev),
                            self._uniform(g, b, -c.intensity_shift, c.intensity_shift, dev), 0.0)
            img = img * s[:, None, None, None] + t[:, None, None, None]
        if c.noise_prob > 0:
            std = torch.where(self._coin(g, b, c.noise_prob, dev), self._uniform(g, b, 0, c.noise_std, dev), 0.0)
            img = img + torch.randn(img.shape, generator=g, device=dev) * std[:, None, None, None]
        return img, lab, Warp(theta=theta, disp=disp, size=(h, w))


def build_augmentation(cfg: AugConfig) -> BatchAugment | None:
    return BatchAugment(cfg) if cfg.enabled else None


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def augment(pipeline: BatchAugment | None, image: np.ndarray, label: np.ndarray, seed: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """One (H, W) image and label -> augmented copies (a convenience wrapper around the batch op)."""
    if pipeline is None:
        return image, label
    x = torch.from_numpy(np.ascontiguousarray(image, np.float32))[None, None]
    y = torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))[None]
    xo, yo = pipeline(x, y, make_generator(seed))
    return xo[0, 0].numpy(), yo[0].numpy()
