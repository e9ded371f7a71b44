"""``medssl pretrain --method kaf`` (docs/kaf.md#pretraining): neighbour slices, the loss on real phantom slices and
keypoints (ablation weights, empty and short keypoint lists), and an end-to-end run whose encoder loads into
``medssl finetune --init`` with backbone ``kaf-unet``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medssl.config import AugConfig, DataConfig, PretrainConfig, load_config
from medssl.data.augment import make_generator
from medssl.data.cache import prepare
from medssl.errors import ConfigError
from medssl.methods import build_method
from medssl.methods.kaf import neighbour_slices, truncate_to_batch_min
from medssl.models import build_model
from medssl.models.kaf.keypoints import Keypoints
from medssl.models.kaf.store import KeypointStore

KAF_OPTIONS = {"kaf_dim": 16, "kaf_heads": 2, "kaf_layers": 1, "max_keypoints": 32, "sift_upsample": 4,
               "dedupe_keypoints": True}
SMALL = dict(match_dim=16, match_heads=2, head_dim=16, match_layers=2, sinkhorn_iters=10)  # pretrain.kaf


# ------------------------------------------------------------------ neighbour slices
def test_neighbour_slices_follow_the_released_rule():
    u = torch.tensor([(i + 0.5) / 1000 for i in range(1000)])
    # c = 0.25·10 = 2.5 from the middle: trunc(2.5·U(-1, 1)) gives ±1 (weight 1) and ±2 (weight 0.5), never 0
    nb = neighbour_slices(np.full(1000, 5), np.full(1000, 10), u, "fraction", 0.25)
    freq = {k: float(np.mean(nb - 5 == k)) for k in range(-3, 4)}
    assert set(np.unique(nb - 5)) == {-2, -1, 1, 2}
    assert freq[1] == pytest.approx(1 / 3, abs=0.01) and freq[-1] == pytest.approx(1 / 3, abs=0.01)
    assert freq[2] == pytest.approx(1 / 6, abs=0.01) and freq[-2] == pytest.approx(1 / 6, abs=0.01)
    # at the volume edge the offsets that clip back onto s are redrawn: s' = s is never returned
    edge = neighbour_slices(np.zeros(1000, int), np.full(1000, 10), u, "fraction", 0.25)
    assert set(np.unique(edge)) == {1, 2} and float(np.mean(edge == 1)) == pytest.approx(2 / 3, abs=0.01)
    # clipping: from s = 1 with c = 3.5, offsets -1, -2 and -3 (weights 1, 1, 0.5) all land on slice 0
    clip = neighbour_slices(np.ones(1000, int), np.full(1000, 10), u, "fraction", 0.35)
    assert float(np.mean(clip == 0)) == pytest.approx(2.5 / 5, abs=0.01)
    # c < 1 (the released rule would loop forever): +-1; acdc rule: c = min(0.18, 2/Z)·Z <= 2, so +-1
    small = neighbour_slices(np.full(1000, 4), np.full(1000, 8), u, "fraction", 0.05)
    assert set(np.unique(small)) == {3, 5}
    acdc = neighbour_slices(np.full(1000, 50), np.full(1000, 100), u, "acdc")
    assert set(np.unique(acdc - 50)) == {-1, 1}
    assert neighbour_slices([0], [1], torch.tensor([0.3]))[0] == 0  # one-slice volume: itself


def test_truncate_to_batch_min_keeps_matches_first():
    def kp(counts):  # keypoint j of item i sits at x = 10·i + j, its descriptor is filled with j
        xys = [np.stack([10 * i + np.arange(c), np.zeros(c)], 1).astype(np.float32) for i, c in enumerate(counts)]
        descs = [np.repeat(np.arange(c, dtype=np.float32)[:, None], 128, 1) for c in counts]
        return Keypoints.from_lists(xys, descs)

    kp1, kp2 = kp([5, 3, 0]), kp([4, 6, 2])  # item 2 has no view-1 keypoint: it does not set the minimum
    pairs = [torch.tensor([[3, 1], [0, 2]]), torch.tensor([[2, 5]]), torch.zeros(0, 2, dtype=torch.long)]
    t1, t2, tp = truncate_to_batch_min(kp1, kp2, pairs)
    assert t1.n == t2.n == 3
    assert t1.sample(0)[0][:, 0].tolist() == [3, 0, 1] and t2.sample(0)[0][:, 0].tolist() == [1, 2, 0]
    assert t1.sample(1)[0][:, 0].tolist() == [12, 10, 11] and t2.sample(1)[0][:, 0].tolist() == [15, 10, 11]
    assert t1.sample(0)[1][:, 0].tolist() == [3, 0, 1]  # descriptors follow their keypoints
    assert [p.tolist() for p in tp] == [[[0, 0], [1, 1]], [[0, 0]], []]
    assert t1.counts().tolist() == [3, 3, 0] and t2.counts().tolist() == [3, 3, 2]


# ------------------------------------------------------------------ the loss on phantom slices
@pytest.fixture(scope="module")
def phantom_cache(phantom_root, tmp_path_factory):
    data = DataConfig(path=str(phantom_root), size=32, cache_dir=str(tmp_path_factory.mktemp("kafcache")))
    return prepare(data, progress=False)


def _method(cache, aug=True, **pre):
    torch.manual_seed(0)
    enc = build_model("kaf-unet", in_channels=1, n_classes=cache.n_classes, features=4, **KAF_OPTIONS).encoder
    cfg = PretrainConfig(method="kaf", proj_dim=16, options={"kaf": {**SMALL, **pre}})
    m = build_method("kaf", enc, cfg, AugConfig(enabled=aug))
    rows = m.select_rows(cache, np.arange(len(cache.case_ids)))
    return m, rows


def _batch(cache, rows):
    rows = np.asarray(rows)
    return {"image": torch.from_numpy(np.array(cache.images[rows]))[:, None], "row": torch.as_tensor(rows),
            "rel_pos": torch.as_tensor(cache.rel_pos[rows], dtype=torch.float64)}


@pytest.mark.parametrize("weights,scales,batching", [((1, 1, 0.01), [], "pad"), ((1, 0, 0), [], "pad"),
                                                     ((0, 1, 0), [2, 4], "pad"), ((0, 0, 1), [1], "truncate")])
def test_kaf_loss_ablations(phantom_cache, weights, scales, batching):
    w1, w2, w3 = weights
    m, rows = _method(phantom_cache, w_cnn=w1, w_kp=w2, w_local=w3, kp_scales=scales, keypoints=batching)
    assert (m.cnn_head is not None) == (w1 > 0) and (m.kp_head is not None) == (w2 > 0)
    assert (m.matcher is not None) == (w3 > 0)  # a switched-off term builds no head
    assert m.counts["anchors"] == len(rows) > 0
    loss, logs = m.loss(_batch(phantom_cache, rows[8:14]), make_generator(1))
    assert torch.isfinite(loss) and loss.item() > 0
    assert ("loss_cnn" in logs) == (w1 > 0) and ("loss_kp" in logs) == (w2 > 0) and ("loss_local" in logs) == (w3 > 0)
    loss.backward()
    grads = [p.grad for p in m.encoder.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    if w3 > 0:
        assert logs["matches_per_item"] > 0 and m.matcher.dustbin.grad is not None


def test_kaf_loss_is_the_weighted_sum(phantom_cache):
    m, rows = _method(phantom_cache, aug=False, w_cnn=1.0, w_kp=2.0, w_local=0.5)
    m.eval()  # no BN batch statistics, so the terms can be recomputed exactly
    loss, logs = m.loss(_batch(phantom_cache, rows[:6]), make_generator(2))
    assert loss.item() == pytest.approx(logs["loss_cnn"] + 2.0 * logs["loss_kp"] + 0.5 * logs["loss_local"],
                                        rel=1e-5)


class _ShortStore(KeypointStore):
    """The phantom's real keypoints, except: rows in ``empty`` have none and rows in ``short`` only 3."""

    empty: set = set()
    short: set = set()

    def arrays(self, row):
        xy, desc = super().arrays(row)
        if int(row) in self.empty:
            return xy[:0], desc[:0]
        return (xy[:3], desc[:3]) if int(row) in self.short else (xy, desc)


