"""Typed configuration: presets, dotted overrides, ``base:`` inheritance and errors naming the key."""

from __future__ import annotations

import pytest
import yaml

from medssl.config import (Config, config_from_dict, dump_config, load_config, parse_overrides,
                           preset_names)
from medssl.errors import ConfigError


def test_presets_load():
    assert {"demo", "hippocampus", "ct"} <= set(preset_names())
    demo, hip, ct = load_config("demo"), load_config("hippocampus"), load_config("ct")
    assert isinstance(demo, Config)
    assert (demo.name, demo.data.size, demo.model.features, demo.split.budget) == ("demo", 64, 16, 4)
    assert hip.data.path.endswith("Task04_Hippocampus") and hip.data.mri_mode == "zscore"
    assert hip.train.min_lr == pytest.approx(1e-5) and isinstance(hip.train.min_lr, float)
    assert (ct.data.size, ct.data.fit, ct.data.ct_window) == (256, "resize", [-160, 240])
    assert ct.train.foreground_oversample == pytest.approx(0.3)
    # untouched keys keep their dataclass defaults
    assert demo.eval.batch_size == 32 and demo.aug.enabled is True and demo.output_dir == "runs"
    assert load_config().name == "run"  # no source: all defaults


def test_dotted_overrides_parse_types():
    cfg = load_config("demo", ["train.lr=1e-3", "split.budget=all", "data.ct_window=[-100,200]",
                               "split.val=0.25", "train.epochs=3", "train.amp=off", "aug.enabled=false",
                               "train.init=null", "name=my run", "model.options={deep_supervision: true}",
                               "train.weight_decay=5E-4"])
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.train.weight_decay == pytest.approx(5e-4)
    assert cfg.split.budget == "all"
    assert cfg.data.ct_window == [-100, 200]
    assert cfg.split.val == pytest.approx(0.25) and cfg.train.epochs == 3
    assert cfg.train.amp == "off" and cfg.aug.enabled is False and cfg.train.init is None
    assert cfg.name == "my run" and cfg.model.options == {"deep_supervision": True}
    assert load_config("demo", ["split.budget=5"]).split.budget == 5
    assert load_config("demo", ["split.budget=0.5"]).split.budget == pytest.approx(0.5)
    assert load_config("demo", ["--train.lr=0.01"]).train.lr == pytest.approx(0.01)
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


def test_overrides_beat_extra_beat_file():
    cfg = load_config("demo", ["train.epochs=7"], extra={"train": {"epochs": 5, "batch_size": 4}})
    assert cfg.train.epochs == 7 and cfg.train.batch_size == 4 and cfg.train.lr == pytest.approx(0.003)


