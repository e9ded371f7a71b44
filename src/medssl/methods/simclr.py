"""SimCLR (Chen et al., ICML 2020) as in the PCL/KAF code: two augmented views of the same slice,
the PCL-style projection head, SupCon with the other-view mask (= (tau/base_tau) NT-Xent), docs/methods.md#simclr.

Views (``pretrain.view_aug``): by default the project's grayscale views (``pretrain.views``, see
``medssl.data.views``: random resized crop, flips, rotation, brightness/contrast, gamma, noise, blur);
``finetune`` uses the fine-tuning augmentation block instead. Views are made from *normalised*
intensities (the cached slices), never from raw HU: the released PolyCL baseline clipped windowed HU to
[0, 1] before normalisation and got near-binary views.
"""

from __future__ import annotations

import torch

from medssl.config import AugConfig, PretrainConfig
from medssl.data.augment import BatchAugment
from medssl.data.views import ContrastiveViews
from medssl.methods.collapse import spread
from medssl.methods.losses import other_view_mask, supcon
from medssl.methods.registry import PretrainMethod, ProjectionHead, register_method


@register_method("simclr")
class SimCLR(PretrainMethod):
    def __init__(self, encoder, cfg: PretrainConfig, aug: AugConfig):
        super().__init__(encoder, cfg, aug)
        self.head = ProjectionHead(encoder.out_channels[-1], cfg.proj_dim)
        self.augment = ContrastiveViews(cfg.views) if cfg.view_aug == "project" else BatchAugment(aug)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x)[-1])

    def views(self, x: torch.Tensor, g: torch.Generator, boxes: torch.Tensor | None = None) -> torch.Tensor:
        """Two views per slice; ``boxes`` (the batch's ``content``): crops stay inside the image content."""
        if isinstance(self.augment, ContrastiveViews):
            return torch.cat([self.augment(x, g, boxes), self.augment(x, g, boxes)])
        dummy = torch.zeros(x.shape[0], *x.shape[2:], dtype=torch.long, device=x.device)
        v1, _ = self.augment(x, dummy, g)
        v2, _ = self.augment(x, dummy, g)
        return torch.cat([v1, v2])

    def positives(self, batch: dict, b: int, device) -> torch.Tensor:
        return other_view_mask(b, device=device)

    def loss(self, batch: dict, generator: torch.Generator):
        x = batch["image"]
        z = self.embed(self.views(x, generator, batch.get("content"))).float()
        mask = self.positives(batch, x.shape[0], x.device)
        loss = supcon(z, mask, self.cfg.tau, self.cfg.base_tau)
        return loss, {"positives_per_row": float(mask.sum(1).float().mean()), **spread(z)}