def test_kaf_slices_without_or_with_few_keypoints(phantom_cache):
    m, rows = _method(phantom_cache)
    store = _ShortStore(phantom_cache, m.encoder.keypoint_settings)
    _, first = np.unique(phantom_cache.case_ids[rows], return_index=True)
    batch_rows = rows[np.sort(first)[:6] + 5]  # one slice from each of 6 volumes
    # every slice of the first item's volume (so its neighbour too) has no keypoint, the second only 3
    case0 = phantom_cache.case_ids[batch_rows[0]]
    store.empty = {int(r) for r in np.flatnonzero(phantom_cache.case_ids == case0)}
    store.short = {int(batch_rows[1])}
    m.store = store
    loss, logs = m.loss(_batch(phantom_cache, batch_rows), make_generator(3))
    assert torch.isfinite(loss)
    assert logs["items_without_keypoints"] >= 1 and np.isfinite(logs["loss_kp"]) and np.isfinite(logs["loss_local"])
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    # a batch in which no item has keypoints: the keypoint terms vanish, the CNN term still trains
    store.empty = {int(r) for r in range(len(phantom_cache.case_ids))}
    loss, logs = m.loss(_batch(phantom_cache, batch_rows), make_generator(4))
    assert torch.isfinite(loss) and "loss_kp" not in logs and logs["loss_local"] == 0.0
    assert logs["items_without_keypoints"] == len(batch_rows)


