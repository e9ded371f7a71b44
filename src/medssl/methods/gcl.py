"""GCL global stage (Chaitanya et al., NeurIPS 2020): partition-based contrastive pretraining of the encoder.

Every volume is split into ``gcl_parts`` contiguous partitions along the slice axis; images of the
same partition index in different volumes are treated as similar. Two augmented views per slice,
the PCL-style head, and either Chaitanya's loss (``gcl_formulation: chaitanya``: each positive pair
has its own numerator; for G^D / G^D- same-partition images leave the denominators) or the PCL
code's SupCon with partition positives (``supcon_partition``).

Deviation (documented): batches are drawn uniformly from the pretraining slices, not as "one slice
per partition from each of m volumes"; the loss is defined for any batch composition. The local
(decoder-level) second stage is not implemented yet.
"""

from __future__ import annotations

import numpy as np
import torch

from medssl.methods.collapse import spread
from medssl.methods.losses import gcl_global_loss, gcl_partition, partition_positive_mask, supcon
from medssl.methods.position_gate import PositionGate
from medssl.methods.registry import register_method
from medssl.methods.simclr import SimCLR


@register_method("gcl")
class GCL(PositionGate, SimCLR):
    def select_rows(self, cache, rows: np.ndarray) -> np.ndarray:
        gate = self.gate(cache, rows)
        self.counts = {"volumes": len(set(self.scan_of_row.values())), "slices": int(len(rows)),
                       "strategy": self.cfg.gcl_strategy, "formulation": self.cfg.gcl_formulation, **gate}
        return np.asarray(rows)

    def loss(self, batch: dict, generator: torch.Generator):
        x = batch["image"]
        b = x.shape[0]
        parts = gcl_partition(batch["slice"], batch["n_slices"], self.cfg.gcl_parts).to(x.device)
        vols = torch.tensor([self.scan_of_row[int(r)] for r in batch["row"]], device=x.device)
        if not self.cross_scan:  # position is no label across scans here: a partition is one scan's slab
            parts = vols * self.cfg.gcl_parts + parts
        z = self.embed(self.views(x, generator, batch.get("content"))).float()
        if self.cfg.gcl_formulation == "supcon_partition":
            loss = supcon(z, partition_positive_mask(parts), self.cfg.tau, self.cfg.base_tau)
        else:
            loss = gcl_global_loss(z[:b], z[b:], parts, vols, tau=self.cfg.tau, strategy=self.cfg.gcl_strategy)
        return loss, spread(z)
