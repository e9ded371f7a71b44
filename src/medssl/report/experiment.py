"""``medssl experiment CONFIG.yaml``: methods x label budgets x seeds x folds, under one protocol.

    base: hippocampus                 # preset or file every run starts from
    data: ../shared/data/Task04_Hippocampus
    output_dir: runs/exp
    methods: [random, simclr, pcl]    # "random" = no pretraining
    # an entry may also be a mapping: a display name, the pretraining method (or random) and overrides
    # applied to both its pretraining and its cells, e.g. another backbone:
    #   - {name: kaf-random, method: random, base: kaf_hippocampus}
    budgets: [1, 2, 5]
    seeds: [0, 1, 2]
    folds: [0]
    pretrain: ["train.epochs=20"]     # dotted overrides for the pretraining runs
    finetune: ["train.epochs=20"]     # dotted overrides for the fine-tuning cells

``medssl experiment hippocampus_cpu`` runs a packaged experiment preset
(``medssl/configs/experiments/*.yaml``). Each method is pretrained once per fold (cached in ``pretrain/``); every cell fine-tunes with
``train.seed = split.budget_seed = seed``, selects on the validation patients and is evaluated on the
test fold. Finished runs are skipped and a killed run is resumed, so a killed experiment continues
where it stopped. A cell already in ``output_dir/results.csv`` is not trained again even when its run folders
are gone, provided the protocol is the same (:func:`previous_rows`); rows outside the current grid are kept.
Outputs: ``results.csv``, ``results.md`` (mean ± sd per method and M, with a paired Wilcoxon test and a
bootstrap CI of each method against random init) and ``dice_vs_m.png``.

``select: {KEY: [values]}`` trains every cell once per combination and keeps the best on validation.
``selection: [seeded, kcenter, typical@pcl]`` adds cells whose labelled patients come from the label-budget
advisor (:mod:`medssl.advise`) instead of the seeded draw, paired with the seeded cells.

With ``sam_methods`` set, each listed method's cells also get a "+SAM" row: the cell's test predictions are
refined with LiteMedSAM box prompts (:mod:`medssl.sam.experiment_step`, settings in ``sam``) and scored
against the same cases before and after, in ``results_sam.csv`` / ``results_sam.md``::

    sam_methods: [random, pcl]
    sam_budgets: [1, 2]
    sam_cases: 20                     # first 20 test cases of each cell (0 = all)
    sam: {merge: replace, iou_threshold: 0.0, box_pad: 0}

``sam: {policy: auto}`` chooses the merge policy per class on each cell's validation patients (keep the coarse
mask unless a policy beats it there; :mod:`medssl.sam.policy`); the refined row is then "<method>+SAM (auto)"
with the choice per class, and ``results_sam.md`` adds the per-class paired differences and the choices.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from medssl.advise.experiment import DEFAULT as DEFAULT_SELECTION
from medssl.advise.experiment import cell_prefix, check_selection, parse_selection, seed_advised_run
from medssl.config import build_dataclass, load_config
from medssl.data.volume import atomic_write
from medssl.engine.finetune import finetune
from medssl.engine.pretrain import pretrain
from medssl.errors import ConfigError
from medssl.evaluation.evaluate import evaluate_run
from medssl.methods import available_methods
from medssl.report.tables import results_table, sam_table, save_plot


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
    if cfg.reference not in names and cfg.reference != "random":
        raise ConfigError(f"{path}: reference '{cfg.reference}' is not in methods ({', '.join(names)})")
    bad = [m for m in cfg.sam_methods if m != "all" and m not in names]
    if bad:
        raise ConfigError(f"{path}: sam_methods {bad} are not in methods ({', '.join(names)})")
    if cfg.sam_methods:
        _refine_config(cfg)  # unknown or ill-typed sam.* keys fail here, before any training
    for choice in select_options(cfg.select):  # empty lists and unknown keys fail here too
        load_config(cfg.base, overrides=choice)
    check_selection(cfg.selection, entries)
    return cfg


def _refine_config(exp: ExperimentConfig):
    from medssl.sam.refine import RefineConfig

    rc = build_dataclass(RefineConfig, dict(exp.sam), "sam.")
    rc.validate()  # ConfigError naming the option
    return rc


def _sam_rows(exp: ExperimentConfig, run_dir: Path, row: dict) -> list[dict]:
    """The "+SAM" post-step of one cell: a coarse row and a refined row, scored on the same test cases.

    With ``sam: {policy: auto}`` the refined row is "<method>+SAM (auto)" and records, per class, the policy
    chosen on the cell's validation patients (``choice_<class>``) with its and keep's validation Dice."""
    from medssl.sam.experiment_step import refine_run

    cases = None
    if exp.sam_cases:
        cases = sorted(json.loads((run_dir / "splits.json").read_text())["test"])[:exp.sam_cases]
    rc = _refine_config(exp)
    result = refine_run(run_dir, rc, cases=cases)
    refined = f"{row['method']}+SAM" + (" (auto)" if rc.policy == "auto" else "")
    out = []
    for name, when in ((row["method"], "before"), (refined, "after")):
        r = {k: row[k] for k in ("fold", "budget", "M", "seed")}
        r.update(method=name, dice_mean=result[when]["dice_mean"], hd95_mean=result[when]["hd95_mean"],
                 n_test=len(result["cases"]))
        for cls, pc in result["per_class"].items():
            r[f"dice_{cls}"] = pc[f"dice_{when}"]
        if when == "after" and "policy" in result:
            r["n_val"] = len(result["policy"]["validation_cases"])
            for cls, d in result["policy"]["classes"].items():
                r[f"choice_{cls}"] = d["choice"]
                r[f"val_keep_{cls}"] = round(d["val_dice_keep"], 6)
                r[f"val_choice_{cls}"] = round(d["val_dice_choice"], 6)
        out.append(r)
    return out


def _wants_sam(exp: ExperimentConfig, method: str, budget) -> bool:
    return bool(exp.sam_methods) and ("all" in exp.sam_methods or method in exp.sam_methods) and (
        not exp.sam_budgets or budget in exp.sam_budgets)


def select_options(select: dict) -> list[list[str]]:
    """``{key: [v1, v2], ...}`` -> every combination as override lists (``[[]]`` when nothing is selected)."""
    keys = list(select)
    for k in keys:
        if not isinstance(select[k], list) or not select[k]:
            raise ConfigError(f"experiment key 'select.{k}': give a non-empty list of values")
    return [[f"{k}={v}" for k, v in zip(keys, values)] for values in itertools.product(*(select[k] for k in keys))]


def _write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


_PROTOCOL = ("base", "data", "pretrain", "finetune", "select", "legacy_metrics")
_KEY = ("method", "fold", "budget", "seed")


def read_results(path: Path) -> list[dict]:
    """Rows of a results.csv with their numbers typed back (fold, budget, M, seed ints; scores floats)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        for k in ("fold", "seed", "M", "budget"):
            r[k] = int(r[k]) if str(r.get(k, "")).isdigit() else r.get(k)
        for k, v in list(r.items()):
            if k not in (*_KEY, "M", "choice", "selection") and v not in (None, ""):
                try:
                    r[k] = float(v)
                except ValueError:
                    pass
    return rows


