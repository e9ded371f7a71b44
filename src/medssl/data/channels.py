"""Which channel of a multi-channel dataset to train on: the one in which the labelled structures are easiest to find.

medssl's networks take one input channel. A multi-modal dataset (MSD Prostate: T2 and ADC; MSD BrainTumour: FLAIR,
T1w, T1gd, T2w) is trained on one of them, ``data.channel``. ``medssl plan`` chooses it with a probe: for each class,
voxels inside it and in a thin shell around it (``SHELL`` voxels of 3D dilation) are described by a small filter bank
of the channel (intensity, Gaussian smoothing at 1, 2 and 4 voxels, gradient magnitude at 1 and 2), and a logistic
regression (scikit-learn) tells inside from shell. Its area under the ROC curve, cross-validated with the cases as
groups so that no case is scored by a model fitted on it, is the channel's score for that class; a channel's score
is the mean over classes. Intensity statistics alone would favour a smoother channel (smoothing lowers the spread
inside each region); the filter bank gives every channel the same smoothing, so a channel only wins by showing more.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from medssl.data.cases import DatasetInfo
from medssl.data.layouts import describe_channels
from medssl.data.readers import read_image, read_label

MAX_CASES = 20  # labelled cases read per channel (each read decompresses the whole file)
SHELL = 3  # voxels of dilation around each class for its surroundings
VOXELS = 500  # voxels sampled inside each class and in its shell, per case
SIGMAS = (1.0, 2.0, 4.0)  # Gaussian smoothing of the filter bank, in voxels of the finest axis


def filter_bank(image: np.ndarray, spacing, at: np.ndarray) -> np.ndarray:
    """(len(at), 6) features at flat voxel indices ``at``: intensity, Gaussian at 1/2/4, gradient magnitude at 1/2
    (sigmas in voxels of the finest axis, the same physical width along every axis); one filtered volume at a time."""
    sp = np.asarray(spacing, float)
    scale = sp.min() / sp
    x = image.astype(np.float32)
    feats = [x.ravel()[at]]
    feats += [ndimage.gaussian_filter(x, s * scale).ravel()[at] for s in SIGMAS]
    feats += [ndimage.gaussian_gradient_magnitude(x, s * scale).ravel()[at] for s in SIGMAS[:2]]
    return np.stack(feats, axis=-1)


def probe_voxels(label: np.ndarray, rng: np.random.Generator) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """``{class: (inside indices, shell indices)}`` (flat), at most ``VOXELS`` of each, for the classes present."""
    out = {}
    for v in (int(v) for v in np.unique(label) if v != 0):
        inside = label == v
        shell = ndimage.binary_dilation(inside, iterations=SHELL) & ~inside
        ii, ss = np.flatnonzero(inside), np.flatnonzero(shell)
        if len(ii) >= 2 and len(ss) >= 2:
            out[v] = (rng.choice(ii, min(VOXELS, len(ii)), replace=False),
                      rng.choice(ss, min(VOXELS, len(ss)), replace=False))
    return out


def probe_auc(features: np.ndarray, target: np.ndarray, groups: np.ndarray) -> float:
    """Cross-validated ROC AUC of a logistic regression, folds by group (case); 0.5 with too few groups."""
    k = min(5, len(np.unique(groups)))
    if k < 2 or len(np.unique(target)) < 2:
        return 0.5
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    prob = cross_val_predict(model, features, target, groups=groups, cv=GroupKFold(k), method="predict_proba")[:, 1]
    return float(roc_auc_score(target, prob))


def channel_scores(info: DatasetInfo, *, max_cases: int = MAX_CASES, seed: int = 0) -> dict[int, float]:
    """``{channel: mean over classes of the probe's cross-validated AUC}`` on a seeded sample of labelled cases."""
    labelled = info.labelled
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(labelled), size=min(max_cases, len(labelled)), replace=False)) if labelled else []
    rows: dict[tuple[int, int], list] = {}  # (channel, class) -> [(features, target, group)]
    for n, i in enumerate(pick):
        case = labelled[int(i)]
        label = read_label(case).array
        voxels = probe_voxels(label, np.random.default_rng([seed, n]))
        if not voxels:
            continue
        at = np.concatenate([np.r_[ii, ss] for ii, ss in voxels.values()])
        for c in range(info.n_channels):
            image = read_image(case, c)
            bank, start = filter_bank(image.array, image.spacing, at), 0
            for v, (ii, ss) in voxels.items():
                target = np.r_[np.ones(len(ii)), np.zeros(len(ss))]
                rows.setdefault((c, v), []).append((bank[start:start + len(target)], target, np.full(len(target), n)))
                start += len(target)
    scores = {}
    for c in range(info.n_channels):
        aucs = [probe_auc(*(np.concatenate(part) for part in zip(*rows[key]))) for key in sorted(rows) if key[0] == c]
        scores[c] = round(float(np.mean(aucs)), 3) if aucs else 0.5
    return scores


def choose_channel(info: DatasetInfo, **kwargs) -> tuple[int, str]:
    """The channel to train on and the reason; ``(0, "")`` without reading anything for single-channel data."""
    if info.n_channels < 2:
        return 0, ""
    scores = channel_scores(info, **kwargs)
    best = max(scores, key=lambda c: (scores[c], -c))
    names = info.channel_names
    listing = ", ".join(f"{c}{f' ({names[c]})' if c in names else ''} {s:.3f}" for c, s in scores.items())
    n = min(len(info.labelled), kwargs.get("max_cases", MAX_CASES))
    return best, (f"{describe_channels(info)}; the networks take one: the one in which a filter-bank probe best tells "
                  f"each class from its surroundings (cross-validated AUC over {n} labelled cases): {listing}")
