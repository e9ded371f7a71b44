"""The `selection:` axis of `medssl experiment` on a tiny grid: paired rows, defaults, bad values, resuming."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml

from medssl.advise.strategies import rank_patients
from medssl.errors import ConfigError
from tests.advise.common import TINY, split_cache, split_of


# ------------------------------------------------------------------------------------------ experiment
def test_selection_axis_gives_paired_rows(phantom_root, tmp_path):
    from medssl.advise.embed import project
    from medssl.advise.run import embed_patients
    from medssl.pipeline.experiment import ExperimentConfig, load_experiment, run_experiment

    assert ExperimentConfig().selection == ["seeded"]
    cache_dir = f"data.cache_dir={tmp_path / 'c'}"
    spec = {"base": "demo", "data": str(phantom_root), "output_dir": str(tmp_path / "exp"), "methods": ["random"],
            "budgets": [2], "seeds": [0], "folds": [0], "finetune": [*TINY, cache_dir],
            "selection": ["seeded", "kcenter", "typical"]}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(spec))
    rows = run_experiment(load_experiment(path), progress_print=lambda _: None)
    assert [r["selection"] for r in rows] == ["seeded", "kcenter", "typical"]
    for key in ("method", "fold", "budget", "M", "seed", "n_test"):
        assert len({r[key] for r in rows}) == 1, key
    cells = tmp_path / "exp" / "cells"
    splits = {s: json.loads((cells / name / "splits.json").read_text()) for s, name in (
        ("seeded", "random-f0-m2-s0"), ("kcenter", "random+kcenter-f0-m2-s0"), ("typical", "random+typical-f0-m2-s0"))}
    for s in splits.values():  # everything but the labelled patients is shared
        assert (s["test"], s["val"], s["budget_m"]) == (splits["seeded"]["test"], splits["seeded"]["val"], 2)
    split = split_of(tmp_path, phantom_root)
    names = sorted(split.patients["labelled"])
    z = project(embed_patients(split_cache(tmp_path, phantom_root), {p: [p] for p in names}, None))
    for strategy in ("kcenter", "typical"):
        assert splits[strategy]["budget_mode"] == "explicit"
        want = sorted(names[i] for i in rank_patients(z, 2, strategy, seed=0).chosen(2))
        assert splits[strategy]["patients"]["labelled"] == want
    assert len({tuple(s["patients"]["labelled"]) for s in splits.values()}) == 3  # three different pairs
    # the advisor's "random" over the fold's training patients is the seeded (nested) draw itself
    assert sorted(names[i] for i in rank_patients(z, 2, "random", seed=0).chosen(2)) == splits["seeded"][
        "patients"]["labelled"]
    cfg = yaml.safe_load((cells / "random+kcenter-f0-m2-s0" / "config.yaml").read_text())
    assert cfg["train"]["seed"] == 0 and Path(cfg["data"]["path"]).is_absolute()
    assert sorted(cfg["split"]["labelled"]) == splits["kcenter"]["labelled"]  # passed as split.labelled
    assert yaml.safe_load((cells / "random-f0-m2-s0" / "config.yaml").read_text())["split"]["labelled"] == []
    for strategy in ("kcenter", "typical"):
        assert not (cells / f"random+{strategy}-f0-m2-s0" / "advice.csv").exists()  # nothing pre-written
        with open(tmp_path / "exp" / "advise" / f"random+{strategy}-f0-m2-s0.csv") as fh:
            top = sorted(r["patient"] for r in csv.DictReader(fh) if int(r["rank"]) <= 2)
        assert top == splits[strategy]["patients"]["labelled"]
    with open(tmp_path / "exp" / "results.csv") as fh:
        assert "selection" in next(csv.reader(fh))
    assert "| random [kcenter] |" in (tmp_path / "exp" / "results.md").read_text()
    # a rerun from scratch advises the same patients
    shutil.rmtree(cells)
    (tmp_path / "exp" / "results.csv").unlink()
    run_experiment(load_experiment(path), progress_print=lambda _: None)
    again = json.loads((cells / "random+kcenter-f0-m2-s0" / "splits.json").read_text())
    assert again["patients"]["labelled"] == splits["kcenter"]["patients"]["labelled"]
    # the run folders are gone, results.csv is there: every row, selection included, is taken from it
    shutil.rmtree(cells)
    said = []
    reused = run_experiment(load_experiment(path), progress_print=said.append)
    assert [r["selection"] for r in reused] == ["seeded", "kcenter", "typical"] and not cells.exists()
    assert any("3 cell(s) taken from the earlier results.csv" in s for s in said)


def test_default_selection_leaves_rows_unchanged(phantom_root, tmp_path):
    from medssl.pipeline.experiment import load_experiment, run_experiment

    spec = {"base": "demo", "data": str(phantom_root), "output_dir": str(tmp_path / "exp"), "methods": ["random"],
            "budgets": [1], "seeds": [0], "finetune": [*TINY, f"data.cache_dir={tmp_path / 'c'}"]}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(spec))
    (row,) = run_experiment(load_experiment(path), progress_print=lambda _: None)
    assert "selection" not in row and (tmp_path / "exp" / "cells" / "random-f0-m1-s0").is_dir()
    with open(tmp_path / "exp" / "results.csv") as fh:
        assert "selection" not in next(csv.reader(fh))


@pytest.mark.parametrize("selection, needle", [
    (["seeded", "nope"], "unknown strategy 'nope'"), (["kcenter@pcl"], "features 'pcl'"),
    (["seeded", "seeded"], "unique"), ([], "non-empty")])
def test_bad_selection_is_rejected_before_training(tmp_path, selection, needle):
    from medssl.pipeline.experiment import load_experiment

    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"base": "demo", "methods": ["random", "simclr"], "selection": selection}))
    with pytest.raises(ConfigError, match=f"selection.*{needle}|{needle}"):
        load_experiment(path)
    path.write_text(yaml.safe_dump({"base": "demo", "methods": ["random", "simclr"],
                                    "selection": ["seeded", "typical@simclr"]}))
    assert load_experiment(path).selection == ["seeded", "typical@simclr"]


def test_selection_on_a_pretrained_row_pairs_the_methods(phantom_root, tmp_path):
    """``facility@pre``: the row ``pre``'s checkpoint embeds the patients for every row, so both rows label the
    same patients; the embeddings are computed once per fold and kept in ``<output_dir>/advise``."""
    from medssl.engine.checkpoint import save_checkpoint
    from medssl.models import build_model
    from medssl.pipeline.experiment import load_experiment, run_experiment

    model = build_model("unet", in_channels=1, n_classes=4, features=8)
    ckpt = tmp_path / "pre.pt"
    save_checkpoint(ckpt, model={k: v for k, v in model.state_dict().items() if k.startswith("encoder.")},
                    meta={"kind": "pretrain", "model": {"backbone": "unet", "features": 8, "options": {}}})
    spec = {"base": "demo", "data": str(phantom_root), "output_dir": str(tmp_path / "exp"),
            "methods": ["random", {"name": "pre", "method": "simclr", "init": str(ckpt)}], "budgets": [2],
            "seeds": [1], "finetune": [*TINY, f"data.cache_dir={tmp_path / 'c'}"], "selection": ["facility@pre"]}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(spec))
    rows = run_experiment(load_experiment(path), progress_print=lambda _: None)
    assert [(r["method"], r["selection"]) for r in rows] == [("random", "facility@pre"), ("pre", "facility@pre")]
    cells = tmp_path / "exp" / "cells"
    labelled = [json.loads((cells / f"{m}+facility@pre-f0-m2-s1" / "splits.json").read_text())["patients"]["labelled"]
                for m in ("random", "pre")]
    assert labelled[0] == labelled[1] and len(labelled[0]) == 2
    assert {p.name for p in (tmp_path / "exp" / "advise").iterdir()} == {
        "pre-f0.npz", "random+facility@pre-f0-m2-s1.csv", "pre+facility@pre-f0-m2-s1.csv"}  # one embedding
    with open(tmp_path / "exp" / "advise" / "pre+facility@pre-f0-m2-s1.csv") as fh:
        assert sorted(r["patient"] for r in csv.DictReader(fh) if int(r["rank"]) <= 2) == labelled[0]


def test_advised_cell_passes_split_labelled_and_resumes_with_it(phantom_root, tmp_path, monkeypatch):
    """A new advised cell is fine-tuned with ``split.labelled`` and no file in its run folder beforehand; a killed
    cell resumes with the patients of its own ``splits.json`` without being advised again (also when its
    ``config.yaml`` has no list, as the cells of earlier releases, whose split was written before training)."""
    import medssl.engine.finetune as ft
    import medssl.pipeline.cells as cells_mod
    from medssl.pipeline.experiment import load_experiment, run_experiment

    spec = {"base": "demo", "data": str(phantom_root), "output_dir": str(tmp_path / "exp"), "methods": ["random"],
            "budgets": [2], "seeds": [0], "folds": [0], "finetune": [*TINY, f"data.cache_dir={tmp_path / 'c'}"],
            "selection": ["kcenter"]}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(spec))
    real, calls = ft.finetune, []

    def spy(cfg, resume=False, progress=True):
        calls.append((resume, list(cfg.split.labelled), (Path(cfg.output_dir) / cfg.name).exists()))
        return real(cfg, resume=resume, progress=progress)

    monkeypatch.setattr(ft, "finetune", spy)
    run_experiment(load_experiment(path), progress_print=lambda _: None)
    ((resume, labelled, existed),) = calls
    assert not resume and not existed and len(labelled) == 2  # the key, and nothing written before fine-tuning
    cell = tmp_path / "exp" / "cells" / "random+kcenter-f0-m2-s0"
    saved = json.loads((cell / "splits.json").read_text())
    assert saved["labelled"] == saved["patients"]["labelled"] == sorted(labelled)
    assert saved["budget_mode"] == "explicit" and saved["budget_m"] == 2
    assert yaml.safe_load((cell / "config.yaml").read_text())["split"]["labelled"] == labelled
    seeded = split_of(tmp_path, phantom_root)
    assert (saved["test"], saved["val"]) == (seeded.test, seeded.val)
    monkeypatch.setattr(cells_mod, "advised_cases", lambda *a, **k: pytest.fail("a started cell was advised again"))
    for old_layout in (False, True):  # killed before its first checkpoint
        for name in ("train_state.json", "metrics.json"):
            (cell / name).unlink()
        shutil.rmtree(cell / "checkpoints")
        if old_layout:
            cfg = yaml.safe_load((cell / "config.yaml").read_text())
            cfg["split"]["labelled"] = []
            (cell / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        calls.clear()
        (row,) = run_experiment(load_experiment(path), progress_print=lambda _: None)
        assert calls == [(True, [], True)] and row["selection"] == "kcenter"
        assert (cell / "train_state.json").is_file()
        assert json.loads((cell / "splits.json").read_text()) == saved