@pytest.mark.parametrize("override,key", [
    ("train.lrr=1", "train.lrr"),
    ("trian.lr=1", "trian"),
    ("data.sizes=64", "data.sizes"),
    ("banana=1", "banana"),
])
def test_unknown_key_names_it(override, key):
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'") as exc:
        load_config("demo", [override])
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("override,key", [
    ("train.lr=fast", "train.lr"),
    ("train.epochs=2.5", "train.epochs"),
    ("data.ct_window=wide", "data.ct_window"),
    ("data.ct_window=[a,b]", "data.ct_window"),
    ("aug.enabled=3", "aug.enabled"),
    ("data.size=[64]", "data.size"),
    ("train=5", "train"),
    ("model.options=1", "model.options"),
])
def test_wrong_type_names_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'") as exc:
        load_config("demo", [override])
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("override,key", [
    ("data.size=50", "data.size"),
    ("data.size=0", "data.size"),
    ("train.amp=fp8", "train.amp"),
    ("data.fit=crop", "data.fit"),
    ("data.axis=3", "data.axis"),
    ("data.ct_window=[200,-100]", "data.ct_window"),
    ("train.lr=0", "train.lr"),
    ("train.foreground_oversample=1.5", "train.foreground_oversample"),
    ("split.budget=lots", "split.budget"),
    ("split.budget_mode=random", "split.budget_mode"),
    ("pretrain.position_r2_min=1.5", "pretrain.position_r2_min"),
])
def test_invalid_values_rejected(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("demo", [override])


def test_malformed_override():
    with pytest.raises(ConfigError, match="key=value"):
        load_config("demo", ["train.lr"])


def test_base_inheritance(tmp_path):
    (tmp_path / "sub").mkdir()
    parent = tmp_path / "sub" / "parent.yaml"
    parent.write_text("base: hippocampus\nname: parent\ntrain:\n  epochs: 3\n  lr: 1e-4\n")
    child = tmp_path / "sub" / "child.yaml"
    child.write_text("base: parent.yaml\nname: child\ntrain:\n  batch_size: 4\n")  # relative to this file
    cfg = load_config(child, ["train.epochs=5"])
    assert cfg.name == "child"
    assert cfg.train.batch_size == 4 and cfg.train.epochs == 5
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.data.mri_mode == "zscore" and cfg.split.budget == 20  # from the hippocampus preset
    assert cfg.train.foreground_oversample == pytest.approx(0.3)
    assert load_config(str(parent)).train.steps_per_epoch == 50


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML") as exc:
        load_config(bad)
    assert str(bad) in str(exc.value) and "\n" not in str(exc.value)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(scalar)
    typo = tmp_path / "typo.yaml"
    typo.write_text("base: demo\ntrain:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match="'train.lrr'"):
        load_config(typo)
    loop_a, loop_b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    loop_a.write_text("base: b.yaml\n")
    loop_b.write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(loop_a)


def test_dump_round_trip():
    cfg = load_config("hippocampus", ["train.lr=1e-4", "train.min_lr=1e-6", "data.ct_window=[-100,200]"])
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


# ------------------------------------------------------------------ method options (pretrain.<section>)
def test_method_options_layout_and_legacy_keys(tmp_path):
    import medssl.methods  # noqa: F401  (registers the methods' option sections)
    from medssl.config import LEGACY_KEYS

    new = load_config("demo", ["pretrain.pcl.theta=0.2", "pretrain.kaf.theta=0.2", "pretrain.polycl.slab_fraction=1.0",
                               "pretrain.gcl.parts=6", "pretrain.kaf.w_local=0.5"])
    old = load_config("demo", ["pretrain.pcl_theta=0.2", "pretrain.slab_fraction=1.0", "pretrain.gcl_parts=6",
                               "pretrain.kaf_w_local=0.5"])
    assert old == new
    o = new.pretrain.options
    assert (o["pcl"].theta, o["kaf"].theta, o["polycl"].slab_fraction, o["gcl"].parts) == (0.2, 0.2, 1.0, 6)
    assert o["gcl"].strategy == "GD" and o["polycl"].triplets == "online"  # defaults filled in
    # every legacy key has a home, and a file, its base and the overrides may mix the spellings
    for key, targets in LEGACY_KEYS.items():
        for target in targets:
            section, name = target.split(".")
            assert hasattr(o[section], name), key
    base = tmp_path / "base.yaml"
    base.write_text("base: demo\npretrain:\n  kaf_match_dim: 64\n  kaf:\n    match_heads: 8\n  slab_fraction: 0.5\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\npretrain:\n  kaf:\n    match_dim: 32\n  polycl:\n    slab_fraction: 0.7\n"
                     "  slab_fraction: 0.9\n")  # in one file the new spelling wins
    cfg = load_config(child, ["pretrain.kaf_match_heads=4"])  # overrides beat the files, in either spelling
    k = cfg.pretrain.options["kaf"]
    assert (k.match_dim, k.match_heads, cfg.pretrain.options["polycl"].slab_fraction) == (32, 4, 0.7)


def test_saved_configs_of_old_runs_still_load():
    import medssl.methods  # noqa: F401

    cfg = load_config("kaf_hippocampus", ["pretrain.pcl_theta=0.3", "pretrain.triplets=offline_fixed"])
    flat = cfg.to_dict()  # an old run's config.yaml: the method options as flat pretrain keys
    for section in ("gcl", "kaf", "pcl", "polycl"):
        flat["pretrain"].pop(section)
    flat["pretrain"].update({"pcl_theta": 0.3, "kaf_match_dim": 64, "kaf_match_heads": 4, "kaf_head_dim": 64,
                             "kaf_match_layers": 2, "kaf_sinkhorn_iters": 30, "kaf_match_radius": 0,
                             "triplets": "offline_fixed", "m_negative_scope": "same_scan", "gcl_strategy": "GD"})
    assert config_from_dict(flat) == cfg
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))  # and the new layout round-trips
    assert again == cfg and "options" not in yaml.safe_load(dump_config(cfg))["pretrain"]
    with pytest.raises(ConfigError, match="'pretrain.polycl.triplets' must be one of"):
        config_from_dict({"pretrain": {"triplets": "sometimes"}})
