"""Helpers shared by the advise tests: tiny training overrides, the advise command and a split on the phantom."""

from __future__ import annotations

from pathlib import Path

TINY = ["data.size=32", "model.features=8", "train.batch_size=8", "train.amp=off", "train.threads=1",
        "split.n_folds=4", "split.val=1", "train.epochs=1", "train.steps_per_epoch=2", "pretrain.proj_dim=16"]
ROOT = Path(__file__).resolve().parents[2]


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


def split_cache(tmp_path, phantom_root):
    from medssl.config import load_config
    from medssl.data.cache import prepare

    return prepare(load_config("demo", overrides=[f"data.path={phantom_root}", "data.size=32",
                                                  f"data.cache_dir={tmp_path / 'c'}"]).data, progress=False)
