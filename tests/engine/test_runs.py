"""A run folder's config.yaml that cannot be read is a one-line ConfigError naming the file."""

from __future__ import annotations

import re

import pytest

from medssl.config import dump_config, load_config
from medssl.engine.runs import RunDir
from medssl.errors import ConfigError


def test_saved_config_round_trip(tmp_path):
    (tmp_path / "config.yaml").write_text(dump_config(load_config("demo", ["train.lr=0.01"])))
    assert RunDir(tmp_path).saved_config().train.lr == 0.01


def test_saved_config_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("train: {lr: [0.1\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: invalid YAML")):
        RunDir(tmp_path).saved_config()


def test_saved_config_bad_key_names_the_file_and_the_key(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("train: {lr: 0.01, lrr: 0.1}\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: unknown config key 'train.lrr'")):
        RunDir(tmp_path).saved_config()
