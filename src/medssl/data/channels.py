"""Which channel of a multi-channel dataset to train on: the one whose intensities best tell the labels apart.

medssl's networks take one input channel. A multi-modal dataset (MSD Prostate: T2 and ADC; MSD BrainTumour: FLAIR,
T1w, T1gd, T2w) is trained on one of them, ``data.channel``. ``medssl plan`` chooses it from the data: for each
labelled case (a seeded sample of at most ``max_cases``) and each class, the standardised difference (Cohen's d)
between the class's voxels and the voxels of a thin shell around it (``shell`` voxels of 3D dilation); a channel's
score is the median of these over cases and classes. The structure's own boundary is what a segmentation network
has to find, so the channel with the sharpest contrast there is the most informative single one.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from medssl.data.cases import DatasetInfo
from medssl.data.layouts import describe_channels
from medssl.data.readers import read_image, read_label

MAX_CASES = 20  # labelled cases read per channel (each read decompresses the whole file)
SHELL = 3  # voxels of dilation around each class for its surroundings


def boundary_contrast(image: np.ndarray, label: np.ndarray, shell: int = SHELL) -> list[float]:
    """Cohen's d between each class's voxels and its surrounding shell (one value per class present)."""
    out = []
    for v in (int(v) for v in np.unique(label) if v != 0):
        inside = label == v
        ring = ndimage.binary_dilation(inside, iterations=shell) & ~inside
        if inside.sum() < 2 or ring.sum() < 2:
            continue
        a, b = image[inside].astype(np.float64), image[ring].astype(np.float64)
        pooled = np.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2)
        out.append(float(abs(a.mean() - b.mean()) / pooled) if pooled > 0 else 0.0)
    return out


def channel_scores(info: DatasetInfo, *, max_cases: int = MAX_CASES, seed: int = 0) -> dict[int, float]:
    """``{channel: median boundary contrast}`` over a seeded sample of the labelled cases."""
    labelled = info.labelled
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(labelled), size=min(max_cases, len(labelled)), replace=False)) if labelled else []
    scores: dict[int, list[float]] = {c: [] for c in range(info.n_channels)}
    for i in pick:
        case = labelled[int(i)]
        label = read_label(case).array
        for c in scores:
            scores[c] += boundary_contrast(read_image(case, c).array, label)
    return {c: round(float(np.median(v)), 3) if v else 0.0 for c, v in scores.items()}


def choose_channel(info: DatasetInfo, **kwargs) -> tuple[int, str]:
    """The channel to train on and the reason (the first channel, without reading, for single-channel data)."""
    if info.n_channels < 2:
        return 0, "single-channel data"
    scores = channel_scores(info, **kwargs)
    best = max(scores, key=lambda c: (scores[c], -c))
    names = info.channel_names
    listing = ", ".join(f"{c}{f' ({names[c]})' if c in names else ''} {s:.2f}" for c, s in scores.items())
    return best, (f"{describe_channels(info)}; the networks take one: the largest contrast between each class and "
                  f"its surroundings (median Cohen's d over {min(len(info.labelled), kwargs.get('max_cases', MAX_CASES))}"
                  f" labelled cases): {listing}")
