"""Pretraining: SimCLR and PCL run on the shared loop, resume, and their encoders load into fine-tuning."""

from __future__ import annotations

import json

import pytest
import torch

from medssl.config import load_config
from medssl.engine.checkpoint import load_checkpoint
from medssl.engine.finetune import finetune
from medssl.engine.pretrain import pretrain
from medssl.errors import ConfigError

TINY = ["data.size=32", "model.features=8", "train.batch_size=8", "train.amp=off", "train.threads=1",
        "split.n_folds=4", "split.val=1", "split.budget=2", "pretrain.proj_dim=16"]


def _cfg(tmp_path, root, *extra):
    return load_config("demo", overrides=[*TINY, f"data.path={root}", f"output_dir={tmp_path}",
                                          f"data.cache_dir={tmp_path / 'cache'}", *extra])


@pytest.mark.parametrize("method", ["simclr", "pcl", "gcl"])
def test_pretrain_then_finetune_with_init(phantom_root, tmp_path, method):
    run = pretrain(_cfg(tmp_path, phantom_root, f"pretrain.method={method}", f"name=pre-{method}",
                        "train.epochs=2", "train.steps_per_epoch=3"), progress=False)
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["meta"]["kind"] == "pretrain" and ckpt["meta"]["method"] == method
    assert ckpt["meta"]["state"]["step"] == 6
    assert any(k.startswith("head.") for k in ckpt["model"]) and any(k.startswith("encoder.") for k in ckpt["model"])
    records = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(torch.isfinite(torch.tensor(r["train_loss"])) for r in records)
    split = json.loads((run / "splits.json").read_text())
    # validation and test patients are never used for pretraining
    assert ckpt["meta"]["n_cases"] == len(split["labelled"]) + len(split["unlabelled"])

    ft = finetune(_cfg(tmp_path, phantom_root, f"name=ft-{method}", "train.epochs=1", "train.steps_per_epoch=1",
                       f"train.init={run / 'checkpoints' / 'last.pt'}", "train.lr=1e-12", "train.min_lr=0",
                       "aug.enabled=false"), progress=False)
    tuned = load_checkpoint(ft / "checkpoints" / "last.pt")["model"]
    for k, v in ckpt["model"].items():
        if k.startswith("encoder.") and v.dim() >= 2:  # conv kernels: transferred (lr ~ 0 keeps them)
            assert torch.allclose(tuned[k], v, atol=1e-6), k


def test_pcl_positive_mask_uses_positions(phantom_root, tmp_path):
    from medssl.config import AugConfig, PretrainConfig
    from medssl.methods import build_method
    from medssl.models import build_model

    enc = build_model("unet", in_channels=1, n_classes=2, features=8).encoder
    pcl = build_method("pcl", enc, PretrainConfig(options={"pcl": {"theta": 0.1}}), AugConfig())
    batch = {"rel_pos": torch.tensor([0.10, 0.15, 0.50, 0.95])}
    mask = pcl.positives(batch, 4, torch.device("cpu"))
    assert mask.shape == (8, 8)
    assert bool(mask[0, 1]) and bool(mask[0, 4]) and not bool(mask[0, 2])  # |0.10-0.15| < 0.1; other view
    simclr = build_method("simclr", enc, PretrainConfig(), AugConfig())
    assert int(simclr.positives(batch, 4, torch.device("cpu")).sum()) == 8


def test_unknown_method_and_resume(phantom_root, tmp_path):
    with pytest.raises(ConfigError, match="unknown method"):
        pretrain(_cfg(tmp_path, phantom_root, "pretrain.method=nope", "name=bad"), progress=False)
    assert not (tmp_path / "bad").exists()  # nothing written for a bad method name
    cfg = _cfg(tmp_path, phantom_root, "name=res", "train.epochs=1", "train.steps_per_epoch=2",
               "train.deterministic=true")
    run = pretrain(cfg, progress=False)
    # extend the finished run by resuming with more epochs written into its saved config
    text = (run / "config.yaml").read_text().replace("epochs: 1", "epochs: 2")
    (run / "config.yaml").write_text(text)
    pretrain(cfg, resume=True, progress=False)
    assert load_checkpoint(run / "checkpoints" / "last.pt")["meta"]["state"]["epoch"] == 2


def test_gcl_formulations_differ_and_partitions(phantom_root, tmp_path):
    from medssl.config import AugConfig, PretrainConfig
    from medssl.data.augment import make_generator
    from medssl.methods import build_method
    from medssl.models import build_model
    import numpy as np

    torch.manual_seed(0)
    enc = build_model("unet", in_channels=1, n_classes=2, features=8).encoder
    x = torch.randn(8, 1, 32, 32)
    batch = {"image": x, "row": torch.arange(8), "slice": torch.tensor([0, 3, 6, 9, 0, 3, 6, 9]),
             "n_slices": torch.full((8,), 10)}

    class _Cache:  # the fields GCL reads: scans, and slices whose appearance follows their position
        case_ids = np.array(["a"] * 4 + ["b"] * 4)
        rel_pos = np.array([0.1, 0.4, 0.7, 1.0] * 2)
        images = np.random.default_rng(0).normal(size=(8, 16, 16)) * 0.1 + rel_pos[:, None, None]

        @classmethod
        def read_images(cls, rows):
            return cls.images[np.asarray(rows)]

    m = build_method("gcl", enc, PretrainConfig(proj_dim=16), AugConfig())
    m.select_rows(_Cache, np.arange(8))
    losses = {}
    for form in ("chaitanya", "supcon_partition"):  # same module, same views: only the loss differs
        m.opts.formulation = form
        loss, _ = m.loss(batch, make_generator(3))
        assert torch.isfinite(loss)
        loss.backward()
        losses[form] = loss.item()
    assert losses["chaitanya"] != pytest.approx(losses["supcon_partition"])
