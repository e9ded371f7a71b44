"""Extending medssl the documented way (docs/extending.md): a pretraining method is one file with its options
dataclass and one registration line; a backbone is one decorated builder. Both are then chosen by config keys."""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap

import pytest
import yaml

import medssl.config
import medssl.methods.registry
import medssl.models.registry
from medssl.config import load_config
from medssl.errors import ConfigError

# The whole file a user adds (in src/medssl/methods/ it is found without any other edit; here it lives in tmp_path).
TOY_METHOD = '''
"""toy: a pretraining method in one file."""

from dataclasses import dataclass

import numpy as np

from medssl.errors import ConfigError
from medssl.methods.registry import PretrainMethod, ProjectionHead, register_method


@dataclass
class ToyOptions:
    """pretrain.toy"""

    scale: float = 1.0  # multiplies the loss
    keep_every: int = 1  # example selection: every k-th pretraining slice

    def __post_init__(self):
        if not self.scale > 0:
            raise ConfigError(f"config key 'pretrain.toy.scale' must be positive, got {self.scale}")


@register_method("toy")
class Toy(PretrainMethod):
    options_cls = ToyOptions

    def __init__(self, encoder, cfg, aug):
        super().__init__(encoder, cfg, aug)
        self.head = ProjectionHead(encoder.out_channels[-1], cfg.proj_dim)
        self.totals = set()

    def select_rows(self, cache, rows):
        kept = np.asarray(rows)[:: self.opts.keep_every]
        self.counts = {"kept": int(len(kept)), "dropped": int(len(rows) - len(kept))}
        return kept

    def set_step(self, step, total):
        self.totals.add(total)

    def loss(self, batch, generator):
        z = self.head(self.encoder(batch["image"])[-1])
        return self.opts.scale * z.pow(2).mean(), {"scale": float(self.opts.scale), "total": float(max(self.totals))}
'''

TINY = ["data.size=32", "model.features=8", "train.batch_size=4", "train.amp=off", "train.threads=1",
        "split.n_folds=4", "split.val=1", "split.budget=2", "pretrain.proj_dim=16"]


@pytest.fixture
def registries(monkeypatch):
    """Registrations made in a test stay in that test (the registries are process-wide)."""
    monkeypatch.setattr(medssl.methods.registry, "_METHODS", medssl.methods.registry._METHODS.copy())
    monkeypatch.setattr(medssl.config, "_OPTIONS", medssl.config._OPTIONS.copy())
    monkeypatch.setattr(medssl.models.registry, "_BACKBONES", medssl.models.registry._BACKBONES.copy())


@pytest.fixture
def toy(registries, tmp_path, monkeypatch):
    path = tmp_path / "toy_method.py"
    path.write_text(textwrap.dedent(TOY_METHOD))
    spec = importlib.util.spec_from_file_location("toy_method", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "toy_method", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def toy_backbone(registries):
    from medssl.models import build_unet, register_backbone

    built = []

    @register_backbone("toy-unet")
    def _toy(*, in_channels: int, n_classes: int, features: int = 8, width: int = 1):
        built.append(width)
        return build_unet(in_channels=in_channels, n_classes=n_classes, features=features * width)

    return built


def test_toy_method_and_backbone_pretrain_with_their_options(toy, toy_backbone, phantom_root, tmp_path):
    from medssl.engine.checkpoint import load_checkpoint
    from medssl.engine.pretrain import pretrain

    cfg = load_config("demo", overrides=[
        *TINY, "pretrain.method=toy", "pretrain.toy.scale=3.5", "pretrain.toy.keep_every=2",
        "model.backbone=toy-unet", "model.options.width=2", "train.epochs=1", "train.steps_per_epoch=3",
        f"data.path={phantom_root}", f"output_dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}", "name=toy"])
    assert cfg.pretrain.options["toy"] == toy.ToyOptions(scale=3.5, keep_every=2)
    run = pretrain(cfg, progress=False)

    assert toy_backbone == [2]  # the backbone was built with its option
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    meta = ckpt["meta"]
    assert meta["method"] == "toy" and meta["state"]["step"] == 3
    assert meta["pretrain"]["toy"] == {"scale": 3.5, "keep_every": 2}
    assert meta["selection"]["kept"] == meta["n_slices"] > 0 and meta["selection"]["dropped"] > 0  # select_rows
    assert meta["model"]["backbone"] == "toy-unet" and meta["model"]["options"] == {"width": 2}
    record = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    assert record["train_scale"] == 3.5  # the option reached the method's loss
    assert record["train_total"] == 3.0  # set_step got the run's total steps
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["pretrain"]["toy"] == {"scale": 3.5, "keep_every": 2}  # the documented layout, reloadable
    from medssl.engine.runs import RunDir
    assert RunDir(run).saved_config().pretrain.options["toy"].scale == 3.5


def test_toy_method_option_errors_are_one_line(toy):
    with pytest.raises(ConfigError, match=r"unknown config key 'pretrain\.toy\.bogus' \(known: keep_every, scale\)") \
            as err:
        load_config("demo", overrides=["pretrain.method=toy", "pretrain.toy.bogus=1"])
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"'pretrain\.toy\.scale' must be positive"):
        load_config("demo", overrides=["pretrain.toy.scale=-1"])
    with pytest.raises(ConfigError, match=r"'pretrain\.toy\.keep_every' expects int"):
        load_config("demo", overrides=["pretrain.toy.keep_every=half"])
    with pytest.raises(ConfigError, match=r"unknown config key 'pretrain\.toys'"):  # a section no method owns
        load_config("demo", overrides=["pretrain.toys.scale=2"])


def test_a_method_cannot_shadow_a_shared_key(registries):
    from dataclasses import dataclass

    from medssl.methods.registry import PretrainMethod, register_method

    @dataclass
    class Opts:
        x: int = 0

    class Bad(PretrainMethod):
        options_cls = Opts

    with pytest.raises(ValueError, match="shadow"):
        register_method("views")(Bad)
    register_method("fine")(Bad)
    with pytest.raises(ValueError, match="already registered"):
        register_method("fine")(type("Other", (PretrainMethod,), {}))
