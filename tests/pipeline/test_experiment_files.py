"""A malformed experiment file is a one-line ConfigError naming it (the CLI prints it), never a traceback."""

from __future__ import annotations

import pytest

from medssl.errors import ConfigError
from medssl.pipeline.experiment_config import load_experiment


def test_invalid_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("methods: [random\nbudgets: [1]\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_experiment(bad)


def test_top_level_must_be_a_mapping(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- random\n- pcl\n")
    with pytest.raises(ConfigError, match="list.yaml: the top level must be a mapping"):
        load_experiment(bad)


def test_override_with_invalid_yaml_value(tmp_path):
    good = tmp_path / "exp.yaml"
    good.write_text("methods: [random]\nbudgets: [1]\nseeds: [0]\n")
    with pytest.raises(ConfigError, match=r"override 'seeds=\[0'"):
        load_experiment(good, overrides=["seeds=[0"])
    assert load_experiment(good, overrides=["seeds=[0, 1]"]).seeds == [0, 1]
