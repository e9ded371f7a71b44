"""Advisor strategies on synthetic embeddings: distinct, deterministic, and each doing what it promises."""

from __future__ import annotations

import numpy as np
import pytest

from medssl.advise.strategies import STRATEGIES, distances, rank_patients
from medssl.errors import ConfigError


def blobs(sizes, sep=50.0, dim=4, seed=0):
    """Well-separated Gaussian clusters: (points, true cluster of each point)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), dim)) * sep
    x = np.concatenate([c + rng.normal(size=(n, dim)) for c, n in zip(centres, sizes)])
    return x, np.repeat(np.arange(len(sizes)), sizes)


def covering_radius(x, chosen):
    """Largest distance of any point to its nearest chosen point (what k-center minimises)."""
    return float(distances(x)[:, chosen].min(axis=1).max())


# ------------------------------------------------------------------------------------------ strategies
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategies_rank_distinct_patients_deterministically(strategy):
    x, _ = blobs([6, 9, 5, 10])
    for m in (1, 3, 7):
        r = rank_patients(x, m, strategy, seed=3)
        assert sorted(r.order.tolist()) == list(range(len(x)))  # a ranking of every candidate, each once
        assert len(set(r.chosen(m))) == m
        assert set(r.cluster.tolist()) <= set(range(m)) and len(r.score) == len(x)
        again = rank_patients(x, m, strategy, seed=3)
        assert again.order.tolist() == r.order.tolist() and again.cluster.tolist() == r.cluster.tolist()
    if strategy == "random":
        assert rank_patients(x, 3, "random", seed=4).order.tolist() != rank_patients(x, 3, "random", 3).order.tolist()
    with pytest.raises(ConfigError, match="--budget"):
        rank_patients(x, len(x) + 1, strategy)


def test_kcenter_covers_separated_clusters_better_than_random():
    x, truth = blobs([10, 10, 10, 10, 10])
    chosen = rank_patients(x, 5, "kcenter").chosen(5)
    assert sorted(truth[chosen].tolist()) == [0, 1, 2, 3, 4]  # one patient in every cluster
    radius = covering_radius(x, chosen)
    randoms = [covering_radius(x, rank_patients(x, 5, "random", seed=s).chosen(5)) for s in range(20)]
    assert radius < min(randoms) or radius < 0.2 * np.mean(randoms)
    assert radius < 10.0  # within a cluster's own scale, while clusters lie ~50 apart


def test_typical_picks_the_densest_patient_of_each_cluster():
    x, truth = blobs([12, 8, 15, 6], seed=1)
    x[3] += 25.0  # an outlier: never the most typical patient of its cluster
    r = rank_patients(x, 4, "typical", seed=0)
    chosen = r.chosen(4)
    assert sorted(truth[chosen].tolist()) == [0, 1, 2, 3] and 3 not in chosen
    assert [truth[i] for i in chosen] == [2, 0, 1, 3]  # clusters by size, the largest first
    for rank, i in enumerate(chosen):
        members = np.flatnonzero(r.cluster == rank)
        assert set(members.tolist()) == set(np.flatnonzero(truth == truth[i]).tolist())
        assert r.score[i] == pytest.approx(r.score[members].max())


def test_facility_starts_at_the_medoid_and_is_nested():
    x, truth = blobs([10, 25, 5], seed=2)
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    r = rank_patients(x, 3, "facility")
    assert r.chosen(1) == [int(np.argmin(d.sum(1)))]
    assert sorted(truth[r.chosen(3)].tolist()) == [0, 1, 2]
    assert rank_patients(x, 2, "facility").chosen(2) == r.chosen(2)
