"""Contrastive pretraining that cannot fail silently: watch the embedding spread, stop on a lasting collapse.

A contrastive loss has a trivial minimum-effort state: every embedding points the same way, the loss sits at
its "all similarities equal" value and the encoder's gradients vanish. It happens when positives are pairs
the images cannot tell apart from negatives (e.g. positions on thick-slice data), and nothing in the loss
curve's level alone says so. Methods report two numbers per step (:func:`spread`); :class:`CollapseMonitor`
counts the steps where they say "collapsed" *and* the loss is stuck (the same value to 0.2 % over 10 steps: early
in training embeddings are bunched too, but the loss still moves), warns, and stops the run with a clear
message when that lasts ``patience`` steps.
"""

from __future__ import annotations

import math
import warnings

import torch

from medssl.errors import TrainingError

COLLAPSED_COS = 0.98  # mean pairwise cosine of the embeddings above this ...
COLLAPSED_STD = 0.1  # ... and the per-dimension spread of the unit embeddings (x sqrt(d)) below this ...
FLAT_LOSS = 2e-3  # ... and the loss stuck: its range over the last FLAT_WINDOW steps under this share of it
FLAT_WINDOW = 10


@torch.no_grad()
def spread(z: torch.Tensor) -> dict[str, float]:
    """``emb_cos``: mean pairwise cosine similarity of the (N, d) embeddings (1 = all the same direction);
    ``emb_std``: mean per-dimension std of the unit embeddings x sqrt(d) (about 1 when spread over the sphere,
    0 when collapsed)."""
    z = torch.nn.functional.normalize(z.detach().float().flatten(1), dim=1)
    n, d = z.shape
    if n < 2:
        return {}
    s = z.sum(0)
    cos = (float(s @ s) - n) / (n * (n - 1))
    return {"emb_cos": cos, "emb_std": float(z.std(0).mean()) * math.sqrt(d)}


class CollapseMonitor:
    """Counts consecutive collapsed steps after a warm-up share of the run; warns once at ``patience // 4``
    steps, raises :class:`TrainingError` at ``patience`` (the last checkpoint is kept by the loop)."""

    def __init__(self, total_steps: int, *, warmup_fraction: float = 0.1, patience: int | None = None,
                 method: str = ""):
        self.warmup = int(total_steps * warmup_fraction)
        self.patience = patience or max(50, total_steps // 10)
        self.method, self.run, self.warned = method, 0, False
        self.losses: list[float] = []

    def __call__(self, step: int, logs: dict, loss: float) -> None:
        """``logs`` of one step (with :func:`spread`'s keys) and its loss value."""
        self.losses = [*self.losses[-(FLAT_WINDOW - 1):], float(loss)]
        if "emb_cos" not in logs or step < self.warmup:
            return
        flat = len(self.losses) == FLAT_WINDOW and (max(self.losses) - min(self.losses)) <= FLAT_LOSS * abs(
            self.losses[-1])  # a collapsed contrastive loss sits at its "all similarities equal" value
        collapsed = flat and logs["emb_cos"] > COLLAPSED_COS and logs["emb_std"] < COLLAPSED_STD
        self.run = self.run + 1 if collapsed else 0
        what = (f"pretraining ({self.method}) has collapsed: every embedding points the same way (mean pairwise "
                f"cosine {logs['emb_cos']:.3f}, spread {logs['emb_std']:.3f}) for {self.run} steps")
        if self.run >= self.patience:
            raise TrainingError(f"{what}; stopped. Its features would not help fine-tuning. Likely causes: "
                                "positives the images cannot tell apart (PCL on thick or few slices: lower "
                                "pretrain.pcl.theta), too strong intensity views, or a learning rate too high")
        if self.run >= max(1, self.patience // 4) and not self.warned:
            self.warned = True
            warnings.warn(what + f"; the run stops if it lasts {self.patience} steps", stacklevel=2)
