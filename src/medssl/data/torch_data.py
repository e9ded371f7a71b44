"""PyTorch views of the slice cache: a dataset of (augmented) labelled slices and a seeded sampler."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from medssl.data.cache import SliceCache


class SliceDataset(Dataset):
    """Slices ``rows`` of a cache, as stored (augmentation happens per batch, on the device)."""

    def __init__(self, cache: SliceCache, rows: np.ndarray):
        self.cache, self.rows = cache, np.asarray(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = int(self.rows[i])
        img = np.array(self.cache.images[row])
        lab = np.array(self.cache.labels[row])
        return {"image": torch.from_numpy(img[None]), "label": torch.from_numpy(lab.astype(np.int64)), "row": row,
                "rel_pos": float(self.cache.rel_pos[row]), "slice": int(self.cache.slice_idx[row]),
                "n_slices": int(self.cache.n_slices[row]), "content": torch.from_numpy(self.cache.content[row])}


class EpochSampler(Sampler[int]):
    """Indices for one epoch, a pure function of (seed, epoch): resumable and DDP-consistent.

    Draws ``n_samples`` indices by concatenating seeded permutations of the dataset. With
    ``foreground`` (a bool mask over the dataset) and ``fg_fraction`` > 0, that fraction of the
    draw comes from foreground slices. Under DDP each rank takes every ``world``-th index.
    """

    def __init__(self, n: int, n_samples: int, seed: int = 0, foreground: np.ndarray | None = None,
                 fg_fraction: float = 0.0, rank: int = 0, world: int = 1):
        self.n, self.n_samples, self.seed = n, n_samples, seed
        self.fg = np.flatnonzero(foreground) if foreground is not None else np.zeros(0, int)
        self.fg_fraction, self.rank, self.world = fg_fraction, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _draw(self, rng: np.random.Generator, pool: np.ndarray, k: int) -> np.ndarray:
        if k <= 0 or len(pool) == 0:
            return np.zeros(0, int)
        reps = -(-k // len(pool))
        return np.concatenate([rng.permutation(pool) for _ in range(reps)])[:k]

    def indices(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        n_fg = int(round(self.n_samples * self.fg_fraction)) if len(self.fg) else 0
        idx = np.concatenate([self._draw(rng, np.arange(self.n), self.n_samples - n_fg),
                              self._draw(rng, self.fg, n_fg)])
        idx = rng.permutation(idx)
        return idx[self.rank::self.world]

    def __iter__(self):
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return len(range(self.rank, self.n_samples, self.world))
