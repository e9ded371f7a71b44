"""``medssl experiment CONFIG.yaml``: methods x label budgets x seeds x folds, under one protocol.

    base: hippocampus                 # preset or file every run starts from
    data: ../shared/data/Task04_Hippocampus
    output_dir: runs/exp
    methods: [random, simclr, pcl]    # "random" = no pretraining
    # an entry may also be a mapping: a display name, the pretraining method (or random) and overrides
    # applied to both its pretraining and its cells, e.g. another backbone:
    #   - {name: kaf-random, method: random, overrides: ["model.backbone=kaf-unet"]}
    budgets: [1, 2, 5]
    seeds: [0, 1, 2]
    folds: [0]
    pretrain: ["train.epochs=20"]     # dotted overrides for the pretraining runs
    finetune: ["train.epochs=20"]     # dotted overrides for the fine-tuning cells

``medssl experiment hippocampus_cpu`` runs a packaged experiment preset
(``medssl/configs/experiments/*.yaml``). Each method is pretrained once per fold (cached in ``pretrain/``); every cell fine-tunes with
``train.seed = split.budget_seed = seed``, selects on the validation patients and is evaluated on the
test fold. Finished runs are skipped and a killed run is resumed, so a killed experiment continues
where it stopped. Outputs: ``results.csv``, ``results.md`` (mean ± sd per method and M, with a
paired Wilcoxon test of each method against random init) and ``dice_vs_m.png``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from medssl.config import build_dataclass, load_config
from medssl.engine.finetune import finetune
from medssl.engine.pretrain import pretrain
from medssl.errors import ConfigError
from medssl.evaluation.evaluate import evaluate_run
from medssl.methods import available_methods
from medssl.report.tables import results_table, save_plot


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


EXPERIMENT_PRESETS = Path(__file__).resolve().parents[1] / "configs" / "experiments"


@dataclass
class MethodEntry:
    name: str  # the row name in tables and run folders
    method: str = "random"  # a pretraining method, or "random" (no pretraining)
    overrides: list[str] = field(default_factory=list)  # dotted overrides for its pretraining and cells
    pretrain: list[str] = field(default_factory=list)  # ... for its pretraining only
    finetune: list[str] = field(default_factory=list)  # ... for its cells only
    init: str = ""  # reuse this pretrained checkpoint instead of pretraining ("{fold}" is replaced)


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
    data = yaml.safe_load(path.read_text()) or {}
    for item in overrides or []:
        key, _, value = item.partition("=")
        data[key] = yaml.safe_load(value)
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
    return cfg


def _run_once(runner, run_dir: Path, cfg, done: Path):
    """Skip a finished run, resume a killed one, start a new one."""
    if done.is_file():
        return
    runner(cfg, resume=(run_dir / "config.yaml").is_file(), progress=False)


def run_experiment(exp: ExperimentConfig, progress_print=print) -> list[dict]:
    out = Path(exp.output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiment.yaml").write_text(yaml.safe_dump(dataclasses.asdict(exp), sort_keys=False))
    common = [f"data.path={exp.data}"] if exp.data else []
    rows = []
    for fold in exp.folds:
        for entry in method_entries(exp):
            method, own = entry.name, entry.overrides
            init = None
            if entry.init:
                init = Path(entry.init.replace("{fold}", str(fold))).expanduser()
                if not init.is_file():
                    raise ConfigError(f"methods[{method}].init: checkpoint not found: {init}")
            elif entry.method != "random":
                name = f"{method}-f{fold}"
                cfg = load_config(exp.base, overrides=[*common, *exp.pretrain, *own, *entry.pretrain,
                                                       f"output_dir={out / 'pretrain'}", f"name={name}",
                                                       f"pretrain.method={entry.method}", f"split.fold={fold}"])
                run_dir = out / "pretrain" / name
                _run_once(pretrain, run_dir, cfg, run_dir / "train_state.json")
                init = run_dir / "checkpoints" / "last.pt"
            for budget in exp.budgets:
                for seed in exp.seeds:
                    name = f"{method}-f{fold}-m{budget}-s{seed}"
                    run_dir = out / "cells" / name
                    extra = [f"train.init={init}"] if init else []
                    cfg = load_config(exp.base, overrides=[*common, *exp.finetune, *own, *entry.finetune, *extra,
                                                           f"output_dir={out / 'cells'}", f"name={name}",
                                                           f"split.fold={fold}", f"split.budget={budget}",
                                                           f"split.budget_seed={seed}", f"train.seed={seed}"])
                    _run_once(finetune, run_dir, cfg, run_dir / "train_state.json")
                    if not (run_dir / "metrics.json").is_file():
                        evaluate_run(run_dir, progress=False)
                    m = json.loads((run_dir / "metrics.json").read_text())
                    split = json.loads((run_dir / "splits.json").read_text())
                    row = {"method": method, "fold": fold, "budget": budget, "M": split["budget_m"], "seed": seed,
                           "dice_mean": m["dice_mean"], "hd95_mean": m["hd95_mean"],
                           "micro_dice": m["micro_dice"]["mean"], "n_test": m["n_cases"]}
                    if exp.legacy_metrics:
                        row["slice_mean_dice"] = m["slice_mean_dice"]["mean"]
                    rows.append(row)
                    progress_print(json.dumps(row))
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.md").write_text(results_table(rows) + "\n")
    save_plot(rows, out / "dice_vs_m.png")
    return rows
