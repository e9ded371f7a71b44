"""``medssl advise``: rank a fold's training patients for annotation; ``advice.csv`` and a map of the embedding.

Candidates are the training patients of the configured fold (``split.*``): the patients of the fold's
labelled cases that are neither test nor validation patients, plus the cases without a label (grouped into
patients by the same rule; a patient that is a test or validation patient stays out). A dataset without any
labelled case has no test or validation part: every patient is a candidate.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from medssl.advise.embed import (
    encoder_features,
    intensity_features,
    load_encoder_model,
    patient_features,
    project,
)
from medssl.advise.strategies import Ranking, check_strategy, rank_patients
from medssl.data.atomic import atomic_path, write_csv, write_json
from medssl.errors import ConfigError

CSV_FIELDS = ("patient", "rank", "score", "cluster")
SPLIT_CHOICE = ("split.budget", "split.labelled", "split.labelled_file")  # set by the printed finetune command
DATA_KEYS = ("axis", "size", "fit", "spacing", "crop", "ct_window", "mri_mode", "mri_percentiles")


def training_patients(cfg, cache) -> tuple[dict[str, list[str]], str]:
    """``{patient: [case ids]}`` of the fold's training part (never validation or test) and where it comes from.

    Only ``cache.labelled_cases``, ``unlabelled_cases`` and ``dataset_root`` are read: see :func:`dataset_index`."""
    from medssl.data.splits import patient_groups
    from medssl.engine.finetune import build_split

    labelled, others = cache.labelled_cases, cache.unlabelled_cases
    rule = dict(regex=cfg.split.group_regex, mapping_file=cfg.split.group_file)
    groups = patient_groups(labelled + others, **rule)
    if not labelled:
        keep, where = set(others), "the dataset (no labelled case, so no validation or test part)"
    else:
        cfg = copy.deepcopy(cfg)
        cfg.split.budget = "all"  # only the test / validation / training partition matters here
        cfg.split.labelled, cfg.split.labelled_file = [], None
        split = build_split(cfg, cache)
        held = set(split.patients["test"]) | set(split.patients["val"])
        keep = {c for c in split.labelled + split.unlabelled if groups[c] not in held}
        where = (f"fold {split.fold} of {split.n_folds}" if split.fold is not None else "the hold-out split")
    out: dict[str, list[str]] = {}
    for case in sorted(keep):
        out.setdefault(groups[case], []).append(case)
    return dict(sorted(out.items())), where


def dataset_index(info) -> SimpleNamespace:
    """What :func:`training_patients` reads of a slice cache, from the dataset listing alone (no volume read)."""
    return SimpleNamespace(labelled_cases=sorted(c.case_id for c in info.cases if c.label is not None),
                           unlabelled_cases=sorted(c.case_id for c in info.cases if c.label is None),
                           dataset_root=Path(info.root))


def check_checkpoint_data(meta: dict, data) -> list[str]:
    """Warnings where the checkpoint was trained on slices prepared otherwise than this cache's."""
    have = meta.get("data") or {}
    return [f"the checkpoint was trained with data.{k}={have[k]!r}, the slices here use {getattr(data, k)!r}"
            for k in DATA_KEYS if k in have and have[k] != getattr(data, k)]


def embed_patients(cache, patients: dict[str, list[str]], checkpoint: str | None = None, model_cfg=None,
                   model=None) -> np.ndarray:
    """(P, D) raw features of each patient (mean over its cases): encoder features with a checkpoint (or an
    already loaded ``model``), else intensity statistics."""
    cases = [c for cs in patients.values() for c in cs]
    patient_of = {c: p for p, cs in patients.items() for c in cs}
    if model is None and checkpoint is not None:
        model = load_encoder_model(checkpoint, cache.n_classes, model_cfg)
    feats = intensity_features(cache, cases) if model is None else encoder_features(cache, cases, model)
    return patient_features(feats, cases, patient_of, list(patients))


def advice_rows(patients: list[str], ranking: Ranking) -> list[dict]:
    rank = np.empty(len(patients), dtype=int)
    rank[ranking.order] = np.arange(1, len(patients) + 1)
    rows = [{"patient": p, "rank": int(rank[i]),
             "score": "" if np.isnan(ranking.score[i]) else f"{ranking.score[i]:.6g}",
             "cluster": int(ranking.cluster[i])} for i, p in enumerate(patients)]
    return sorted(rows, key=lambda r: r["rank"])


def write_advice_csv(path: Path, rows: list[dict]) -> Path:
    return write_csv(path, rows, CSV_FIELDS)