def test_kaf_config_errors(phantom_cache):
    unet = build_model("unet", in_channels=1, n_classes=2, features=4).encoder
    with pytest.raises(ConfigError, match="kaf-unet"):
        build_method("kaf", unet, PretrainConfig(), AugConfig())
    with pytest.raises(ConfigError, match="at least one"):
        _method(phantom_cache, w_cnn=0, w_kp=0, w_local=0)
    with pytest.raises(ConfigError, match="pretrain.kaf.kp_scales"):
        _method(phantom_cache, kp_scales=[5])
    with pytest.raises(ConfigError, match="pretrain.kaf.local_form"):
        _method(phantom_cache, local_form="nope")
    with pytest.raises(ConfigError, match="pretrain.kaf.local_form"):  # a legacy key: checked where it lives now
        load_config("demo", overrides=["pretrain.kaf_local_form=nope"])


# ------------------------------------------------------------------ end to end
def test_kaf_pretrain_then_finetune_init(phantom_root, tmp_path):
    from medssl.engine.checkpoint import load_checkpoint
    from medssl.engine.finetune import finetune
    from medssl.engine.pretrain import pretrain

    opts = "{" + ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}"
                           for k, v in KAF_OPTIONS.items()) + "}"
    base = ["data.size=32", "model.features=4", "train.batch_size=4", "train.amp=off", "train.threads=1",
            "split.n_folds=4", "split.val=1", "split.budget=2", "model.backbone=kaf-unet",
            f"model.options={opts}", f"data.path={phantom_root}", f"output_dir={tmp_path}",
            f"data.cache_dir={tmp_path / 'cache'}"]
    pre = [f"pretrain.kaf.{k}={v}" for k, v in SMALL.items()] + [
        "pretrain.method=kaf", "pretrain.proj_dim=16", "pretrain.kaf_w_local=1.0"]  # a legacy key still loads
    run = pretrain(load_config("demo", overrides=[*base, *pre, "name=pre-kaf", "train.epochs=2",
                                                  "train.steps_per_epoch=2"]), progress=False)
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["meta"]["method"] == "kaf" and ckpt["meta"]["state"]["step"] == 4
    assert ckpt["meta"]["selection"]["anchors"] > 0
    prefixes = {k.split(".")[0] for k in ckpt["model"]}
    assert {"encoder", "cnn_head", "g_proj", "kp_head", "matcher"} <= prefixes
    records = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    for r in records:
        for key in ("train_loss", "train_loss_cnn", "train_loss_kp", "train_loss_local"):
            assert np.isfinite(r[key]), key
    ft = finetune(load_config("demo", overrides=[*base, "name=ft-kaf", "train.epochs=1", "train.steps_per_epoch=1",
                                                 f"train.init={run / 'checkpoints' / 'last.pt'}", "train.lr=1e-12",
                                                 "train.min_lr=0", "aug.enabled=false"]), progress=False)
    tuned = load_checkpoint(ft / "checkpoints" / "last.pt")["model"]
    enc = [k for k in ckpt["model"] if k.startswith("encoder.")]
    assert any(".kaf" in k or "attn" in k or "kaf" in k for k in enc)  # the KAF layers are part of the encoder
    for k in enc:
        if ckpt["model"][k].dim() >= 2:  # weights transferred (lr ~ 0 keeps them)
            assert torch.allclose(tuned[k], ckpt["model"][k], atol=1e-6), k
