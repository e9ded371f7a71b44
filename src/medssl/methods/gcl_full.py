"""GCL-full ("GLCL-full"): Chaitanya et al.'s global stage, then the local (decoder-level) stage.

Stage 1 (the first ``1 - pretrain.gcl.local_fraction`` of the steps) is exactly :class:`GCL`: the
global partition loss on the encoder. Stage 2 freezes the encoder (no gradients, BatchNorm in eval
mode) and trains the first ``pretrain.gcl.local_blocks`` decoder stages plus a small head g2 (1x1 conv
without bias -> BN -> ReLU -> 1x1 conv) with the local loss (strategy L^R): two *intensity-only*
views of the same slice (brightness/contrast, so region u of one view is region u of the other),
``pretrain.gcl.local_regions`` K x K regions at fixed positions, the ``local_neg`` nearest regions of both
views as negatives, tau = ``pretrain.tau``.

Transfer: the checkpoint's meta lists ``transfer_decoder_stages``; ``medssl finetune --init`` then
loads the encoder **and** those decoder stages (GLCL-full); the rest of the decoder and the head
start from scratch. Our UNet's decoder stage 2 gives a 1/4-resolution map, which is what the GCL
README's "3 decoder blocks" gives in its own network; hence the default of 2.
"""

from __future__ import annotations

import torch
from torch import nn

from medssl.methods.gcl import GCL
from medssl.methods.losses import gcl_local_loss
from medssl.methods.registry import register_method


@register_method("gcl-full")
class GCLFull(GCL):
    options_section = "gcl"  # GCL's options: the global stage's and the local_* keys
    uses_decoder = True
    ddp_find_unused = True  # stage 1 leaves the decoder unused, stage 2 the encoder and the global head

    def __init__(self, encoder, cfg, aug, decoder: nn.Module):
        super().__init__(encoder, cfg, aug)
        self.decoder = decoder  # the segmentation model's decoder; only the first stages are trained
        self.n_blocks = self.opts.local_blocks
        c = encoder.out_channels[-1 - self.n_blocks]  # stage k outputs the channels of skip 4-k
        self.g2 = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                                nn.Conv2d(c, c, 1))
        self.transfer_decoder_stages = list(range(self.n_blocks))
        self.step, self.total = 0, 1

    def set_step(self, step: int, total: int) -> None:
        self.step, self.total = step, max(1, total)

    @property
    def local_stage(self) -> bool:
        return self.step >= round((1 - self.opts.local_fraction) * self.total)

    def _decode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        *skips, x = feats
        for stage, skip in list(zip(self.decoder.stages, reversed(skips)))[: self.n_blocks]:
            x = stage(x, skip)
        return x

    def _intensity_view(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        v = self.cfg.views
        b = x.shape[0]
        add = (torch.rand(b, generator=g, device=x.device) * 2 - 1) * v.brightness
        mul = v.contrast[0] + (v.contrast[1] - v.contrast[0]) * torch.rand(b, generator=g, device=x.device)
        return x * mul[:, None, None, None] + add[:, None, None, None]

    def loss(self, batch: dict, generator: torch.Generator):
        if not self.local_stage:
            loss, logs = super().loss(batch, generator)
            return loss, {**logs, "stage": 1.0}
        x = batch["image"].float()
        self.encoder.eval()  # frozen: no gradients, BatchNorm statistics kept
        with torch.no_grad():
            f1, f2 = self.encoder(self._intensity_view(x, generator)), self.encoder(self._intensity_view(x, generator))
        d1, d2 = self.g2(self._decode(f1)), self.g2(self._decode(f2))
        loss = gcl_local_loss(d1.float(), d2.float(), region_size=self.opts.local_region_size,
                              n_regions=self.opts.local_regions, n_neg=self.opts.local_neg, tau=self.cfg.tau)
        return loss, {"stage": 2.0}
