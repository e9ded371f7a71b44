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


def test_run_folder_records_the_machine(tmp_path):
    """environment.json names the CPU and the features that decide its speed, so results are never compared across
    machines without knowing it (e.g. bf16 autocast on AVX512-BF16/AMX, fp32 on AVX2)."""
    import json
    import os

    from medssl.machine import FEATURES, cpu, has_bf16_units

    run = RunDir(tmp_path / "run")
    run.start(load_config("demo"), resume=False, kind="finetune")
    env = json.loads((tmp_path / "run" / "environment.json").read_text())
    info = env["machine"]["cpu"]
    assert info == cpu() and info["model"] and info["logical_cpus"] == os.cpu_count()
    assert set(info["features"]) <= set(FEATURES)
    assert isinstance(env["machine"]["torch_threads"], int) and isinstance(env["machine"]["gpus"], list)
    if os.path.exists("/proc/cpuinfo"):  # the features are the ones /proc/cpuinfo lists
        flags = next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split(":", 1)[1].split()
        assert info["features"] == [f for f in FEATURES if f in flags]
        if not {"avx512_bf16", "amx_tile"} & set(flags):  # torch's detection agrees with the CPU's flags
            assert not has_bf16_units()
