"""PolyCL example selection: every drawn triplet obeys its variant's rule (docs/methods.md#example-selection)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from medssl.config import AugConfig, DataConfig, PretrainConfig, load_config
from medssl.data.augment import make_generator
from medssl.data.cache import prepare
from medssl.engine.checkpoint import load_checkpoint
from medssl.engine.pretrain import pretrain
from medssl.errors import DataError
from medssl.methods import build_method
from medssl.methods.polycl import slab_mask
from medssl.models import build_model


@pytest.fixture(scope="module")
def cache(phantom_root, tmp_path_factory):
    return prepare(DataConfig(path=str(phantom_root), size=32, cache_dir=str(tmp_path_factory.mktemp("c"))),
                   progress=False)


def _method(name, **kw):
    enc = build_model("polycl-unet", in_channels=1, n_classes=4, features=4).encoder
    return build_method(name, enc, PretrainConfig(options={"polycl": {"slab_fraction": 0.5, **kw}}), AugConfig())


def _triplets(method, cache, n_steps=20):
    rows = method.select_rows(cache, np.arange(cache.meta["n_slices"]))
    g = make_generator(0)
    out = []
    for _ in range(n_steps):
        anchors = rows[torch.randint(len(rows), (8,), generator=g).numpy()]
        pos, neg = method._draw(anchors.tolist(), g)
        out += list(zip(anchors, pos, neg))
    return rows, out


def _t(cache, r):
    return bool(cache.present[r, 3])  # target = spleen (label 3): present in some slab slices only


def test_slab_rule():
    k = np.arange(20)
    assert np.flatnonzero(slab_mask(k, np.full(20, 20), 0.3)).tolist() == [7, 8, 9, 10, 11, 12]
    assert slab_mask(np.arange(3), np.full(3, 3), 0.01).sum() == 1  # never empty


def test_polycl_s_rules(cache):
    m = _method("polycl-s")
    rows, trip = _triplets(m, cache)
    slab = set(m.slab.tolist())
    for a, p, n in trip:
        assert a in slab and p in slab and n in slab
        assert cache.case_ids[p] == cache.case_ids[a] and p != a  # positive: same scan, another slice
        assert cache.case_ids[n] != cache.case_ids[a]  # negative: another scan


def test_polycl_o_rules(cache):
    m = _method("polycl-o", target_labels=[3])
    _, trip = _triplets(m, cache)
    assert m.counts["anchors_T0"] > 0 and m.counts["anchors_T1"] > 0
    assert {cache.case_ids[p] != cache.case_ids[a] for a, p, _ in trip} == {True, False}  # any scan
    for a, p, n in trip:
        assert _t(cache, p) == _t(cache, a) and p != a
        assert _t(cache, n) != _t(cache, a)


@pytest.mark.parametrize("scope", ["same_scan", "other_scan"])
def test_polycl_m_rules(cache, scope):
    m = _method("polycl-m", m_negative_scope=scope, target_labels=[3])
    _, trip = _triplets(m, cache)
    for a, p, n in trip:
        assert cache.case_ids[p] == cache.case_ids[a] and _t(cache, p) == _t(cache, a) and p != a
        assert _t(cache, n) != _t(cache, a)
        assert (cache.case_ids[n] == cache.case_ids[a]) == (scope == "same_scan")


def test_offline_fixed_triplets_repeat(cache):
    m = _method("polycl-s", triplets="offline_fixed")
    rows = m.select_rows(cache, np.arange(cache.meta["n_slices"]))
    a = m._draw(rows[:10].tolist(), make_generator(1))
    b = m._draw(rows[:10].tolist(), make_generator(2))
    assert a == b
    online = _method("polycl-s")
    online.select_rows(cache, np.arange(cache.meta["n_slices"]))
    assert online._draw(rows[:10].tolist(), make_generator(1)) != online._draw(rows[:10].tolist(), make_generator(2))


def test_organ_methods_need_labels(cache):
    blind = dataclasses.replace(cache, labelled=np.zeros_like(cache.labelled))
    rows = np.arange(cache.meta["n_slices"])
    with pytest.raises(DataError, match="needs the labels of its pretraining cases"):
        _method("polycl-o").check_labels(blind, rows)  # what the engine runs before select_rows
    with pytest.raises(DataError, match="polycl-s"):  # and select_rows on its own (the error names the alternative)
        _method("polycl-o").select_rows(blind, rows)
    _method("polycl-s").check_labels(blind, rows)
    _method("polycl-s").select_rows(blind, np.arange(cache.meta["n_slices"]))  # needs no labels


def test_polycl_m_pretrain_end_to_end(phantom_root, tmp_path):
    cfg = load_config("demo", overrides=[
        "data.size=32", "model.backbone=polycl-unet", "model.features=4", "train.batch_size=4",
        "train.amp=off", "train.threads=1", "split.n_folds=4", "split.val=1", "split.budget=2",
        "pretrain.method=polycl-m", "pretrain.slab_fraction=0.5", "train.epochs=1", "train.steps_per_epoch=3",
        f"data.path={phantom_root}", f"output_dir={tmp_path}", f"data.cache_dir={tmp_path / 'c'}", "name=pm"])
    run = pretrain(cfg, progress=False)
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["meta"]["selection"]["anchors"] > 0 and ckpt["meta"]["state"]["step"] == 3
    assert ckpt["meta"]["pretrain"]["polycl"]["m_negative_scope"] == "same_scan"
    assert ckpt["meta"]["pretrain"]["polycl"]["slab_fraction"] == 0.5  # the legacy key reached the method
