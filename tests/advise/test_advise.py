"""`medssl advise`: strategies on synthetic embeddings, the command on the phantom, bad input, the key-slice
rule, and the `selection:` axis of `medssl experiment` on a tiny grid."""

from __future__ import annotations

import csv
import importlib.util
import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from medssl.advise.strategies import STRATEGIES, distances, rank_patients
from medssl.errors import ConfigError

TINY = ["data.size=32", "model.features=8", "train.batch_size=8", "train.amp=off", "train.threads=1",
        "split.n_folds=4", "split.val=1", "train.epochs=1", "train.steps_per_epoch=2", "pretrain.proj_dim=16"]
ROOT = Path(__file__).resolve().parents[2]


def blobs(sizes, sep=50.0, dim=4, seed=0):
    """Well-separated Gaussian clusters: (points, true cluster of each point)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), dim)) * sep
    x = np.concatenate([c + rng.normal(size=(n, dim)) for c, n in zip(centres, sizes)])
    return x, np.repeat(np.arange(len(sizes)), sizes)


def covering_radius(x, chosen):
    """Largest distance of any point to its nearest chosen point (what k-center minimises)."""
    return float(distances(x)[:, chosen].min(axis=1).max())


# ------------------------------------------------------------------------------------------ strategies
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategies_rank_distinct_patients_deterministically(strategy):
    x, _ = blobs([6, 9, 5, 10])
    for m in (1, 3, 7):
        r = rank_patients(x, m, strategy, seed=3)
        assert sorted(r.order.tolist()) == list(range(len(x)))  # a ranking of every candidate, each once
        assert len(set(r.chosen(m))) == m
        assert set(r.cluster.tolist()) <= set(range(m)) and len(r.score) == len(x)
        again = rank_patients(x, m, strategy, seed=3)
        assert again.order.tolist() == r.order.tolist() and again.cluster.tolist() == r.cluster.tolist()
    if strategy == "random":
        assert rank_patients(x, 3, "random", seed=4).order.tolist() != rank_patients(x, 3, "random", 3).order.tolist()
    with pytest.raises(ConfigError, match="--budget"):
        rank_patients(x, len(x) + 1, strategy)


def test_kcenter_covers_separated_clusters_better_than_random():
    x, truth = blobs([10, 10, 10, 10, 10])
    chosen = rank_patients(x, 5, "kcenter").chosen(5)
    assert sorted(truth[chosen].tolist()) == [0, 1, 2, 3, 4]  # one patient in every cluster
    radius = covering_radius(x, chosen)
    randoms = [covering_radius(x, rank_patients(x, 5, "random", seed=s).chosen(5)) for s in range(20)]
    assert radius < min(randoms) or radius < 0.2 * np.mean(randoms)
    assert radius < 10.0  # within a cluster's own scale, while clusters lie ~50 apart


def test_typical_picks_the_densest_patient_of_each_cluster():
    x, truth = blobs([12, 8, 15, 6], seed=1)
    x[3] += 25.0  # an outlier: never the most typical patient of its cluster
    r = rank_patients(x, 4, "typical", seed=0)
    chosen = r.chosen(4)
    assert sorted(truth[chosen].tolist()) == [0, 1, 2, 3] and 3 not in chosen
    assert [truth[i] for i in chosen] == [2, 0, 1, 3]  # clusters by size, the largest first
    for rank, i in enumerate(chosen):
        members = np.flatnonzero(r.cluster == rank)
        assert set(members.tolist()) == set(np.flatnonzero(truth == truth[i]).tolist())
        assert r.score[i] == pytest.approx(r.score[members].max())


def test_facility_starts_at_the_medoid_and_is_nested():
    x, truth = blobs([10, 25, 5], seed=2)
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    r = rank_patients(x, 3, "facility")
    assert r.chosen(1) == [int(np.argmin(d.sum(1)))]
    assert sorted(truth[r.chosen(3)].tolist()) == [0, 1, 2]
    assert rank_patients(x, 2, "facility").chosen(2) == r.chosen(2)


# ------------------------------------------------------------------------------------------ the command
def advise(tmp_path, phantom_root, *extra, out="adv"):
    from medssl.cli import main

    return main(["advise", "--config", "demo", "--data", str(phantom_root), "-o", str(tmp_path / out), *extra,
                 "data.size=32", "split.n_folds=4", "split.val=1", f"data.cache_dir={tmp_path / 'c'}"])


def split_of(tmp_path, phantom_root):
    from medssl.config import load_config
    from medssl.data.cache import prepare
    from medssl.engine.finetune import build_split

    cfg = load_config("demo", overrides=[f"data.path={phantom_root}", "data.size=32", "split.n_folds=4",
                                         "split.val=1", f"data.cache_dir={tmp_path / 'c'}", "split.budget=all"])
    return build_split(cfg, prepare(cfg.data, progress=False))


@pytest.mark.parametrize("strategy", ["kcenter", "typical"])
def test_advise_writes_csv_map_and_json(phantom_root, tmp_path, strategy, capsys):
    assert advise(tmp_path, phantom_root, "--budget", "2", "--strategy", strategy, "--seed", "1") == 0
    out = tmp_path / "adv"
    with open(out / "advice.csv") as fh:
        rows = list(csv.DictReader(fh))
    split = split_of(tmp_path, phantom_root)
    train = set(split.patients["labelled"])  # budget=all: every training patient
    assert list(rows[0]) == ["patient", "rank", "score", "cluster"]
    assert {r["patient"] for r in rows} == train and [int(r["rank"]) for r in rows] == list(range(1, len(train) + 1))
    assert not train & (set(split.patients["test"]) | set(split.patients["val"]))
    info = json.loads((out / "advice.json").read_text())
    assert info["chosen"] == [r["patient"] for r in rows[:2]] and info["strategy"] == strategy
    assert (out / "embedding.png").read_bytes()[:4] == b"\x89PNG" and (out / "embedding.png").stat().st_size > 5000
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left
    said = capsys.readouterr().out
    assert "label " + ", ".join(info["chosen"]) in said
    assert info["label_cases"] == [c for p in info["chosen"] for c in info["cases"][p]] and not info["without_label"]
    # the printed finetune command labels exactly the advised patients (read back as the CLI reads it)
    (line,) = [ln.strip() for ln in said.splitlines() if ln.strip().startswith("medssl finetune ")]
    args = shlex.split(line)
    assert args[:6] == ["medssl", "finetune", "--config", "demo", "--data", str(phantom_root)]
    assert "split.budget=2" in args and f"data.cache_dir={tmp_path / 'c'}" in args and "split.val=1" in args
    from medssl.config import load_config
    from medssl.data.cache import prepare
    from medssl.engine.finetune import build_split

    cfg = load_config("demo", overrides=[f"data.path={phantom_root}", *args[6:]])
    assert cfg.split.labelled == info["label_cases"]
    advised = build_split(cfg, prepare(cfg.data, progress=False))
    assert advised.patients["labelled"] == sorted(info["chosen"]) and advised.budget_mode == "explicit"
    assert (advised.test, advised.val) == (split.test, split.val)


def test_advise_with_a_pretrained_encoder(phantom_root, tmp_path):
    from medssl.engine.checkpoint import save_checkpoint
    from medssl.models import build_model

    model = build_model("unet", in_channels=1, n_classes=4, features=8)
    ckpt = tmp_path / "last.pt"
    save_checkpoint(ckpt, model={k: v for k, v in model.state_dict().items() if k.startswith("encoder.")},
                    meta={"kind": "pretrain", "model": {"backbone": "unet", "features": 8, "options": {}},
                          "data": {"size": 64}})
    assert advise(tmp_path, phantom_root, "--budget", "3", "--strategy", "facility", "--init", str(ckpt)) == 0
    info = json.loads((tmp_path / "adv" / "advice.json").read_text())
    assert info["features"].startswith("encoder of") and info["feature_dims"] == 2 * 16 * 8
    assert len(info["chosen"]) == 3 and any("data.size=64" in w for w in info["warnings"])


@pytest.mark.parametrize("args, needle", [
    (["--budget", "99"], "--budget: M=99 exceeds the 5 training patients"),
    (["--budget", "0"], "--budget"),
    (["--budget", "2", "--strategy", "nope"], "'--strategy': 'nope' is not one of 'random', 'kcenter'"),
    (["--budget", "2", "--init", "/no/such/last.pt"], "/no/such/last.pt"),
])
def test_advise_bad_input_errors_cleanly(phantom_root, tmp_path, capsys, args, needle):
    rc = advise(tmp_path, phantom_root, *args)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc != 0 and len(err) == 1 and err[0].startswith("medssl: error: ") and needle in err[0], err
    assert not (tmp_path / "adv").exists() and not (tmp_path / "c").exists()  # no output, not even a cache


def test_advise_rejects_a_checkpoint_of_another_width(phantom_root, tmp_path, capsys):
    import torch

    from medssl.engine.checkpoint import save_checkpoint

    bad = tmp_path / "bad.pt"
    save_checkpoint(bad, model={"encoder.blocks.0.0.0.weight": torch.zeros(3)},
                    meta={"model": {"backbone": "unet", "features": 8}})
    assert advise(tmp_path, phantom_root, "--budget", "1", "--init", str(bad)) != 0
    assert "bad.pt" in capsys.readouterr().err and not (tmp_path / "adv").exists() and not (tmp_path / "c").exists()


def test_with_labelled_keeps_test_and_validation(phantom_root, tmp_path):
    from medssl.data.splits import with_labelled

    split = split_of(tmp_path, phantom_root)
    groups = {c: c for c in split.labelled + split.unlabelled + split.val + split.test}
    train = split.patients["labelled"]
    new = with_labelled(split, train[-2:], groups)
    assert new.labelled == sorted(train[-2:]) and new.unlabelled == sorted(train[:-2])
    assert (new.test, new.val, new.budget_m, new.budget_mode) == (split.test, split.val, 2, "explicit")
    for bad in ([split.test[0]], [split.val[0]], [], [train[0], train[0]]):
        with pytest.raises(ConfigError, match="labelled patients"):
            with_labelled(split, bad, groups)


# ------------------------------------------------------------------------------------------ key slice
def test_advise_slice_rules(phantom_root, tmp_path):
    from medssl.advise.slices import advise_case_slice, advise_slice

    # 5 empty slices at each end (alike), 10 slices of a structure that changes through the volume
    feats = np.concatenate([np.zeros((5, 2)), np.stack([2.0 * np.arange(10), np.full(10, 3.0)], 1), np.zeros((5, 2))])
    assert advise_slice(feats, "appearance") in list(range(5)) + list(range(15, 20))  # an empty end slice
    assert 5 <= advise_slice(feats) <= 14 and advise_slice(feats, "centre") == 10  # medoid: on the structure
    assert advise_slice(np.ones((5, 3))) == 2  # all alike: the step term decides
    with pytest.raises(ConfigError, match="key slice rule"):
        advise_slice(feats, "largest")
    cache = split_cache(tmp_path, phantom_root)
    case = sorted(cache.meta["cases"])[0]
    k = advise_case_slice(cache, case)
    labels = np.asarray(cache.case_volume(case)[1])
    assert 0 <= k < len(labels) and labels[k].any()  # a slice with anatomy to annotate


def load_benchmark():
    spec = importlib.util.spec_from_file_location("advise_bench", ROOT / "benchmarks" / "advise_hippocampus.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_slice_benchmark_runs_on_the_phantom(phantom_root, tmp_path):
    bench = load_benchmark()
    rows = bench.run_slices(bench.parse(["--part", "slices", "--data", str(phantom_root), "--base", "demo",
                                         "--out", str(tmp_path / "b"), "--volumes", "2", "--copy-k", "1,3",
                                         "--override", "data.size=32", "split.n_folds=4", "split.val=1",
                                         f"data.cache_dir={tmp_path / 'c'}"]))
    assert {r["rule"] for r in rows} == {"largest", "middle", "centre", "appearance", "medoid"}
    assert {"copy±1", "copy±3"} <= {r["method"] for r in rows} and all(0 <= r["dice"] <= 1 for r in rows)
    assert all(r["annotated"] == 1 for r in rows if r["rule"] in ("largest", "middle"))
    assert "| medoid |" in (tmp_path / "b" / "slices.md").read_text()
    spec = bench.experiment_spec(bench.parse([]))
    assert spec["selection"][0] == "seeded" and spec["methods"][1]["method"] == "pcl"
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    from medssl.pipeline.experiment import load_experiment

    assert load_experiment(tmp_path / "spec.yaml").selection == spec["selection"]  # a valid experiment
    fake = [{"method": "random", "selection": sel, "M": 1, "fold": f, "seed": s, "dice_mean": 0.5 + gain + 0.01 * s}
            for sel, gain in (("seeded", 0.0), ("facility@pcl", 0.05)) for f in (0, 1) for s in (0, 1, 2)]
    fake[0]["dice_mean"] = 0.2  # one bad seeded draw
    summary = {s["selection"]: s for s in bench.summarise(fake)}
    assert summary["seeded"]["worst"] == pytest.approx(0.2) and summary["facility@pcl"]["worst"] == pytest.approx(0.55)
    assert summary["facility@pcl"]["delta_vs_seeded"] == pytest.approx((0.35 + 5 * 0.05) / 6)  # 0.55 - 0.2 once
    assert summary["seeded"]["mean_fold_worst"] == pytest.approx((0.2 + 0.5) / 2)
    assert "| random | facility@pcl | 1 | 6 |" in bench.patients_table(list(summary.values()))


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


def split_cache(tmp_path, phantom_root):
    from medssl.config import load_config
    from medssl.data.cache import prepare

    return prepare(load_config("demo", overrides=[f"data.path={phantom_root}", "data.size=32",
                                                  f"data.cache_dir={tmp_path / 'c'}"]).data, progress=False)


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


# ------------------------------------------------------------------------------------------ split.labelled
def finetune_cli(tmp_path, phantom_root, *extra):
    from medssl.cli import main

    return main(["finetune", "--config", "demo", "--data", str(phantom_root), "--name", "lab", "--no-evaluate",
                 *TINY, f"output_dir={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'c'}", "split.budget=2",
                 *extra])


def seeded_split(tmp_path, phantom_root, *overrides):
    from medssl.config import load_config
    from medssl.data.cache import prepare
    from medssl.engine.finetune import build_split

    cfg = load_config("demo", overrides=[f"data.path={phantom_root}", "data.size=32", "split.n_folds=4",
                                         "split.val=1", f"data.cache_dir={tmp_path / 'c'}", *overrides])
    return build_split(cfg, prepare(cfg.data, progress=False))


def test_finetune_labels_exactly_split_labelled(phantom_root, tmp_path):
    train = split_of(tmp_path, phantom_root).patients["labelled"]  # budget=all: every training patient
    drawn = seeded_split(tmp_path, phantom_root, "split.budget=2").patients["labelled"]
    chosen = [p for p in train if p not in drawn][:2]  # two patients the seeded draw does not label
    assert len(chosen) == 2
    assert finetune_cli(tmp_path, phantom_root, f"split.labelled=[{chosen[1]},{chosen[0]}]") == 0
    run = tmp_path / "runs" / "lab"
    saved = json.loads((run / "splits.json").read_text())
    assert saved["labelled"] == saved["patients"]["labelled"] == sorted(chosen)
    assert saved["unlabelled"] == sorted(set(train) - set(chosen))
    assert (saved["budget_m"], saved["budget_mode"]) == (2, "explicit")
    seeded = seeded_split(tmp_path, phantom_root, "split.budget=2")
    assert (saved["test"], saved["val"]) == (seeded.test, seeded.val)
    assert yaml.safe_load((run / "config.yaml").read_text())["split"]["labelled"] == [chosen[1], chosen[0]]
    assert "labelled: 2 cases" in (run / "summary.md").read_text()


@pytest.mark.parametrize("what", ["test", "val", "unknown", "count"])
def test_finetune_rejects_a_bad_split_labelled(phantom_root, tmp_path, capsys, what):
    split = split_of(tmp_path, phantom_root)  # also builds the slice cache, so nothing else is printed
    train = split.patients["labelled"]
    given, needle = {
        "test": ([train[0], split.test[0]], f"case '{split.test[0]}' is a test case of fold 0"),
        "val": ([train[0], split.val[0]], f"case '{split.val[0]}' is a validation case of fold 0"),
        "unknown": ([train[0], "nope_case"], "unknown case 'nope_case'"),
        "count": (train[:3], "3 patient(s) listed, but split.budget=2 asks for M=2"),
    }[what]
    capsys.readouterr()
    rc = finetune_cli(tmp_path, phantom_root, f"split.labelled=[{','.join(given)}]")
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and sum(ln.startswith("medssl: error:") for ln in err) == 1, err
    assert err[-1].startswith("medssl: error: config key 'split.labelled': ") and needle in err[-1], err
    assert not (tmp_path / "runs" / "lab").exists()  # no run folder


def test_split_labelled_file_and_key_checks(phantom_root, tmp_path):
    from medssl.config import load_config

    chosen = split_of(tmp_path, phantom_root).patients["labelled"][-2:]
    files = {"list.txt": f"# advised\n{chosen[1]}\n\n{chosen[0]}\n", "list.json": json.dumps(chosen),
             "advice.json": json.dumps({"chosen": chosen[::-1], "cases": {p: [p] for p in chosen[::-1]}})}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        got = seeded_split(tmp_path, phantom_root, "split.budget=2", f"split.labelled_file={tmp_path / name}")
        assert got.labelled == got.patients["labelled"] == sorted(chosen) and got.budget_mode == "explicit", name
    (tmp_path / "ints.json").write_text("[1, 2]")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    for name, needle in (("missing.txt", "file not found"), ("ints.json", "expected a JSON list"),
                         ("empty.txt", "empty")):
        with pytest.raises(ConfigError, match=f"^config key 'split.labelled_file': .*{needle}") as info:
            seeded_split(tmp_path, phantom_root, "split.budget=2", f"split.labelled_file={tmp_path / name}")
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="'split.labelled' and 'split.labelled_file' are both set"):
        load_config("demo", overrides=["split.labelled=[a]", f"split.labelled_file={tmp_path / 'list.txt'}"])
    with pytest.raises(ConfigError, match="split.labelled"):
        load_config("demo", overrides=["split.labelled=[1,2]"])  # unquoted numbers are not case ids


def test_labelled_override_round_trips_through_the_command_line():
    from medssl.advise.run import finetune_command, labelled_override
    from medssl.typed_config import parse_overrides

    cases = ["hippocampus_001", "001", "true", "a b", "x,y", "1e5"]
    assert parse_overrides([labelled_override(cases)]) == {"split": {"labelled": cases}}
    assert labelled_override(["hippocampus_001", "la_003"]) == "split.labelled=[hippocampus_001,la_003]"
    cmd = finetune_command("plan.yaml", "/d/my data", ["train.epochs=5", "split.budget=9", "split.labelled=[x]"],
                           2, ["a", "001"])
    assert shlex.split(cmd) == ["medssl", "finetune", "--config", "plan.yaml", "--data", "/d/my data",
                                "train.epochs=5", "split.budget=2", 'split.labelled=[a,"001"]']
    assert finetune_command(None, None, [], 1, ["a"]) == "medssl finetune split.budget=1 'split.labelled=[a]'"
