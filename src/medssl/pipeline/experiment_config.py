"""The experiment file of ``medssl experiment`` (format in :mod:`medssl.pipeline.experiment`): loading and checks.

Everything that can be wrong in the file (unknown keys, methods, ``sam.*`` options, ``select`` values,
``selection`` strategies) is a one-line :class:`~medssl.errors.ConfigError` here, before any training.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from medssl.advise.experiment import check_selection
from medssl.config import build_dataclass, load_config
from medssl.errors import ConfigError
from medssl.methods import available_methods


@dataclass
class ExperimentConfig:
    base: str = "hippocampus"
    data: str = ""
    output_dir: str = "runs/experiment"
    methods: list = field(default_factory=lambda: ["random"])  # names or {name, method, overrides}
    budgets: list = field(default_factory=lambda: [1, 2, 5])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    folds: list[int] = field(default_factory=lambda: [0])
    pretrain: list[str] = field(default_factory=list)
    finetune: list[str] = field(default_factory=list)
    legacy_metrics: bool = False
    reference: str = "random"  # the row every other method is compared with (paired, same fold and seed)
    # rows whose fair control is another row than the reference, {row: control}, e.g. {kaf-random: unet-c2}
    # (same network without its KAF layers); results.md adds their paired differences against that control
    controls: dict = field(default_factory=dict)
    # "+SAM" post-step (medssl.sam): refine each listed method's test predictions with LiteMedSAM box prompts
    sam_methods: list = field(default_factory=list)  # method names, or ["all"]; empty = no refinement
    sam_budgets: list = field(default_factory=list)  # budgets to refine (empty = all)
    sam_cases: int = 0  # refine the first N test cases of each cell (0 = all); coarse is scored on the same N
    sam: dict = field(default_factory=dict)  # RefineConfig fields, e.g. {merge: union, iou_threshold: 0.8}
    # fine-tuning choices made on validation only: {config key: [values]}; every cell of every row (random init
    # included) trains each combination and keeps the one with the best validation Dice (the first on ties)
    select: dict = field(default_factory=dict)
    # which M patients a cell labels (medssl.advise.experiment): "seeded" (the split's draw) and advisor strategies,
    # e.g. [seeded, kcenter, typical@pcl]; anything but the default adds a "selection" column to the rows
    selection: list = field(default_factory=lambda: ["seeded"])


EXPERIMENT_PRESETS = Path(__file__).resolve().parents[1] / "configs" / "experiments"


@dataclass
class MethodEntry:
    name: str  # the row name in tables and run folders
    method: str = "random"  # a pretraining method, or "random" (no pretraining)
    overrides: list[str] = field(default_factory=list)  # dotted overrides for its pretraining and cells
    pretrain: list[str] = field(default_factory=list)  # ... for its pretraining only
    finetune: list[str] = field(default_factory=list)  # ... for its cells only
    init: str = ""  # reuse this pretrained checkpoint instead of pretraining ("{fold}" is replaced)
    base: str = ""  # another preset or file for this entry's runs (default: the experiment's base)


def method_entries(exp: ExperimentConfig) -> list[MethodEntry]:
    out = []
    for item in exp.methods:
        if isinstance(item, str):
            out.append(MethodEntry(name=item, method=item))
        else:
            entry = build_dataclass(MethodEntry, item, "methods[].")
            out.append(entry)
    return out


def _resolve(path: str | Path) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    preset = EXPERIMENT_PRESETS / f"{path}.yaml"
    if preset.is_file():
        return preset
    names = ", ".join(sorted(x.stem for x in EXPERIMENT_PRESETS.glob("*.yaml")))
    raise ConfigError(f"experiment file not found: {path} (packaged experiments: {names})")


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    path = _resolve(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    for item in overrides or []:
        key, _, value = item.partition("=")
        try:
            data[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"override '{item}': the value is not valid YAML") from None
    cfg = build_dataclass(ExperimentConfig, data, "")
    if len(cfg.seeds) < 1 or not cfg.methods or not cfg.budgets:
        raise ConfigError(f"{path}: methods, budgets and seeds must not be empty")
    for item in cfg.methods:
        if not isinstance(item, (str, dict)):
            raise ConfigError(f"{path}: a methods entry must be a name or a mapping, got {item!r}")
    entries = method_entries(cfg)
    unknown = [e.method for e in entries if e.method != "random" and e.method not in available_methods()]
    if unknown:
        raise ConfigError(f"{path}: unknown method(s) {unknown}; available: random, {', '.join(available_methods())}")
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: method names must be unique, got {names}")
    if cfg.reference not in names and cfg.reference != "random":
        raise ConfigError(f"{path}: reference '{cfg.reference}' is not in methods ({', '.join(names)})")
    for row, control in cfg.controls.items():
        if row not in names or control not in names or row == control:
            raise ConfigError(f"{path}: controls: '{row}: {control}' must name two different rows of methods "
                              f"({', '.join(names)})")
    bad = [m for m in cfg.sam_methods if m != "all" and m not in names]
    if bad:
        raise ConfigError(f"{path}: sam_methods {bad} are not in methods ({', '.join(names)})")
    if cfg.sam_methods:
        refine_config(cfg)  # unknown or ill-typed sam.* keys fail here, before any training
    for choice in select_options(cfg.select):  # empty lists and unknown keys fail here too
        load_config(cfg.base, overrides=choice)
    check_selection(cfg.selection, entries)
    return cfg


def refine_config(exp: ExperimentConfig):
    """The experiment's ``sam:`` mapping as a checked :class:`medssl.sam.refine.RefineConfig`."""
    from medssl.sam.refine import RefineConfig

    rc = build_dataclass(RefineConfig, dict(exp.sam), "sam.")
    rc.validate()  # ConfigError naming the option
    return rc


def wants_sam(exp: ExperimentConfig, method: str, budget) -> bool:
    """Whether the cells of ``method`` at ``budget`` get the "+SAM" post-step."""
    return bool(exp.sam_methods) and ("all" in exp.sam_methods or method in exp.sam_methods) and (
        not exp.sam_budgets or budget in exp.sam_budgets)


def select_options(select: dict) -> list[list[str]]:
    """``{key: [v1, v2], ...}`` -> every combination as override lists (``[[]]`` when nothing is selected)."""
    keys = list(select)
    for k in keys:
        if not isinstance(select[k], list) or not select[k]:
            raise ConfigError(f"experiment key 'select.{k}': give a non-empty list of values")
    return [[f"{k}={v}" for k, v in zip(keys, values)] for values in itertools.product(*(select[k] for k in keys))]
