"""Which patients (and which slice) to label first: a label-budget advisor on a pretrained encoder's embeddings.

``medssl advise`` (:mod:`medssl.advise.run`), the strategies (:mod:`medssl.advise.strategies`), the embeddings
(:mod:`medssl.advise.embed`), the key slice for propagation (:mod:`medssl.advise.slices`) and the ``selection:``
axis of ``medssl experiment`` (:mod:`medssl.advise.experiment`). See docs/advise.md.
"""

from medssl.advise.slices import SLICE_RULES, advise_slice
from medssl.advise.strategies import STRATEGIES, Ranking, rank_patients

__all__ = ["SLICE_RULES", "STRATEGIES", "Ranking", "advise_slice", "rank_patients"]