def _row_key(row: dict) -> tuple:
    return (str(row["method"]), int(row["fold"]), str(row["budget"]), int(row["seed"]),
            str(row.get("selection") or DEFAULT_SELECTION))


def previous_rows(exp: ExperimentConfig, out: Path) -> dict[tuple, dict]:
    """Rows an earlier run of this experiment left in ``out/results.csv``, keyed by (method, fold, budget, seed).

    A grid can outlive its run folders (they are large and not committed; a new checkout has only the CSV), so
    a cell whose row is already there is not trained again. The rows are reused only when the protocol is the
    one they were made with: the same base, data, pretraining and fine-tuning overrides, choices and the same
    definition of each method row; otherwise this is an error naming the first key that differs."""
    csv_path, yml = out / "results.csv", out / "experiment.yaml"
    if not csv_path.is_file():
        return {}
    if not yml.is_file():
        raise ConfigError(f"{csv_path}: results without the experiment.yaml they were made with; "
                          "move them away or choose another output_dir")
    old = yaml.safe_load(yml.read_text()) or {}
    new = dataclasses.asdict(exp)
    for key in _PROTOCOL:
        if key in old and old[key] != new[key]:
            raise ConfigError(f"{csv_path}: made with a different {key} ({old[key]!r}, now {new[key]!r}); "
                              "choose another output_dir or move the old results away")
    before = {e.name: e for e in method_entries(ExperimentConfig(methods=old.get("methods", [])))}
    for entry in method_entries(exp):
        if entry.name in before and before[entry.name] != entry:
            raise ConfigError(f"{csv_path}: methods[{entry.name}] was defined differently "
                              f"({dataclasses.asdict(before[entry.name])}); rename the row or use another output_dir")
    return {_row_key(r): r for r in read_results(csv_path)}


