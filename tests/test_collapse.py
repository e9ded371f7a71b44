"""Pretraining that cannot fail silently: the embedding spread is logged, a lasting collapse warns and stops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medssl.config import ViewAugConfig
from medssl.data.views import ContrastiveViews
from medssl.errors import TrainingError
from medssl.methods.collapse import CollapseMonitor, spread


def test_spread_tells_collapsed_from_spread_embeddings():
    g = torch.Generator().manual_seed(0)
    healthy = spread(torch.randn(64, 128, generator=g))
    assert abs(healthy["emb_cos"]) < 0.05 and 0.8 < healthy["emb_std"] < 1.2
    direction = torch.randn(1, 128, generator=g)
    collapsed = spread(direction * torch.rand(64, 1, generator=g) + 1e-4 * torch.randn(64, 128, generator=g))
    assert collapsed["emb_cos"] > 0.999 and collapsed["emb_std"] < 0.01


def test_monitor_warns_then_stops_on_a_lasting_collapse_only():
    mon = CollapseMonitor(1000, patience=40, method="pcl")
    healthy, flat = {"emb_cos": 0.4, "emb_std": 0.7}, {"emb_cos": 0.998, "emb_std": 0.02}
    stuck = 5.919  # (tau / base_tau) * log(2B - 1) at batch 32: all similarities equal
    for step in range(100):  # collapsed during the warm-up share (10%): not counted
        mon(step, flat, stuck)
    for step in range(100, 130):  # collapsed for a while, then recovers: a warning, no stop
        with pytest.warns(UserWarning, match="collapsed") if step == 109 else _nothing():
            mon(step, flat, stuck)
    mon(130, healthy, 3.0)
    assert mon.run == 0
    rng = torch.Generator().manual_seed(0)
    for step in range(131, 300):  # bunched embeddings but a loss that still moves: training, not collapse
        mon(step, flat, 5.0 + 0.1 * float(torch.rand(1, generator=rng)))
    assert mon.run == 0
    with pytest.raises(TrainingError, match=r"pretraining \(pcl\) has collapsed.*stopped"):
        for step in range(300, 400):
            mon(step, flat, stuck)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_views_of_heavy_tailed_slices_keep_what_identifies_the_slice():
    """A few very bright voxels per slice (up to ~40x the std): min-max scaled brightness / gamma jitter used to
    erase the slice's own level (cross-view correlation of the mean 0.21 here); percentile scaling keeps it (0.89)."""
    g = torch.Generator().manual_seed(0)
    n = 96
    level = torch.linspace(-1.0, 1.0, n)[:, None, None, None]
    x = level + 0.5 * torch.randn(n, 1, 48, 48, generator=g)
    hot = torch.rand(n, 1, 48, 48, generator=g) < 0.002
    x = torch.where(hot, x + 20.0 * torch.rand(n, 1, 48, 48, generator=g), x)
    cfg = ViewAugConfig(noise_prob=0, blur_prob=0, rotate_prob=0, flip_prob=0)
    views = ContrastiveViews(cfg)
    a, b = views(x, g), views(x, g)
    r = np.corrcoef(a.mean((1, 2, 3)).numpy(), b.mean((1, 2, 3)).numpy())[0, 1]
    assert r > 0.6, f"cross-view correlation of the slice mean {r:.2f}"
