"""Contrastive losses of the pretraining methods (docs/methods.md)."""

from __future__ import annotations

from .gcl import extract_regions, gcl_global_loss, gcl_local_loss, region_coords, region_neighbours
from .ntxent import nt_xent
from .polycl import polycl_infonce, resolve_tau
from .positions import gcl_partition, other_view_mask, partition_positive_mask, pcl_positive_mask
from .supcon import supcon

__all__ = [
    "extract_regions",
    "gcl_global_loss",
    "gcl_local_loss",
    "gcl_partition",
    "nt_xent",
    "other_view_mask",
    "partition_positive_mask",
    "pcl_positive_mask",
    "polycl_infonce",
    "region_coords",
    "region_neighbours",
    "resolve_tau",
    "supcon",
]