def _has_folders(out: Path, name: str) -> bool:
    """Whether cell ``name`` (or one of its ``select`` options ``name-o<i>``) has run folders in ``out``."""
    return (out / "cells" / name).exists() or any((out / "cells").glob(f"{name}-o*"))


def _run_once(runner, run_dir: Path, cfg, done: Path):
    """Skip a finished run, resume a killed one, start a new one."""
    if done.is_file():
        return
    runner(cfg, resume=(run_dir / "config.yaml").is_file(), progress=False)


def _cell(exp: ExperimentConfig, out: Path, entry: MethodEntry, fold: int, budget, seed: int, init,
          selection: str = DEFAULT_SELECTION) -> tuple[dict, Path]:
    """Fine-tune one cell (every ``select`` option), keep the best on validation, evaluate it on test.

    A non-default ``selection`` labels the advisor's M patients instead of the seeded draw (medssl.advise)."""
    method, base = entry.name, entry.base or exp.base
    common = [f"data.path={exp.data}"] if exp.data else []
    name = f"{cell_prefix(method, selection)}-f{fold}-m{budget}-s{seed}"
    extra = [f"train.init={init}"] if init else []
    tried = []
    for i, choice in enumerate(select_options(exp.select)):
        opt_name = name + (f"-o{i}" if exp.select else "")
        run_dir = out / "cells" / opt_name
        cfg = load_config(base, overrides=[*common, *exp.finetune, *entry.overrides, *entry.finetune, *extra,
                                           *choice, f"output_dir={out / 'cells'}", f"name={opt_name}",
                                           f"split.fold={fold}", f"split.budget={budget}",
                                           f"split.budget_seed={seed}", f"train.seed={seed}"])
        if selection != DEFAULT_SELECTION and not (run_dir / "config.yaml").is_file():
            seed_advised_run(cfg, run_dir, selection, _advise_features(exp, out, selection, fold), seed,
                             out / "advise")
        _run_once(finetune, run_dir, cfg, run_dir / "train_state.json")
        state = json.loads((run_dir / "train_state.json").read_text())
        tried.append((state["best_score"], -i, run_dir, choice))
    val_score, _, run_dir, choice = max(tried)  # validation Dice only; the first on ties
    if not (run_dir / "metrics.json").is_file():
        evaluate_run(run_dir, progress=False)
    m = json.loads((run_dir / "metrics.json").read_text())
    split = json.loads((run_dir / "splits.json").read_text())
    row = {"method": method, "fold": fold, "budget": budget, "M": split["budget_m"], "seed": seed,
           "dice_mean": m["dice_mean"], "hd95_mean": m["hd95_mean"], "micro_dice": m["micro_dice"]["mean"],
           "n_test": m["n_cases"], "val_dice": round(float(val_score), 6)}
    if exp.select:
        row["choice"] = " ".join(choice)
    if exp.selection != [DEFAULT_SELECTION]:
        row["selection"] = selection
    if exp.legacy_metrics:
        row["slice_mean_dice"] = m["slice_mean_dice"]["mean"]
    return row, run_dir


def _advise_features(exp: ExperimentConfig, out: Path, selection: str, fold: int) -> str | None:
    """The checkpoint whose encoder embeds the patients for ``STRATEGY@ROW`` (None: intensity statistics)."""
    source = parse_selection(selection)[1]
    if source == "intensity":
        return None
    return str(_pretrained(exp, out, {e.name: e for e in method_entries(exp)}[source], fold))


