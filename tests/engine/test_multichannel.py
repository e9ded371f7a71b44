"""A multi-channel dataset end to end: fine-tune on one channel (data.channel), then predict 4D inputs with it."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import yaml

from medssl.config import load_config
from medssl.engine.finetune import finetune
from medssl.evaluation.evaluate import predict_files
from tests import synth

TINY = ["data.size=16", "model.features=8", "train.batch_size=4", "train.amp=off", "train.threads=1",
        "aug.elastic_prob=0", "split.n_folds=4", "split.val=1", "split.budget=2", "train.epochs=1",
        "train.steps_per_epoch=2"]


def test_finetune_and_predict_on_channel_1(tmp_path):
    root = synth.make_msd_multichannel(tmp_path / "P", n_cases=8, channels=("T2", "ADC"))
    cfg = load_config("demo", overrides=[f"data.path={root}", *TINY, "data.channel=1", f"output_dir={tmp_path}",
                                         f"data.cache_dir={tmp_path / 'cache'}", "name=ch1"])
    run = finetune(cfg, progress=False)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["channel"] == 1
    (cache,) = (tmp_path / "cache").iterdir()
    assert json.loads((cache / "meta.json").read_text())["settings"]["channel"] == 1
    written = predict_files(run / "checkpoints" / "best.pt", root, tmp_path / "pred", progress=False)
    assert len(written) == 8 and all(nib.load(p).shape == synth.SHAPE for p in written)
    (one,) = predict_files(run / "checkpoints" / "best.pt", root / "imagesTr" / "case_000.nii.gz",
                           tmp_path / "pred1", progress=False)  # a single 4D file: channel 1 of it too
    np.testing.assert_array_equal(np.asarray(nib.load(one).dataobj), np.asarray(nib.load(written[0]).dataobj))
