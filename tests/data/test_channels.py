"""Multi-channel datasets: one channel is read everywhere (data.channel), and medssl plan chooses it from the data."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from medssl.cli import app
from medssl.config import DataConfig
from medssl.data.cache import cache_key
from medssl.data.channels import boundary_contrast, channel_scores, choose_channel
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
    assert "channel" not in str(cache_key(data, first))
    assert cache_key(data, first) != cache_key(DataConfig(path=str(root), channel=1), second)


def test_boundary_contrast_and_choice(tmp_path):
    image, label = synth.blob_pair(seed=0)
    noise = np.random.default_rng(0).normal(0, 5, size=image.shape)
    assert min(boundary_contrast(image, label)) > 1 > 0.5 > max(boundary_contrast(noise, label))
    for informative in (0, 1):
        root = synth.make_msd_multichannel(tmp_path / f"P{informative}", informative=informative)
        info = open_dataset(root)
        scores = channel_scores(info)
        assert scores[informative] > 1 > 0.5 > scores[1 - informative]
        channel, why = choose_channel(info)
        assert channel == informative and "2 channels (0: T2, 1: ADC)" in why
    assert choose_channel(open_dataset(synth.make_msd(tmp_path / "S", 2))) == (0, "single-channel data")


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
