"""Fine-tuning that keeps what was pretrained: an encoder learning-rate scale, a linear probe first (LP-FT),
a warm-up after it, the same for every init."""

from __future__ import annotations

import pytest
import torch

from medssl.config import load_config
from medssl.data.phantom import write_phantom_dataset
from medssl.engine.checkpoint import load_checkpoint
from medssl.engine.trainer import group_lr
from medssl.errors import ConfigError

TINY = ["data.size=32", "model.features=8", "train.batch_size=4", "train.amp=off", "train.threads=1",
        "aug.elastic_prob=0", "split.n_folds=4", "split.val=1", "split.budget=2"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("phantom"), n_cases=8, shape=(32, 32, 16), seed=3)


def _run(tiny_data, tmp_path, name, *over):
    from medssl.engine.finetune import finetune

    cfg = load_config("demo", overrides=[*TINY, "train.epochs=1", f"name={name}", f"output_dir={tmp_path}",
                                         f"data.cache_dir={tmp_path / 'cache'}", f"data.path={tiny_data}", *over])
    finetune(cfg, progress=False)
    return load_checkpoint(tmp_path / name / "checkpoints" / "last.pt")["model"]


def _start(tiny_data):
    from medssl.models import build_model

    torch.manual_seed(0)  # finetune seeds with train.seed (0) before building the model
    return build_model("unet", in_channels=1, n_classes=4, features=8).state_dict()


def test_linear_probe_keeps_the_encoder_and_its_batchnorm_statistics(tiny_data, tmp_path):
    start = _start(tiny_data)
    end = _run(tiny_data, tmp_path, "lp", "train.steps_per_epoch=4", "train.encoder_frozen_steps=4")
    for k, v in end.items():
        if k.startswith("encoder."):
            assert torch.equal(v, start[k]), f"{k} changed during the linear probe"
    assert any(not torch.equal(v, start[k]) for k, v in end.items() if k.startswith("decoder."))


def test_encoder_lr_scale_zero_is_a_frozen_encoder_and_one_is_todays_training(tiny_data, tmp_path):
    start = _start(tiny_data)
    end = _run(tiny_data, tmp_path, "s0", "train.steps_per_epoch=3", "train.encoder_lr_scale=0")
    weights = [k for k in end if k.startswith("encoder.") and k.endswith("weight")]
    assert all(torch.equal(end[k], start[k]) for k in weights)
    full = _run(tiny_data, tmp_path, "s1", "train.steps_per_epoch=3")
    assert all(not torch.equal(full[k], start[k]) for k in weights if full[k].dim() == 4)


def test_encoder_unfreezes_with_a_ramp():
    group = {"frozen_until": 10, "lr_scale": 0.5}
    assert [group_lr(group, 1.0, s, 4) for s in (0, 9, 10, 11, 13, 20)] == [0.0, 0.0, 0.125, 0.25, 0.5, 0.5]
    assert group_lr({}, 2.0, 0, 4) == 2.0  # the decoder's group: the loop's schedule unchanged


@pytest.mark.parametrize("over", ["train.encoder_lr_scale=-1", "train.encoder_frozen_steps=-2"])
def test_bad_values_are_config_errors(over):
    with pytest.raises(ConfigError, match=over.split("=")[0]):
        load_config("demo", overrides=[over])
