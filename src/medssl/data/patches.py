"""Random square training patches cut from batches of canvas slices, on the device (``train.patch_size``).

nnU-Net style foreground oversampling: with probability ``fg_prob`` (per sample) the patch is centred on
a voxel of one foreground class (the class drawn uniformly among those present in the sample, so small
classes are seen as often as large ones; the voxel uniformly within it), clamped so the patch stays inside
the canvas; otherwise (and for samples without foreground) its position is uniform over all valid origins.

Every call draws the same number of values from the generator whatever the labels hold (four per
sample), so the draws that follow (the augmentation) do not depend on the data, and a resumed run
cuts the same patches as an uninterrupted one.
"""

from __future__ import annotations

import torch


def patch_active(patch: int, size: int) -> bool:
    """True where ``patch`` is a real crop of a ``size`` canvas (0 or ``size`` mean the whole canvas)."""
    return 0 < patch < size


@torch.no_grad()
def sample_patch_origins(label: torch.Tensor, patch: int, fg_prob: float, generator: torch.Generator
                         ) -> torch.Tensor:
    """(B, H, W) integer labels -> (B, 2) long top-left corners (row, column) of ``patch`` x ``patch`` crops."""
    b, h, w = label.shape
    if patch > h or patch > w:
        raise ValueError(f"patch {patch} does not fit a {h}x{w} canvas")
    dev = label.device
    coin = torch.rand(b, generator=generator, device=dev) < fg_prob
    u_pos = torch.rand(b, 2, generator=generator, device=dev)
    u_fg = torch.rand(b, generator=generator, device=dev)
    u_cls = torch.rand(b, generator=generator, device=dev)
    hi = torch.tensor([h - patch, w - patch], device=dev)
    uniform = torch.minimum((u_pos * (hi + 1)).long(), hi)  # uniform over 0..hi

    flat_lab = label.reshape(b, h * w).long()
    n_cls = int(flat_lab.max()) + 1 if flat_lab.numel() else 1
    if n_cls > 1:  # one foreground class per sample, uniformly among the classes it contains
        present = torch.zeros(b, n_cls, dtype=torch.long, device=dev).scatter_(1, flat_lab, 1)[:, 1:]
        n_present = present.sum(1)
        kc = torch.minimum((u_cls * n_present).long(), (n_present - 1).clamp(min=0))
        cls = torch.searchsorted(present.cumsum(1), (kc + 1)[:, None]).squeeze(1).clamp(max=n_cls - 2) + 1
        fg = flat_lab == cls[:, None]
    else:
        fg = flat_lab > 0
    csum = fg.long().cumsum(1)  # integer cumsum: deterministic on CUDA too
    n_fg = csum[:, -1]
    k = torch.minimum((u_fg * n_fg).long(), (n_fg - 1).clamp(min=0))  # k-th foreground voxel, 0-based
    flat = torch.searchsorted(csum, (k + 1)[:, None]).squeeze(1).clamp(max=h * w - 1)
    centre = torch.stack([flat // w, flat % w], 1)
    centred = (centre - patch // 2).clamp(min=0)
    centred = torch.minimum(centred, hi)
    use_fg = coin & (n_fg > 0)
    return torch.where(use_fg[:, None], centred, uniform)


def crop_at(image: torch.Tensor, label: torch.Tensor, origins: torch.Tensor, patch: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop (B, C, H, W) images and (B, H, W) labels at per-sample (row, column) ``origins``."""
    b = image.shape[0]
    ar = torch.arange(patch, device=image.device)
    rows = (origins[:, 0:1].to(image.device) + ar)[:, :, None]  # (B, P, 1)
    cols = (origins[:, 1:2].to(image.device) + ar)[:, None, :]  # (B, 1, P)
    idx = torch.arange(b, device=image.device)[:, None, None]
    img = image.permute(0, 2, 3, 1)[idx, rows, cols].permute(0, 3, 1, 2).contiguous()  # (B, C, P, P)
    lab = label[idx, rows, cols].contiguous()  # (B, P, P)
    return img, lab


@torch.no_grad()
def random_patches(image: torch.Tensor, label: torch.Tensor, patch: int, fg_prob: float,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One random ``patch`` x ``patch`` crop per sample of (B, C, H, W) images and (B, H, W) labels."""
    origins = sample_patch_origins(label, patch, fg_prob, generator)
    return crop_at(image, label, origins, patch)
