"""Which slice of a volume to annotate before propagating it (``medssl propagate``), chosen without any label.

The key-slice rules of :mod:`medssl.sam.propagate` (``largest``: the slice of largest area of a class;
``middle``: the middle of a class's extent) read the label volume, so they can only be used where the whole
annotation already exists: they are oracles. Before annotating, a rule can only look at the image:

* ``medoid`` (default) -- the slice k that minimises the sum over all slices j of
  ``d(k, j) / mean(d) + |k - j| / mean(|k - j|)``: ``d`` is the Euclidean distance between the slices' features
  (:func:`slice_features`), and both terms are scaled to a mean of 1. Propagation (copy +-k, registration, a
  SAM chain) carries the annotated mask to the other slices, and its error grows both with how much a slice
  looks different from the annotated one and with how many steps away it lies; the rule minimises the sum of both
  over the volume. The step term matters: the slices at either end of a volume, where the structure is absent,
  resemble each other, and can outnumber the slices with anatomy, so the appearance term alone (``appearance``)
  can pick an empty end slice.
* ``appearance`` -- the appearance term alone: the medoid of the slice features.
* ``centre`` -- slice Z // 2 of the stack (the step term alone): the label-free version of ``middle``.
"""

from __future__ import annotations

import numpy as np

from medssl.advise.embed import slice_encoder_features, slice_thumbnails
from medssl.advise.strategies import distances
from medssl.errors import ConfigError

SLICE_RULES = ("medoid", "appearance", "centre")


def advise_slice(features: np.ndarray, rule: str = "medoid") -> int:
    """Index of the slice to annotate, from (Z, D) per-slice features of one volume."""
    if rule not in SLICE_RULES:
        raise ConfigError(f"key slice rule must be one of {SLICE_RULES}, got {rule!r}")
    feats = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    z = len(feats)
    if z == 0:
        raise ConfigError("advise_slice: the volume has no slices")
    if rule == "centre" or z < 3:
        return z // 2
    d = distances(feats)
    cost = d / d.mean() if d.mean() > 0 else np.zeros_like(d)
    if rule == "medoid":
        steps = np.abs(np.arange(z)[:, None] - np.arange(z)[None, :]).astype(np.float64)
        cost = cost + steps / steps.mean()
    return int(np.argmin(cost.sum(axis=1)))  # the first of equals: the lower index


def slice_features(cache, case: str, model=None) -> np.ndarray:
    """(Z, D) per-slice features of a cached case: the encoder's with ``model``, else 8 x 8 thumbnails."""
    if model is None:
        return slice_thumbnails(cache, case)
    return slice_encoder_features(model, np.asarray(cache.case_volume(case)[0]))


def advise_case_slice(cache, case: str, model=None, rule: str = "medoid") -> int:
    """The slice of ``case`` (index along the cache's slicing axis, as in ``medssl propagate --slice``)."""
    return advise_slice(slice_features(cache, case, model), rule)
