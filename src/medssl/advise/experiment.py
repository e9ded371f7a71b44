"""The ``selection:`` axis of ``medssl experiment``: a cell's M labelled patients chosen by the advisor.

    selection: [seeded, kcenter, typical@pcl, facility@pcl]

* ``seeded`` (the default, alone: the experiment is unchanged) -- the split's own draw with
  ``split.budget_seed`` = the cell's seed.
* ``STRATEGY`` or ``STRATEGY@FEATURES`` -- the M patients ranked first by :mod:`medssl.advise.strategies`
  among the fold's training patients (validation and test patients are never candidates), with the cell's seed.
  FEATURES is ``intensity`` (the default: no pretraining) or the name of a pretrained row of ``methods``: its
  fold's pretrained checkpoint embeds the patients for every row, so the rows of one selection share their
  labelled patients and the comparison between methods stays paired.

Everything else of the cell is as for ``seeded`` (fold, validation patients, training seed, overrides), so a
selection is paired with the seeded draw of the same (method, fold, M, seed). The cell is fine-tuned with the
advised patients' cases in ``split.labelled`` (:func:`advised_cases`), so its ``config.yaml`` and ``splits.json``
(``budget_mode: explicit``) record them and a killed cell resumes with them; the ranking is kept in
``<output_dir>/advise/<cell>.csv``. The patients' embeddings are computed once per (fold, features) and kept in
``<output_dir>/advise/``; a rerun ranks them again and gets the same patients.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medssl.advise.strategies import STRATEGIES, rank_patients
from medssl.errors import ConfigError

DEFAULT = "seeded"
INTENSITY = "intensity"


def parse_selection(item) -> tuple[str, str]:
    """``"kcenter@pcl"`` -> ``("kcenter", "pcl")``; ``"typical"`` -> ``("typical", "intensity")``."""
    if not isinstance(item, str) or not item:
        raise ConfigError(f"experiment key 'selection': an entry must be a name, got {item!r}")
    strategy, _, source = item.partition("@")
    return strategy, source or INTENSITY


def check_selection(selection, entries) -> None:
    """One-line errors naming the key for a bad ``selection`` list (before any training)."""
    if not isinstance(selection, list) or not selection:
        raise ConfigError("experiment key 'selection': give a non-empty list, e.g. [seeded, kcenter]")
    if len(set(map(str, selection))) != len(selection):
        raise ConfigError(f"experiment key 'selection': entries must be unique, got {selection}")
    pretrained = {e.name for e in entries if e.method != "random" or e.init}
    for item in selection:
        strategy, source = parse_selection(item)
        if item == DEFAULT:
            continue
        if strategy not in STRATEGIES:
            raise ConfigError(f"experiment key 'selection': unknown strategy {strategy!r} in {item!r}; "
                              f"available: {DEFAULT}, {', '.join(STRATEGIES)}")
        if source != INTENSITY and source not in pretrained:
            raise ConfigError(f"experiment key 'selection': features {source!r} in {item!r} must be "
                              f"'{INTENSITY}' or a pretrained row of methods ({', '.join(sorted(pretrained))})")


def cell_prefix(method: str, selection: str) -> str:
    """Run-folder prefix of a cell: the method for ``seeded``, ``method+selection`` otherwise."""
    return method if selection == DEFAULT else f"{method}+{selection}"


def _source_id(cache, checkpoint: str | None) -> str:
    if checkpoint is None:
        return f"{INTENSITY}:{cache.root.name}"
    st = Path(checkpoint).stat()
    return f"{Path(checkpoint).resolve()}:{st.st_size}:{st.st_mtime_ns}:{cache.root.name}"


def cached_embeddings(path: Path, cache, patients: dict[str, list[str]], checkpoint: str | None,
                      model_cfg=None) -> np.ndarray:
    """The patients' raw embeddings, from ``path`` when it holds them for the same patients and source."""
    from medssl.advise.run import embed_patients
    from medssl.data.atomic import atomic_path

    names, source = np.array(list(patients)), _source_id(cache, checkpoint)
    if path.is_file():
        with np.load(path, allow_pickle=False) as f:
            if str(f["source"]) == source and f["patients"].tolist() == names.tolist():
                return np.asarray(f["features"])
    feats = embed_patients(cache, patients, checkpoint, model_cfg)
    with atomic_path(path) as tmp:
        np.savez(tmp, features=feats, patients=names, source=np.array(source))
    return feats


def advised_cases(cfg, selection: str, checkpoint: str | None, seed: int, work: Path, ranking_csv: Path
                  ) -> list[str]:
    """The cases of the M patients a cell of ``selection`` labels (M = ``split.budget``, ranked with ``seed``
    among the training patients of ``cfg``'s seeded split), for its ``split.labelled``; the whole ranking is
    written to ``ranking_csv``. Nothing is written into the cell's run folder."""
    import copy

    from medssl.advise.embed import project
    from medssl.advise.run import advice_rows, write_advice_csv
    from medssl.data.cache import prepare
    from medssl.data.splits import patient_groups
    from medssl.engine.finetune import build_split

    strategy, source = parse_selection(selection)
    if not cfg.data.path:
        raise ConfigError("config key 'data.path' is empty: give the dataset folder (data.path=...)")
    cfg = copy.deepcopy(cfg)
    cfg.split.labelled, cfg.split.labelled_file = [], None  # the seeded split: its test and validation parts
    cfg.data.path = str(Path(cfg.data.path).expanduser().resolve())  # as a run resolves them
    cfg.data.cache_dir = str(Path(cfg.data.cache_dir).expanduser().resolve())
    cache = prepare(cfg.data, progress=False)
    split = build_split(cfg, cache)
    labelled = cache.labelled_cases
    groups = patient_groups(labelled, regex=cfg.split.group_regex, mapping_file=cfg.split.group_file)
    names = sorted(split.patients["labelled"] + split.patients["unlabelled"])
    patients = {p: [c for c in labelled if groups[c] == p] for p in names}
    raw = cached_embeddings(work / f"{source}-f{split.fold}.npz", cache, patients, checkpoint, cfg.model)
    m = split.budget_m
    ranking = rank_patients(project(raw), m, strategy, seed)
    write_advice_csv(ranking_csv, advice_rows(names, ranking))
    return sorted(c for i in ranking.chosen(m) for c in patients[names[i]])
