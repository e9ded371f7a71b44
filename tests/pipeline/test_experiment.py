"""`medssl experiment`: a tiny grid runs, caches pretraining per fold, resumes, and tabulates."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import yaml

from medssl.config import load_config
from medssl.errors import ConfigError
from medssl.pipeline.experiment import load_experiment, run_experiment
from medssl.report.console import GridProgress
from medssl.report.tables import paired_test, results_table

TINY = ["data.size=32", "model.features=8", "train.batch_size=8", "train.amp=off", "train.threads=1",
        "split.n_folds=4", "split.val=1", "train.epochs=1", "train.steps_per_epoch=2", "pretrain.proj_dim=16"]


def _console(buf: io.StringIO, **kw):
    from rich.console import Console

    return Console(file=buf, width=60, **kw)  # narrower than the lines: they must not wrap


def test_tiny_grid_runs_and_resumes(phantom_root, tmp_path, monkeypatch):
    spec = {"base": "demo", "data": str(phantom_root), "output_dir": str(tmp_path / "exp"),
            "methods": ["random", "simclr"], "budgets": [1, 2], "seeds": [0, 1], "folds": [0],
            "pretrain": [*TINY, f"data.cache_dir={tmp_path / 'c'}"],
            "finetune": [*TINY, f"data.cache_dir={tmp_path / 'c'}"], "legacy_metrics": True}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(spec))
    log = io.StringIO()
    rows = run_experiment(load_experiment(path), progress_print=lambda _: None, console=_console(log))
    assert len(rows) == 2 * 2 * 2
    out = tmp_path / "exp"
    assert len(list((out / "pretrain").iterdir())) == 1  # one pretraining per (method, fold)
    # progress: one line per step of each cell, "cell i of N: <cell> (<what>) | elapsed | time left"
    lines = log.getvalue().splitlines()
    assert all(line.startswith("cell ") and " | elapsed 0:" in line for line in lines), lines
    assert lines[0].startswith("cell 1 of 8: random fold 0 M=1 seed 0 (fine-tuning) | elapsed 0:00:0")
    assert lines[0].endswith("time left unknown until a cell finishes")
    assert "cell 1 of 8: random fold 0 M=1 seed 0 (evaluating)" in lines[1]
    assert lines[-1].startswith("cell 8 of 8: simclr fold 0 M=2 seed 1 (evaluating)") and "left" in lines[-1]
    assert any(line.startswith("cell 5 of 8: simclr fold 0 M=1 seed 0 (pretraining simclr)") for line in lines)
    assert sum("(fine-tuning)" in line for line in lines) == 8 and " about 0:" in lines[-1]
    # report.html beside results.md: the tables, the plot and overlays of the (first) test cases of each method
    page = (out / "report.html").read_text()
    overlays = json.loads((out / "cells" / "simclr-f0-m1-s0" / "overlays" / "overlays.json").read_text())
    test_cases = sorted(json.loads((out / "cells" / "simclr-f0-m1-s0" / "splits.json").read_text())["test"])
    assert [c["case"] for c in overlays["cases"]] == test_cases[:3] and overlays["M"] == 1
    assert page.count("<table>") == 2 and page.count("<img") == 1 + 2 * len(overlays["cases"])
    assert "simclr (fold 0, M=1, seed 0)" in page and "random (fold 0, M=1, seed 0)" in page
    with open(out / "results.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 8
    table = (out / "results.md").read_text()
    assert "| simclr |" in table and "Wilcoxon" in table and (out / "dice_vs_m.png").stat().st_size > 1000
    init = yaml.safe_load((out / "cells" / "simclr-f0-m1-s0" / "config.yaml").read_text())["train"]["init"]
    assert init.endswith("pretrain/simclr-f0/checkpoints/last.pt")
    # a finished experiment resumes instantly with the same numbers
    mtime = (out / "cells" / "random-f0-m2-s1" / "metrics.json").stat().st_mtime_ns
    log = io.StringIO()
    again = run_experiment(load_experiment(path), progress_print=lambda _: None, console=_console(log))
    assert again == rows and log.getvalue() == ""  # nothing to do, nothing said
    assert (out / "cells" / "random-f0-m2-s1" / "metrics.json").stat().st_mtime_ns == mtime
    # the run folders are gone (a new checkout has only the committed CSV): nothing is trained again
    import shutil

    shutil.rmtree(out / "cells")
    shutil.rmtree(out / "pretrain")
    said = []
    spec["seeds"] = [0, 1, 2]  # one new seed: only its cells train, the pretraining runs again for them
    path.write_text(yaml.safe_dump(spec))
    log = io.StringIO()
    grown = run_experiment(load_experiment(path), progress_print=said.append, console=_console(log))
    assert len(grown) == 12
    lines = log.getvalue().splitlines()  # the 8 rows taken from the CSV count as done: only the seed-2 cells run
    assert lines[0].startswith("cell 3 of 12: random fold 0 M=1 seed 2 (fine-tuning)")
    assert {line.split(":")[0] for line in lines} == {"cell 3 of 12", "cell 6 of 12", "cell 9 of 12", "cell 12 of 12"}
    assert {(r["method"], r["seed"]) for r in grown} >= {("simclr", 2), ("random", 2)}
    assert sorted(p.name for p in (out / "cells").iterdir()) == sorted(
        f"{m}-f0-m{b}-s2" for m in ("random", "simclr") for b in (1, 2))
    assert any("taken from the earlier results.csv" in str(s) for s in said)
    for old_row in rows:
        new_row = next(r for r in grown if (r["method"], r["budget"], r["seed"]) ==
                       (old_row["method"], old_row["budget"], old_row["seed"]))
        assert new_row["dice_mean"] == pytest.approx(old_row["dice_mean"])
    # a smaller grid (one seed) adds to the table without losing the other rows
    spec["seeds"] = [2]
    path.write_text(yaml.safe_dump(spec))
    said.clear()
    smaller = run_experiment(load_experiment(path), progress_print=said.append)
    assert len(smaller) == 12 and any("outside this grid kept" in str(s) for s in said)
    # a grid killed in its second cell: results.csv holds the new row and every earlier one, also those of cells
    # outside the grid and those the killed run had not reached yet
    import medssl.pipeline.experiment as grid

    calls, real_cell = [], grid.run_cell

    def dying_cell(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_cell(*a, **kw)

    monkeypatch.setattr(grid, "run_cell", dying_cell)
    spec["seeds"] = [3, 0]  # seed-3 cells run first; the seed-0 cells (reused) come after them
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(KeyboardInterrupt):
        run_experiment(load_experiment(path), progress_print=lambda _: None)
    with open(out / "results.csv") as fh:
        left = {(r["method"], r["budget"], r["seed"]) for r in csv.DictReader(fh)}
    assert left == {(r["method"], str(r["budget"]), str(r["seed"])) for r in grown} | {("random", "1", "3")}
    monkeypatch.setattr(grid, "run_cell", real_cell)
    # a changed protocol is not mixed with the old rows
    spec["finetune"] = [*spec["finetune"], "train.lr=0.01"]
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="different finetune"):
        run_experiment(load_experiment(path), progress_print=lambda _: None)


def test_grid_progress_time_left():
    """The time left is the mean time of the cells done in this run (reused and read-back cells not timed)."""
    t = [0.0]
    log = io.StringIO()
    with GridProgress(4, done=1, console=_console(log), clock=lambda: t[0]) as progress:
        progress.start(2, "pcl fold 0 M=1 seed 0")
        progress.step("pretraining pcl")
        t[0] += 100
        progress.step("fine-tuning")
        t[0] += 20
        progress.finish()
        progress.start(3, "pcl fold 0 M=1 seed 1")  # complete in its run folder: done, not timed
        progress.finish()
        progress.start(4, "pcl [kcenter] fold 0 M=2 seed 0")
        progress.step("evaluating")
    assert log.getvalue().splitlines() == [
        "cell 2 of 4: pcl fold 0 M=1 seed 0 (pretraining pcl) | elapsed 0:00:00 | time left unknown until a cell "
        "finishes",
        "cell 2 of 4: pcl fold 0 M=1 seed 0 (fine-tuning) | elapsed 0:01:40 | time left unknown until a cell finishes",
        "cell 4 of 4: pcl [kcenter] fold 0 M=2 seed 0 (evaluating) | elapsed 0:02:00 | about 0:02:00 left"]
    tty = io.StringIO()  # on a terminal: a rich progress bar, and the same lines above it
    from rich.console import Console

    with GridProgress(2, console=Console(file=tty, width=160, force_terminal=True), clock=lambda: t[0]) as progress:
        progress.start(1, "random fold 0 M=1 seed 0")
        progress.step("fine-tuning")
        progress.finish()
    assert "cell 1 of 2: random fold 0 M=1 seed 0 (fine-tuning)" in tty.getvalue() and "1/2" in tty.getvalue()


def test_paired_test_and_table():
    rows = [{"method": m, "fold": 0, "seed": s, "M": 1, "dice_mean": v}
            for m, vals in (("random", [0.5, 0.6, 0.7]), ("pcl", [0.6, 0.7, 0.9])) for s, v in enumerate(vals)]
    d, p, n = paired_test(rows, "pcl", 1)
    assert n == 3 and d == pytest.approx(0.1333333, abs=1e-6) and p == pytest.approx(0.25)
    table = results_table(rows)
    assert "0.600 ± 0.100" in table and "Δ +0.133" in table


def test_table_compares_rows_with_their_own_control():
    """``controls: {kaf-random: unet-c2}``: KAF-random is judged against the same network without KAF layers, not
    only against the reference row; the Δ is kaf-random minus unet-c2 over the shared (fold, seed) pairs."""
    vals = {"random": [0.5, 0.6, 0.7], "unet-c2": [0.55, 0.62, 0.66], "kaf-random": [0.50, 0.66, 0.70]}
    rows = [{"method": m, "fold": 0, "seed": s, "M": 2, "dice_mean": v} for m, vs in vals.items()
            for s, v in enumerate(vs)]
    table = results_table(rows, controls={"kaf-random": "unet-c2", "missing": "random"})
    own = table.split("own control")[1]
    assert "| kaf-random − unet-c2 | Δ +0.010" in own and "(n=3)" in own and "missing" not in own
    assert "| kaf-random | Δ +0.020" in table.split("own control")[0]  # against the reference as before
    assert "own control" not in results_table(rows)


def test_bad_experiment_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"methods": ["random", "nope"]}))
    with pytest.raises(ConfigError, match="unknown method"):
        load_experiment(bad)
    bad.write_text(yaml.safe_dump({"methodz": ["random"]}))
    with pytest.raises(ConfigError, match="methodz"):
        load_experiment(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_experiment(tmp_path / "missing.yaml")
    bad.write_text(yaml.safe_dump({"methods": ["random", "pcl"], "controls": {"pcl": "unet-c2"}}))
    with pytest.raises(ConfigError, match=f"{bad}: controls: 'pcl: unet-c2' must name two different rows"):
        load_experiment(bad)


def test_method_entries_with_overrides_init_and_presets(phantom_root, tmp_path):
    from medssl.pipeline.experiment import method_entries

    ckpt = tmp_path / "pre-f0.pt"
    spec = {"base": "demo", "data": str(phantom_root), "output_dir": str(tmp_path / "exp"),
            "methods": ["random", {"name": "random-lr", "method": "random", "finetune": ["train.lr=0.01"]},
                        {"name": "reuse", "method": "simclr", "init": str(tmp_path / "pre-f{fold}.pt")}],
            "budgets": [1], "seeds": [0], "finetune": [*TINY, f"data.cache_dir={tmp_path / 'c'}"]}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(spec))
    exp = load_experiment(path)
    assert [e.name for e in method_entries(exp)] == ["random", "random-lr", "reuse"]
    with pytest.raises(ConfigError, match="checkpoint not found"):  # init reuse needs the file
        run_experiment(exp, progress_print=lambda _: None)
    spec["methods"] = spec["methods"][:2]
    path.write_text(yaml.safe_dump(spec))
    run_experiment(load_experiment(path), progress_print=lambda _: None)
    cells = tmp_path / "exp" / "cells"
    assert yaml.safe_load((cells / "random-lr-f0-m1-s0" / "config.yaml").read_text())["train"]["lr"] == 0.01
    assert yaml.safe_load((cells / "random-f0-m1-s0" / "config.yaml").read_text())["train"]["lr"] != 0.01
    # duplicate names, unknown methods inside mappings and unknown entry keys are rejected
    for methods, needle in ((["random", {"name": "random"}], "unique"),
                            ([{"name": "x", "method": "nope"}], "unknown method"),
                            ([{"name": "x", "methd": "pcl"}], "methd")):
        path.write_text(yaml.safe_dump({**spec, "methods": methods}))
        with pytest.raises(ConfigError, match=needle):
            load_experiment(path)
    for name, n in (("hippocampus_cpu", 9), ("hippocampus_paper", 7)):  # the packaged experiments load
        assert len(method_entries(load_experiment(name))) == n
    kaf = {e.name: e for e in method_entries(load_experiment("hippocampus_cpu"))}["kaf-random"]
    assert kaf.method == "random" and kaf.base == "kaf_hippocampus"
    with pytest.raises(ConfigError, match="packaged experiments"):
        load_experiment("no_such_experiment")


def test_entry_base_and_sam_rows(phantom_root, tmp_path, monkeypatch):
    """A method entry with its own base preset; "+SAM" rows from the refinement post-step (box double)."""
    import medssl.sam.segmenter as segmod
    from tests.sam.test_sam_refine import BoxSegmenter

    monkeypatch.setattr(segmod, "build_segmenter", lambda *a, **k: BoxSegmenter())
    cache = f"data.cache_dir={tmp_path / 'c'}"
    spec = {"base": "demo", "data": str(phantom_root), "output_dir": str(tmp_path / "exp"),
            "methods": ["random", {"name": "sgd", "method": "random", "base": "ct",
                                   "finetune": ["train.optimizer=sgd", "train.momentum=0.5"]}],
            "budgets": [1], "seeds": [0, 1], "finetune": [*TINY, cache],
            "sam_methods": ["random"], "sam_cases": 1, "sam": {"box_mode": "per_component"}}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(spec))
    rows = run_experiment(load_experiment(path), progress_print=lambda _: None)
    assert [r["method"] for r in rows] == ["random", "random", "sgd", "sgd"]
    cell = yaml.safe_load((tmp_path / "exp" / "cells" / "sgd-f0-m1-s0" / "config.yaml").read_text())
    assert cell["name"] == "sgd-f0-m1-s0" and cell["train"]["optimizer"] == "sgd" and cell["train"]["momentum"] == 0.5
    assert cell["data"]["fit"] == "resize" and load_config("demo").data.fit == "pad"  # its own base preset
    with open(tmp_path / "exp" / "results_sam.csv") as fh:
        sam = list(csv.DictReader(fh))
    assert [r["method"] for r in sam] == ["random", "random+SAM"] * 2
    assert all(r["n_test"] == "1" for r in sam) and any(k.startswith("dice_") and k != "dice_mean" for k in sam[0])
    table = (tmp_path / "exp" / "results_sam.md").read_text()
    assert "| random+SAM |" in table and "random: gain" in table and "Per class" in table
    for bad, needle in (({"sam_methods": ["nope"]}, "sam_methods"), ({"sam": {"merg": "union"}}, "merg"),
                        ({"sam": {"merge": "xor"}}, "merge")):
        path.write_text(yaml.safe_dump({**spec, "sam_methods": ["random"], **bad}))
        with pytest.raises(ConfigError, match=needle):
            load_experiment(path)


def test_sam_auto_rows(phantom_root, tmp_path, monkeypatch):
    """`sam: {policy: auto}`: the refined row is "+SAM (auto)", records the per-class choices, and the table shows
    coarse and refined side by side with paired differences and the choices."""
    import json

    import medssl.sam.segmenter as segmod
    from tests.sam.test_sam_refine import BoxSegmenter

    monkeypatch.setattr(segmod, "build_segmenter", lambda *a, **k: BoxSegmenter())
    spec = {"base": "demo", "data": str(phantom_root), "output_dir": str(tmp_path / "exp"), "methods": ["random"],
            "budgets": [1], "seeds": [0, 1], "finetune": [*TINY, f"data.cache_dir={tmp_path / 'c'}"],
            "sam_methods": ["random"], "sam_cases": 1, "sam": {"policy": "auto", "candidates": ["union", "gate0.8"]}}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(spec))
    run_experiment(load_experiment(path), progress_print=lambda _: None)
    with open(tmp_path / "exp" / "results_sam.csv") as fh:
        sam = list(csv.DictReader(fh))
    assert [r["method"] for r in sam] == ["random", "random+SAM (auto)"] * 2
    choices = [k for k in sam[1] if k.startswith("choice_")]
    assert choices and all(sam[1][k] in ("keep", "union", "gate0.8") for k in choices)
    assert all(f"val_keep_{k[7:]}" in sam[1] for k in choices) and sam[1]["n_val"] == "1"
    cell = tmp_path / "exp" / "cells" / "random-f0-m1-s0"
    saved = json.loads((cell / "metrics_sam.json").read_text())
    val = json.loads((cell / "splits.json").read_text())["val"]
    assert saved["policy"]["validation_cases"] == sorted(val) and not set(val) & set(saved["cases"])
    table = (tmp_path / "exp" / "results_sam.md").read_text()
    assert "| random+SAM (auto) |" in table and "random: gain" in table and "(n=2, worse" in table
    assert "Policy chosen per class" in table and "(Δ " in table
    path.write_text(yaml.safe_dump({**spec, "sam": {"policy": "sometimes"}}))
    with pytest.raises(ConfigError, match="policy"):
        load_experiment(path)


def test_sgd_optimizer():
    import torch

    from medssl.config import TrainConfig
    from medssl.engine.trainer import build_optimizer

    opt = build_optimizer(TrainConfig(optimizer="sgd", lr=0.002, momentum=0.9, weight_decay=1e-5),
                          [torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9 and opt.defaults["lr"] == 0.002
    with pytest.raises(ConfigError, match="train.optimizer"):
        load_config("demo", overrides=["train.optimizer=lamb"])


def test_select_chooses_on_validation_for_every_row(phantom_root, tmp_path):
    """`select:` trains each combination per cell, keeps the best validation Dice, tests only that one."""
    import json

    from medssl.pipeline.experiment import select_options

    assert select_options({}) == [[]]
    assert select_options({"train.lr": [0.1, 0.01], "train.encoder_frozen_steps": [0, 2]})[1] == [
        "train.lr=0.1", "train.encoder_frozen_steps=2"]
    spec = {"base": "demo", "data": str(phantom_root), "output_dir": str(tmp_path / "exp"),
            "methods": ["random"], "budgets": [1], "seeds": [0], "folds": [0],
            "finetune": [*TINY, f"data.cache_dir={tmp_path / 'c'}"],
            "select": {"train.encoder_lr_scale": [1.0, 0.0]}}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(spec))
    (row,) = run_experiment(load_experiment(path), progress_print=lambda _: None)
    cells = tmp_path / "exp" / "cells"
    scores = [json.loads((cells / f"random-f0-m1-s0-o{i}" / "train_state.json").read_text())["best_score"]
              for i in (0, 1)]
    best = max(range(2), key=lambda i: (scores[i], -i))
    assert row["val_dice"] == pytest.approx(scores[best], abs=1e-6)
    assert row["choice"] == f"train.encoder_lr_scale={[1.0, 0.0][best]}"
    assert (cells / f"random-f0-m1-s0-o{best}" / "metrics.json").is_file()  # test Dice of the chosen run only
    assert not (cells / f"random-f0-m1-s0-o{1 - best}" / "metrics.json").is_file()
    spec["select"] = {"train.lr": []}
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="select.train.lr"):
        run_experiment(load_experiment(path), progress_print=lambda _: None)


def test_bootstrap_ci_in_table_and_plot(tmp_path):
    from medssl.report.tables import bootstrap_ci, paired_diffs, save_plot

    rows = [{"method": m, "fold": f, "seed": s, "M": 1, "dice_mean": 0.5 + 0.01 * (3 * f + s) + gain + 0.01 * (s == 1)}
            for m, gain in (("random", 0.0), ("pcl", 0.03)) for f in range(3) for s in range(3)]
    diff = paired_diffs(rows, "pcl", 1)
    assert len(diff) == 9
    lo, hi = bootstrap_ci(diff)
    assert lo <= diff.mean() <= hi and lo > 0  # a gain in every pair: the CI excludes 0
    assert bootstrap_ci(diff[:2]) is None and bootstrap_ci(np.zeros(4)) == (0.0, 0.0)
    table = results_table(rows)
    assert f"Δ +0.030 [{lo:+.3f}, {hi:+.3f}], p=0.00 (n=9)" in table
    out = save_plot(rows, tmp_path / "plot.png")
    assert out.stat().st_size > 1000