def save_map(path: Path, z: np.ndarray, patients: list[str], ranking: Ranking, m: int, title: str) -> Path:
    """PCA of the projected embeddings to 2D, every candidate coloured by its cluster, the M chosen starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    k = min(2, z.shape[0], z.shape[1])
    xy = PCA(n_components=k).fit_transform(z) if k > 0 and z.shape[0] > 1 else np.zeros((len(z), 1))
    if xy.shape[1] < 2:
        xy = np.column_stack([xy[:, 0] if xy.shape[1] else np.zeros(len(z)), np.zeros(len(z))])
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    ax.scatter(xy[:, 0], xy[:, 1], c=ranking.cluster, cmap="tab20", s=22, alpha=0.75, edgecolors="none")
    chosen = ranking.chosen(m)
    ax.scatter(xy[chosen, 0], xy[chosen, 1], marker="*", s=260, c=ranking.cluster[chosen], cmap="tab20",
               edgecolors="black", linewidths=1.0, vmin=ranking.cluster.min(), vmax=ranking.cluster.max())
    for r, i in enumerate(chosen[:30], start=1):
        ax.annotate(f"{r}: {patients[i]}", xy[i], xytext=(5, 5), textcoords="offset points", fontsize=7)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
        return Path(path)
    finally:
        plt.close(fig)


def labelled_override(cases: list[str]) -> str:
    """``split.labelled=[a,b]``: an id stays bare when YAML reads it back as the same string, else JSON-quoted."""
    from medssl.typed_config import yaml_load

    def item(case: str) -> str:
        bare = re.fullmatch(r"[A-Za-z0-9_./-]+", case) is not None and yaml_load(f"[{case}]") == [case]
        return case if bare else json.dumps(case)

    return "split.labelled=[" + ",".join(item(c) for c in cases) + "]"


def finetune_command(config: str | None, data: str | None, overrides: list[str], budget: int,
                     cases: list[str]) -> str:
    """The ``medssl finetune`` command line (shell-quoted) that labels exactly ``cases``: the advise command's
    config, data and overrides, with ``split.budget`` and ``split.labelled`` set to the advice."""
    args = ["medssl", "finetune", *(["--config", config] if config else []), *(["--data", data] if data else [])]
    args += [o for o in overrides if o.split("=", 1)[0].strip().lstrip("-") not in SPLIT_CHOICE]
    return shlex.join([*args, f"split.budget={budget}", labelled_override(cases)])


def check_request(budget, strategy: str, init: str | None, seed) -> None:
    """Every check that needs no data: one-line errors naming the option."""
    check_strategy(strategy)
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ConfigError(f"--budget: the number of patients to advise must be an integer >= 1 (got {budget!r})")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"--seed: must be an integer (got {seed!r})")
    if init is not None and not Path(init).expanduser().is_file():
        raise ConfigError(f"--init: checkpoint not found: {init}")


def run_advise(cfg, *, budget: int, strategy: str = "typical", init: str | None = None, seed: int = 0,
               out: str | Path = "advice", progress: bool = True) -> dict:
    """Rank the fold's training patients; write ``advice.csv``, ``embedding.png`` and ``advice.json`` to ``out``.

    Everything that can fail (options, data, checkpoint, budget) is checked before ``out`` is created, and all
    but the checkpoint's fit to the model before the slice cache is built.
    """
    from medssl.data.cache import prepare
    from medssl.data.layouts import open_data
    from medssl.engine.checkpoint import load_checkpoint

    check_request(budget, strategy, init, seed)
    if not cfg.data.path:
        raise ConfigError("config key 'data.path' is empty: give the dataset folder (--data)")
    warnings, model = [], None
    info = open_data(cfg.data)
    if init is not None:
        init = str(Path(init).expanduser().resolve())
        warnings = check_checkpoint_data(load_checkpoint(init)["meta"], cfg.data)
        model = load_encoder_model(init, info.n_classes, cfg.model)
    index = dataset_index(info)
    patients, where = training_patients(cfg, index)
    if budget > len(patients):
        raise ConfigError(f"--budget: M={budget} exceeds the {len(patients)} training patients of {where} "
                          "(validation and test patients excluded)")
    cache = prepare(cfg.data, info, progress=progress)
    raw = embed_patients(cache, patients, model=model)
    z = project(raw)
    ranking = rank_patients(z, budget, strategy, seed)
    names = list(patients)
    rows = advice_rows(names, ranking)
    chosen = [names[i] for i in ranking.chosen(budget)]
    no_label = set(index.unlabelled_cases)
    source = f"encoder of {init}" if init else "intensity statistics"
    result = {"strategy": strategy, "seed": seed, "budget": budget, "features": source, "candidates": len(names),
            "where": where, "chosen": chosen, "cases": {p: patients[p] for p in chosen},
            "label_cases": [c for p in chosen for c in patients[p]],
            "without_label": [c for p in chosen for c in patients[p] if c in no_label],
            "feature_dims": int(raw.shape[1]), "projected_dims": int(z.shape[1]), "warnings": warnings,
            "cache": str(cache.root)}
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    write_advice_csv(out / "advice.csv", rows)
    save_map(out / "embedding.png", z, names, ranking, budget,
             f"{strategy} (seed {seed}), M={budget} of {len(names)} patients of {where}\nfeatures: {source}")
    write_json(out / "advice.json", result)
    result["out"] = str(out)
    return result
