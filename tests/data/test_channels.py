"""Multi-channel datasets: one channel is read everywhere (data.channel), and medssl plan chooses it from the data."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from medssl.cli import app
from medssl.config import DataConfig
from medssl.data.cache import cache_key, preprocess_settings
from medssl.data.channels import channel_scores, choose_channel, probe_auc
from medssl.data.check import run_check
from medssl.data.discover import find_volumes, read_item
from medssl.data.layouts import open_dataset
from medssl.data.readers import read_case
from medssl.errors import ConfigError, DataError
from medssl.planning import write_plan
from tests import synth


def test_msd_4d_channels_and_modality(tmp_path):
    root = synth.make_msd_multichannel(tmp_path / "P", channels=("CT", "T2"))
    info = open_dataset(root)
    assert info.channel_names == {0: "CT", 1: "T2"} and info.channel == 0 and info.modality == "CT"
    image, label = read_case(info.cases[0], info)
    assert image.shape == synth.SHAPE and abs(float(image.array.mean())) < 2  # the noise channel, mean 0
    second = open_dataset(root, channel=1)
    assert second.modality == "MRI"  # the chosen channel's modality (z-scoring, not a CT window)
    np.testing.assert_allclose(read_case(second.cases[0], second)[0].array, synth.blob_pair(seed=0)[0])
    assert open_dataset(root, channel=1, modality="CT").modality == "CT"  # an explicit override still wins


def test_unknown_channel_is_one_line_config_error(tmp_path):
    root = synth.make_msd_multichannel(tmp_path / "P")
    with pytest.raises(ConfigError, match=r"data.channel=2: .* has 2 channels \(0: T2, 1: ADC\)"):
        open_dataset(root, channel=2)
    single = synth.make_msd(tmp_path / "S", 1)
    with pytest.raises(ConfigError, match=r"data.channel=1: .* has 1 channel \(0: MRI\)"):
        open_dataset(single, channel=1)  # dataset.json names one channel
    info = open_dataset(single)
    info.channel = 1  # a layout that names no channels: the reader finds out
    with pytest.raises(DataError, match="case_000.nii.gz: channel 1 asked for .* the image has one channel"):
        read_case(info.cases[0], info)


def test_check_reads_the_channel_and_says_so(tmp_path):
    root = synth.make_msd_multichannel(tmp_path / "P")
    result = run_check(root, channel=1)
    assert result.ok and result.n_read == 4
    assert result.channels == "2 channels (0: T2, 1: ADC); medssl reads channel 1 (data.channel)"
    out = CliRunner().invoke(app, ["check", "--data", str(root), "data.channel=1"])
    assert out.exit_code == 0, out.output
    assert "channels: 2 channels (0: T2, 1: ADC); medssl reads channel 1" in out.output


def test_cache_key_only_changes_for_another_channel(tmp_path):
    root = synth.make_msd_multichannel(tmp_path / "P")
    data = DataConfig(path=str(root))
    first, second = open_dataset(root), open_dataset(root, channel=1)
    assert "channel" not in preprocess_settings(data, first)  # single-channel caches keep their keys
    assert cache_key(data, first) != cache_key(DataConfig(path=str(root), channel=1), second)


def test_probe_and_choice(tmp_path):
    rng = np.random.default_rng(0)
    target, groups = np.repeat([1, 0], 200), np.tile(np.arange(4), 100)
    assert probe_auc(target[:, None] + rng.normal(0, 0.3, (400, 1)), target, groups) > 0.95
    assert abs(probe_auc(rng.normal(0, 1, (400, 3)), target, groups) - 0.5) < 0.1
    assert probe_auc(target[:, None] * 1.0, target, np.zeros(400)) == 0.5  # one group: no cross-validation
    for informative in (0, 1):
        root = synth.make_msd_multichannel(tmp_path / f"P{informative}", informative=informative)
        info = open_dataset(root)
        scores = channel_scores(info)
        assert scores[informative] > 0.9 and scores[1 - informative] < 0.75, scores
        channel, why = choose_channel(info)
        assert channel == informative and "2 channels (0: T2, 1: ADC)" in why
    assert choose_channel(open_dataset(synth.make_msd(tmp_path / "S", 2))) == (0, "")


def test_plan_chooses_the_informative_channel(tmp_path):
    root = synth.make_msd_multichannel(tmp_path / "P", n_cases=6, channels=("CT", "ADC"))
    out, planned = write_plan(root, tmp_path / "plan.yaml", progress=False)
    text = out.read_text()
    assert "channel: 1  # 2 channels (0: CT, 1: ADC)" in text
    assert "modality: MRI" in text  # ADC's, not the first channel's CT
    single, _ = write_plan(synth.make_msd(tmp_path / "S", 6), tmp_path / "single.yaml", progress=False)
    assert "channel:" not in single.read_text()


def test_discover_gives_the_channel(tmp_path):
    root = synth.make_msd_multichannel(tmp_path / "P", n_cases=2)
    items = find_volumes(root, "image", channel=1)
    np.testing.assert_allclose(read_item(items["case_001"], "image").array, synth.blob_pair(seed=1)[0])
    flat = tmp_path / "flat"  # a plain folder of nnU-Net files: CASE_0000, CASE_0001
    image, _ = synth.blob_pair(seed=2)
    synth.write_nifti(flat / "a_0000.nii.gz", image * 0)
    synth.write_nifti(flat / "a_0001.nii.gz", image)
    synth.write_nifti(flat / "b_0001.nii.gz", image)  # no b_0000: a case named b_0001
    assert sorted(find_volumes(flat, "image")) == ["a", "b_0001"]
    items = find_volumes(flat, "image", channel=1)
    assert sorted(items) == ["a", "b_0001"] and items["a"].path.name == "a_0001.nii.gz"


def test_real_mri_channel_that_shows_the_structures_is_chosen(hippocampus_root, tmp_path):
    """12 Hippocampus volumes as 3-channel MSD images: another case's MRI resized onto this one (real texture that
    does not show these structures), the original under noise twice the tissue's spread, and the original (last,
    so ties would not favour it). The planner's rule must pick the original."""
    import json

    import nibabel as nib
    from scipy import ndimage

    info = open_dataset(hippocampus_root)
    meta = {"name": "Hippo3", "modality": {"0": "other", "1": "noisy", "2": "MRI"},
            "labels": {str(k): v for k, v in info.labels.items()}, "training": []}
    rng = np.random.default_rng(0)
    cases = info.labelled[:13]
    for case, other in zip(cases[:12], cases[1:]):
        img = nib.load(case.images[0])
        x = np.asarray(img.dataobj, np.float32)
        y = np.asarray(nib.load(other.images[0]).dataobj, np.float32)
        y = ndimage.zoom(y, np.array(x.shape) / np.array(y.shape), order=1)[tuple(slice(0, n) for n in x.shape)]
        y = np.pad(y, [(0, n - m) for n, m in zip(x.shape, y.shape)], mode="edge")
        noisy = x + rng.normal(0, 2.0, x.shape).astype(np.float32) * x[x > 0].std()
        stack = np.stack([y, noisy, x], axis=-1)
        synth.write_nifti(tmp_path / "imagesTr" / case.images[0].name, stack, img.affine)
        synth.write_nifti(tmp_path / "labelsTr" / case.images[0].name, np.asarray(nib.load(case.label).dataobj),
                          img.affine)
        meta["training"].append({"image": f"./imagesTr/{case.images[0].name}",
                                 "label": f"./labelsTr/{case.images[0].name}"})
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    multi = open_dataset(tmp_path)
    scores = channel_scores(multi)
    assert choose_channel(multi)[0] == 2, scores
    assert scores[2] > max(scores[0], scores[1]), scores
