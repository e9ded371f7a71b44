"""``results.csv`` of an experiment: writing it as cells finish, reading it back, and reusing its rows.

A grid can outlive its run folders (they are large and not committed; a new checkout has only the CSV), so
a cell whose row is already there is not trained again (:func:`previous_rows`).
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import yaml

from medssl.advise.experiment import DEFAULT as DEFAULT_SELECTION
from medssl.data.atomic import write_csv
from medssl.errors import ConfigError
from medssl.pipeline.experiment_config import ExperimentConfig, method_entries

PROTOCOL = ("base", "data", "pretrain", "finetune", "select", "legacy_metrics")
KEY = ("method", "fold", "budget", "seed")


def write_results(path: Path, rows: list[dict]) -> None:
    """Rows as CSV (columns: every key in order of first appearance), written atomically."""
    write_csv(path, rows)


def read_results(path: Path) -> list[dict]:
    """Rows of a results.csv with their numbers typed back (fold, budget, M, seed ints; scores floats)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        for k in ("fold", "seed", "M", "budget"):
            r[k] = int(r[k]) if str(r.get(k, "")).isdigit() else r.get(k)
        for k, v in list(r.items()):
            if k not in (*KEY, "M", "choice", "selection") and v not in (None, ""):
                try:
                    r[k] = float(v)
                except ValueError:
                    pass
    return rows


def row_key(row: dict) -> tuple:
    """(method, fold, budget, seed, selection) of a results row."""
    return (str(row["method"]), int(row["fold"]), str(row["budget"]), int(row["seed"]),
            str(row.get("selection") or DEFAULT_SELECTION))


def previous_rows(exp: ExperimentConfig, out: Path) -> dict[tuple, dict]:
    """Rows an earlier run of this experiment left in ``out/results.csv``, keyed by :func:`row_key`.

    The rows are reused only when the protocol is the one they were made with: the same base, data,
    pretraining and fine-tuning overrides, choices and the same definition of each method row; otherwise this
    is an error naming the first key that differs."""
    csv_path, yml = out / "results.csv", out / "experiment.yaml"
    if not csv_path.is_file():
        return {}
    if not yml.is_file():
        raise ConfigError(f"{csv_path}: results without the experiment.yaml they were made with; "
                          "move them away or choose another output_dir")
    old = yaml.safe_load(yml.read_text()) or {}
    new = dataclasses.asdict(exp)
    for key in PROTOCOL:
        if key in old and old[key] != new[key]:
            raise ConfigError(f"{csv_path}: made with a different {key} ({old[key]!r}, now {new[key]!r}); "
                              "choose another output_dir or move the old results away")
    before = {e.name: e for e in method_entries(ExperimentConfig(methods=old.get("methods", [])))}
    for entry in method_entries(exp):
        if entry.name in before and before[entry.name] != entry:
            raise ConfigError(f"{csv_path}: methods[{entry.name}] was defined differently "
                              f"({dataclasses.asdict(before[entry.name])}); rename the row or use another output_dir")
    return {row_key(r): r for r in read_results(csv_path)}
