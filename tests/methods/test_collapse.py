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


class _Scans:
    """12 scans x 10 slices, 32 x 32, whose appearance does not depend on slice position (a random smooth pattern
    and level per slice) with heavy-tailed intensities (0.3 % of voxels up to 25 above the rest)."""

    def __init__(self, position_matters: bool = False):
        g = torch.Generator().manual_seed(0)
        s, z, h = 12, 10, 32
        base = torch.nn.functional.avg_pool2d(torch.randn(s * z, 1, h + 6, h + 6, generator=g), 7, 1)[:, :, :h, :h]
        base = 3 * base + torch.randn(s * z, 1, 1, 1, generator=g)
        self.rel_pos = ((torch.arange(z) + 1) / z).repeat(s).numpy()
        if position_matters:
            base = base + 4 * torch.from_numpy(self.rel_pos).float()[:, None, None, None]
        hot = torch.rand(s * z, 1, h, h, generator=g) < 0.003
        self.images = torch.where(hot, base + 25 * torch.rand(s * z, 1, h, h, generator=g), base)[:, 0].numpy()
        self.case_ids = np.array([f"scan{i}" for i in range(s)]).repeat(z)

    def read_images(self, rows) -> np.ndarray:
        return self.images[np.asarray(rows)]


def _pcl_run(position_r2_min: float, steps: int = 150) -> tuple[float, dict, dict]:
    from medssl.config import AugConfig, PretrainConfig
    from medssl.methods import build_method
    from medssl.models import build_model

    data = _Scans()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    enc = build_model("unet", in_channels=1, n_classes=2, features=8).encoder
    m = build_method("pcl", enc, PretrainConfig(method="pcl", proj_dim=64, position_r2_min=position_r2_min,
                                                options={"pcl": {"theta": 0.1}}), AugConfig())
    rows = m.select_rows(data, np.arange(len(data.rel_pos)))
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    x = torch.from_numpy(data.images)[:, None]
    for _ in range(steps):
        idx = torch.from_numpy(rows)[torch.randperm(len(rows), generator=g)[:32]]
        loss, logs = m.loss({"image": x[idx], "rel_pos": torch.from_numpy(data.rel_pos)[idx], "row": idx}, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach()), logs, m.counts


def test_position_r2_tells_informative_positions_from_random_ones():
    from medssl.methods.position_gate import position_r2

    flat, informative = _Scans(), _Scans(position_matters=True)
    assert abs(position_r2(flat.images, flat.rel_pos)) < 0.05
    assert position_r2(informative.images, informative.rel_pos) > 0.5


def test_pcl_on_slices_whose_position_says_nothing_no_longer_collapses():
    """Positives by position across scans are random pairs here: PCL sits at its collapse value (all similarities
    equal, (tau / base_tau) log(2B - 1) = 5.92 at B = 32) with bunched embeddings. The position gate measures that
    position explains ~0 % of slice appearance, keeps positives within each scan, and the loss falls."""
    stuck = (0.1 / 0.07) * np.log(63)
    with pytest.warns(UserWarning, match="within each scan only"):
        loss, logs, counts = _pcl_run(position_r2_min=0.1)
    assert counts["positives_across_scans"] is False and counts["position_r2"] < 0.05
    assert loss < 0.85 * stuck and logs["emb_cos"] < 0.7, (loss, logs)
    old_loss, old_logs, old_counts = _pcl_run(position_r2_min=0.0)  # the behaviour before the gate
    assert old_counts["positives_across_scans"] is True
    assert old_loss > 0.97 * stuck and old_logs["emb_cos"] > 0.9, (old_loss, old_logs)
