"""PCL: positional contrastive learning (Zeng et al., MICCAI 2021), docs/pretraining.md.

Views and head as SimCLR; positives are all embeddings whose slice positions pos = (k+1)/Z lie
strictly closer than ``pretrain.pcl.theta`` (always including the other view), loss SupCon. Where slice
position barely predicts appearance (``pretrain.position_r2_min``, :mod:`.position_gate`) positives stay
within each scan.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from medssl.errors import ConfigError
from medssl.methods.losses import pcl_positive_mask
from medssl.methods.position_gate import PositionGate
from medssl.methods.registry import register_method
from medssl.methods.simclr import SimCLR


@dataclass
class PCLOptions:
    """``pretrain.pcl``: theta = the largest position difference of a positive pair (0.1 CT-like, 0.35 ACDC-like)."""

    theta: float = 0.1

    def __post_init__(self) -> None:
        if not self.theta >= 0:
            raise ConfigError(f"config key 'pretrain.pcl.theta' must be >= 0, got {self.theta}")


@register_method("pcl")
class PCL(PositionGate, SimCLR):
    options_cls = PCLOptions

    def select_rows(self, cache, rows: np.ndarray) -> np.ndarray:
        self.counts = self.gate(cache, rows)
        return np.asarray(rows)

    def positives(self, batch: dict, b: int, device) -> torch.Tensor:
        return pcl_positive_mask(batch["rel_pos"], self.opts.theta, self.scans(batch)).to(device)
