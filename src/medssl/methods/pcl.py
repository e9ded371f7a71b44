"""PCL: positional contrastive learning (Zeng et al., MICCAI 2021), baselines.md §3.

Views and head as SimCLR; positives are all embeddings whose slice positions pos = (k+1)/Z lie
strictly closer than ``pretrain.pcl_theta`` (always including the other view), loss SupCon.
"""

from __future__ import annotations

import torch

from medssl.methods.losses import pcl_positive_mask
from medssl.methods.registry import register_method
from medssl.methods.simclr import SimCLR


@register_method("pcl")
class PCL(SimCLR):
    def positives(self, batch: dict, b: int, device) -> torch.Tensor:
        return pcl_positive_mask(batch["rel_pos"], self.cfg.pcl_theta).to(device)
