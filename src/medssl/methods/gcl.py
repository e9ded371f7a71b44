"""GCL global stage (Chaitanya et al., NeurIPS 2020): partition-based contrastive pretraining of the encoder.

Every volume is split into ``pretrain.gcl.parts`` contiguous partitions along the slice axis; images of the
same partition index in different volumes are treated as similar. Two augmented views per slice,
the PCL-style head, and either Chaitanya's loss (``formulation: chaitanya``: each positive pair
has its own numerator; for G^D / G^D- same-partition images leave the denominators) or the PCL
code's SupCon with partition positives (``supcon_partition``). Options: :class:`GCLOptions` (``pretrain.gcl``),
shared with ``gcl-full``.

Deviation (documented): batches are drawn uniformly from the pretraining slices, not as "one slice
per partition from each of m volumes"; the loss is defined for any batch composition. The local
(decoder-level) second stage is not implemented yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from medssl.config import check_choice
from medssl.errors import ConfigError
from medssl.methods.collapse import spread
from medssl.methods.losses import gcl_global_loss, gcl_partition, partition_positive_mask, supcon
from medssl.methods.losses.gcl import REGION_FRACTIONS
from medssl.methods.position_gate import PositionGate
from medssl.methods.registry import register_method
from medssl.methods.simclr import SimCLR


@dataclass
class GCLOptions:
    """``pretrain.gcl``: the global stage (gcl, gcl-full) and gcl-full's local stage (``local_*``)."""

    parts: int = 4  # partitions per volume along the slice axis
    strategy: str = "GD"  # global positives: "GD" (proposed), "GD-" or "GR" (SimCLR-like)
    formulation: str = "chaitanya"  # "chaitanya" (own numerator per pair) or "supcon_partition" (PCL code)
    local_fraction: float = 0.5  # gcl-full: share of the steps spent in the local stage (encoder frozen)
    local_blocks: int = 2  # gcl-full: decoder stages trained by the local loss (2 = a 1/4-resolution map)
    local_regions: int = 13  # gcl-full: K x K regions at fixed positions
    local_region_size: int = 3  # gcl-full: K
    local_neg: int = 5  # gcl-full: nearest neighbouring regions used as negatives

    def __post_init__(self) -> None:
        check_choice("pretrain.gcl.strategy", self.strategy, ("GD", "GD-", "GR"))
        check_choice("pretrain.gcl.formulation", self.formulation, ("chaitanya", "supcon_partition"))
        if self.parts < 1:
            raise ConfigError(f"config key 'pretrain.gcl.parts' must be >= 1, got {self.parts}")
        if not 0 < self.local_fraction < 1 or self.local_blocks not in (1, 2, 3, 4):
            raise ConfigError("config keys 'pretrain.gcl.local_fraction' must lie in (0, 1) and "
                              "'pretrain.gcl.local_blocks' in 1..4")
        if not 2 <= self.local_regions <= len(REGION_FRACTIONS):  # else the local stage fails half-way
            raise ConfigError(f"config key 'pretrain.gcl.local_regions' must lie in 2..{len(REGION_FRACTIONS)}, "
                              f"got {self.local_regions}")
        if not 1 <= self.local_neg < self.local_regions:
            raise ConfigError(f"config key 'pretrain.gcl.local_neg' must lie in 1..{self.local_regions - 1} "
                              f"(below pretrain.gcl.local_regions), got {self.local_neg}")
        if self.local_region_size < 1:
            raise ConfigError(f"config key 'pretrain.gcl.local_region_size' must be >= 1, got {self.local_region_size}")


@register_method("gcl")
class GCL(PositionGate, SimCLR):
    options_cls = GCLOptions

    def select_rows(self, cache, rows: np.ndarray) -> np.ndarray:
        gate = self.gate(cache, rows)
        self.counts = {"volumes": len(set(self.scan_of_row.values())), "slices": int(len(rows)),
                       "strategy": self.opts.strategy, "formulation": self.opts.formulation, **gate}
        return np.asarray(rows)

    def loss(self, batch: dict, generator: torch.Generator):
        x = batch["image"]
        b = x.shape[0]
        parts = gcl_partition(batch["slice"], batch["n_slices"], self.opts.parts).to(x.device)
        vols = torch.tensor([self.scan_of_row[int(r)] for r in batch["row"]], device=x.device)
        if not self.cross_scan:  # position is no label across scans here: a partition is one scan's slab
            parts = vols * self.opts.parts + parts
        z = self.embed(self.views(x, generator, batch.get("content"))).float()
        if self.opts.formulation == "supcon_partition":
            loss = supcon(z, partition_positive_mask(parts), self.cfg.tau, self.cfg.base_tau)
        else:
            loss = gcl_global_loss(z[:b], z[b:], parts, vols, tau=self.cfg.tau, strategy=self.opts.strategy)
        return loss, spread(z)