def _pretrained(exp: ExperimentConfig, out: Path, entry: MethodEntry, fold: int) -> Path | None:
    """The checkpoint a row's cells start from in this fold: its own ``init``, a pretraining run, or none."""
    if entry.init:
        init = Path(entry.init.replace("{fold}", str(fold))).expanduser()
        if not init.is_file():
            raise ConfigError(f"methods[{entry.name}].init: checkpoint not found: {init}")
        return init
    if entry.method == "random":
        return None
    name = f"{entry.name}-f{fold}"
    common = [f"data.path={exp.data}"] if exp.data else []
    cfg = load_config(entry.base or exp.base,
                      overrides=[*common, *exp.pretrain, *entry.overrides, *entry.pretrain,
                                 f"output_dir={out / 'pretrain'}", f"name={name}",
                                 f"pretrain.method={entry.method}", f"split.fold={fold}"])
    run_dir = out / "pretrain" / name
    _run_once(pretrain, run_dir, cfg, run_dir / "train_state.json")
    return run_dir / "checkpoints" / "last.pt"


def run_experiment(exp: ExperimentConfig, progress_print=print) -> list[dict]:
    out = Path(exp.output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    earlier = previous_rows(exp, out)
    atomic_write(out / "experiment.yaml",
                 lambda tmp: Path(tmp).write_text(yaml.safe_dump(dataclasses.asdict(exp), sort_keys=False)))
    rows, sam_rows = [], []
    for fold in exp.folds:
        for entry in method_entries(exp):
            method = entry.name
            cells = [(b, s, sel) for sel in exp.selection for b in exp.budgets for s in exp.seeds]
            # a cell already in results.csv whose run folders are gone is taken from there (SAM rows need them;
            # only seeded cells get them)
            reuse = {c for c in cells if (method, fold, str(c[0]), c[1], c[2]) in earlier
                     and not (c[2] == DEFAULT_SELECTION and _wants_sam(exp, method, c[0]))
                     and not _has_folders(out, f"{cell_prefix(method, c[2])}-f{fold}-m{c[0]}-s{c[1]}")}
            if reuse:
                progress_print(f"{method} fold {fold}: {len(reuse)} cell(s) taken from the earlier results.csv")
            init = None if len(reuse) == len(cells) else _pretrained(exp, out, entry, fold)
            for budget, seed, sel in cells:
                if (budget, seed, sel) in reuse:
                    old = earlier[(method, fold, str(budget), seed, sel)]
                    rows.append(old if exp.selection == [DEFAULT_SELECTION] else {**old, "selection": sel})
                    continue
                row, run_dir = _cell(exp, out, entry, fold, budget, seed, init, sel)
                rows.append(row)
                _write_csv(out / "results.csv", rows)  # as cells finish: a killed grid keeps its rows
                progress_print(json.dumps(row))
                if sel == DEFAULT_SELECTION and _wants_sam(exp, method, budget):
                    sam_rows += _sam_rows(exp, run_dir, row)
                    progress_print(json.dumps(sam_rows[-1]))
    visited = {_row_key(r) for r in rows}
    kept = [r for k, r in earlier.items() if k not in visited]  # cells of an earlier, larger grid: never lost
    if kept:
        progress_print(f"{len(kept)} row(s) of cells outside this grid kept from the earlier results.csv")
        rows += kept
    _write_csv(out / "results.csv", rows)
    shown = [{**r, "method": f"{r['method']} [{r['selection']}]"} if r.get("selection") not in (None, "",
             DEFAULT_SELECTION) else r for r in rows]  # a selection is its own row in the tables
    (out / "results.md").write_text(results_table(shown, reference=exp.reference) + "\n")
    save_plot(shown, out / "dice_vs_m.png", reference=exp.reference)
    if sam_rows:
        _write_csv(out / "results_sam.csv", sam_rows)
        (out / "results_sam.md").write_text(sam_table(sam_rows) + "\n")
    return rows
