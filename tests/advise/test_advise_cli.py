"""`medssl advise` on the phantom: outputs, a pretrained encoder, bad input; the key-slice rule and its benchmark."""

from __future__ import annotations

import csv
import importlib.util
import json
import shlex

import numpy as np
import pytest
import yaml

from medssl.errors import ConfigError
from tests.advise.common import ROOT, advise, split_cache, split_of


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
    fac = summary["facility@pcl"]
    assert fac["fold_deltas"] == "+0.150 +0.050" and summary["seeded"]["ci_low"] is None
    half = 12.7062 * np.std([0.15, 0.05], ddof=1) / np.sqrt(2)  # t(0.975, 1 df) over the 2 fold means
    assert (fac["ci_low"], fac["ci_high"]) == pytest.approx((0.1 - half, 0.1 + half), abs=1e-4)
    assert "| random | facility@pcl | 1 | 2 | 6 |" in bench.patients_table(list(summary.values()))
    bench.patients_plot(fake, tmp_path / "b" / "patients.png")
    assert (tmp_path / "b" / "patients.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
