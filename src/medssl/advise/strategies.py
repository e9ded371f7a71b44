"""Which M patients to label first: a ranking of every candidate from its embedding.

Every strategy returns a :class:`Ranking` of all N candidates (the first M are the advice) with a score and a
``cluster`` per patient. ``cluster`` is the rank - 1 of the chosen patient that stands for it: the k-means
cluster for ``typical``, the nearest chosen patient (Euclidean, projected embedding) for the others.

* ``random`` -- a seeded permutation (``numpy.random.default_rng(seed)``): the baseline. Score: none (NaN).
* ``kcenter`` -- k-center greedy (the coreset of Sener & Savarese): start from the patient whose largest
  distance to any other is smallest (the exact 1-center), then repeatedly add the patient farthest from the
  chosen ones. It minimises the worst-case distance of any patient to the labelled set, so it reaches every
  mode, outliers included. Score: that patient's distance to the set when it was added (the covering radius).
* ``typical`` -- cluster-proportional typicality (TypiClust, Hacohen et al. 2022): scikit-learn ``KMeans`` with
  k = M (``random_state=seed``, 10 starts), then in each cluster the patient of **highest density**, density =
  1 / mean distance to its min(20, N - 1) nearest neighbours among all candidates. Clusters are ranked by size
  (largest first). Ranks past M are by density alone. Score: the density.
* ``facility`` -- greedy facility location, i.e. k-medoids: add the patient that most reduces the *sum* over all
  candidates of the distance to their nearest chosen patient (the first pick is the medoid). Why: test Dice is a
  mean over patients, so the labelled set should be close to most patients on average rather than to the worst
  one (k-center's minimax picks outliers at M = 2). The objective is submodular, so greedy is within 1 - 1/e of
  the best set, deterministic, and nested (the advice for M is a prefix of that for M + 1).
  Score: the mean distance reduction when the patient was added.

``kcenter`` and ``facility`` rank greedily up to ``max(M, 200)`` patients; any rest follows the last step's
scores. ``kcenter``, ``facility`` do not depend on the seed (ties go to the lower index).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medssl.errors import ConfigError

STRATEGIES = ("random", "kcenter", "typical", "facility")
GREEDY_LIMIT = 200
DENSITY_NEIGHBOURS = 20


@dataclass
class Ranking:
    order: np.ndarray  # (N,) candidate indices, the most useful first
    score: np.ndarray  # (N,) per candidate (index order); meaning per strategy, NaN for random
    cluster: np.ndarray  # (N,) per candidate: rank - 1 of the chosen patient standing for it (0 .. M-1)

    def chosen(self, m: int) -> list[int]:
        return [int(i) for i in self.order[:m]]


def check_strategy(name: str, key: str = "--strategy") -> str:
    if name not in STRATEGIES:
        raise ConfigError(f"{key}: unknown strategy {name!r}; available: {', '.join(STRATEGIES)}")
    return name


def distances(x: np.ndarray) -> np.ndarray:
    from sklearn.metrics import pairwise_distances

    return pairwise_distances(np.asarray(x, dtype=np.float64))


def _nearest_chosen(d: np.ndarray, chosen: list[int]) -> np.ndarray:
    return np.argmin(d[:, chosen], axis=1)


def _kcenter(d: np.ndarray, limit: int) -> tuple[list[int], np.ndarray]:
    n = len(d)
    first = int(np.argmin(d.max(axis=1)))
    order, score = [first], np.zeros(n)
    score[first] = d[first].max()
    near = d[first].copy()
    while len(order) < limit:
        near[order] = -1.0
        j = int(np.argmax(near))
        order.append(j)
        score[j] = near[j]
        near = np.minimum(near, d[j])
    near[order] = -1.0
    taken = set(order)
    rest = [int(i) for i in np.argsort(-near, kind="stable") if int(i) not in taken]
    score[rest] = near[rest]
    return order + rest, score


def _facility(d: np.ndarray, limit: int) -> tuple[list[int], np.ndarray]:
    n = len(d)
    cur = np.full(n, d.max() + 1.0)  # as if every patient sat at the largest distance first
    order, score, free = [], np.zeros(n), np.ones(n, bool)
    while len(order) < limit:
        gain = np.clip(cur[:, None] - d, 0.0, None).sum(axis=0) / n
        gain[~free] = -1.0
        j = int(np.argmax(gain))
        order.append(j)
        score[j], free[j] = gain[j], False
        cur = np.minimum(cur, d[:, j])
    gain = np.clip(cur[:, None] - d, 0.0, None).sum(axis=0) / n
    rest = [int(i) for i in np.argsort(-gain, kind="stable") if free[i]]
    score[rest] = gain[rest]
    return order + rest, score


def _density(d: np.ndarray) -> np.ndarray:
    n = len(d)
    k = min(DENSITY_NEIGHBOURS, n - 1)
    if k < 1:
        return np.ones(n)
    near = np.sort(d, axis=1)[:, 1:k + 1]  # column 0 is the patient itself
    return 1.0 / (near.mean(axis=1) + 1e-12)


def _typical(x: np.ndarray, d: np.ndarray, m: int, seed: int) -> tuple[list[int], np.ndarray, np.ndarray]:
    import warnings

    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    dens = _density(d)
    with warnings.catch_warnings():  # fewer distinct points than clusters: some clusters stay empty
        warnings.simplefilter("ignore", ConvergenceWarning)
        labels = KMeans(n_clusters=m, n_init=10, random_state=seed).fit_predict(x)
    picks = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        best = int(members[np.argmax(dens[members])])  # first of equals: the lower index
        picks.append((-len(members), -dens[best], best, c))
    picks.sort()
    chosen = [p[2] for p in picks]
    for i in np.argsort(-dens, kind="stable"):  # empty clusters: fill with the densest others
        if len(chosen) >= m:
            break
        if int(i) not in chosen:
            chosen.append(int(i))
    rank_of_cluster = {p[3]: r for r, p in enumerate(picks)}
    cluster = np.array([rank_of_cluster[c] for c in labels])
    taken = set(chosen)
    rest = [int(i) for i in np.argsort(-dens, kind="stable") if int(i) not in taken]
    return chosen + rest, dens, cluster


def rank_patients(x: np.ndarray, m: int, strategy: str, seed: int = 0) -> Ranking:
    """Rank the N rows of ``x`` (projected embeddings, one per candidate) for a budget of ``m`` patients."""
    check_strategy(strategy)
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if not 1 <= m <= n:
        raise ConfigError(f"--budget: M={m} must lie between 1 and the {n} candidate patients")
    if x.ndim == 1:
        x = x[:, None]
    d = distances(x)
    limit = min(n, max(m, GREEDY_LIMIT))
    cluster = None
    if strategy == "random":
        order, score = np.random.default_rng(seed).permutation(n).tolist(), np.full(n, np.nan)
    elif strategy == "kcenter":
        order, score = _kcenter(d, limit)
    elif strategy == "facility":
        order, score = _facility(d, limit)
    else:
        order, score, cluster = _typical(x, d, m, seed)
    order = np.asarray(order, dtype=int)
    if cluster is None:
        cluster = _nearest_chosen(d, order[:m].tolist())
    return Ranking(order=order, score=np.asarray(score, dtype=float), cluster=np.asarray(cluster, dtype=int))
