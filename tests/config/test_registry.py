"""``medssl.registry.Registry``, the one registry behind methods, option sections, backbones, SAM backends and
propagations, and the module functions that stay thin names for it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medssl.errors import ConfigError, DataError
from medssl.registry import Registry


def test_register_names_get_and_copy():
    reg = Registry("widget")

    @reg.register("b")
    def b():
        return "b"

    def a():
        return "a"

    assert reg.add("a", a) is a and b() == "b"  # the decorator hands the object back unchanged
    assert reg.names() == ["a", "b"] and len(reg) == 2
    assert "a" in reg and "c" not in reg and reg.get("b") is b
    assert reg.register("a")(a) is a  # the same object again: a no-op
    with pytest.raises(ValueError, match=r"widget 'a' is already registered \(with a\)"):
        reg.register("a")(b)
    assert reg.get("a") is a

    with pytest.raises(ConfigError) as err:
        reg.get("nope", what="config.widget")
    assert str(err.value) == "config.widget: unknown widget 'nope'; available: a, b"
    with pytest.raises(ConfigError, match=r"^widget: unknown widget 'c'"):  # what defaults to the kind
        reg.get("c")

    other = reg.copy()
    other.add("c", a)
    assert "c" in other and "c" not in reg  # independent entries
    assert other.get("a") is a and other.kind == "widget"


def test_custom_message():
    reg = Registry("sam backend", "{what}: expected one of {names}, got {name}")
    reg.add("x", object)
    with pytest.raises(ConfigError, match=r"^sam backend: expected one of x, got 'y'$"):
        reg.get("y")


def test_module_names_stay_thin_wrappers(monkeypatch):
    import medssl.methods  # noqa: F401  (registers every method)
    import medssl.models.registry as models
    from medssl.methods.registry import available_methods, method_class
    from medssl.models import available_backbones, build_model, register_backbone

    assert {"simclr", "pcl"} <= set(available_methods()) and method_class("simclr").name == "simclr"
    with pytest.raises(ConfigError) as err:
        method_class("nope")
    assert str(err.value).startswith("pretrain.method: unknown method 'nope'; available: ")
    assert "simclr" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"^model\.backbone: unknown backbone 'nope'; available: .*unet"):
        build_model("nope", in_channels=1, n_classes=2)

    monkeypatch.setattr(models, "_BACKBONES", models._BACKBONES.copy())

    def builder(*, in_channels, n_classes):
        return None

    assert register_backbone("toy")(builder) is builder and "toy" in available_backbones()
    with pytest.raises(ValueError, match="backbone 'toy' is already registered"):
        register_backbone("toy")(lambda **kw: None)
    monkeypatch.undo()
    assert "toy" not in available_backbones()  # the copy kept the registration in this test


def test_propagators_share_the_registry(monkeypatch):
    import medssl.sam.propagate as prop

    monkeypatch.setattr(prop, "_PROPAGATORS", prop._PROPAGATORS.copy())

    def run(slices, ann, cfg, segmenter, predictor):
        return np.zeros_like(slices, dtype=np.uint8), {}

    assert prop.register_propagator("toy", "a toy propagation")(run) is run
    assert "toy" in prop.propagation_backends() and {"hybrid", "register", "sam2"} <= set(prop.propagation_backends())
    with pytest.raises(ValueError, match="propagation 'toy' is already registered"):
        prop.register_propagator("toy", "another note")(run)
    with pytest.raises(ConfigError, match="'dense_prompt' needs backend"):
        prop.PropagateConfig(backend="toy", dense_prompt=True).validate()
    ann = prop.annotation_from_slice(np.pad(np.ones((3, 3), np.uint8), 2), 1, (7, 7, 4), 2)
    labels, info = prop.propagate_volume(np.zeros((7, 7, 4), np.float32), ann, prop.PropagateConfig(backend="toy"))
    assert info["note"] == "a toy propagation" and labels.shape == (7, 7, 4)


def test_removed_config_key_still_loads_and_unknown_keys_still_fail():
    from medssl.config import config_from_dict, load_config

    cfg = config_from_dict({"eval": {"save_predictions": True, "hd95": False}})  # an old run's config.yaml
    assert cfg.eval.hd95 is False and not hasattr(cfg.eval, "save_predictions")
    assert load_config("demo", ["eval.save_predictions=true"]).eval.batch_size == 32
    with pytest.raises(ConfigError, match="eval.bogus"):
        load_config("demo", ["eval.bogus=1"])


def _vol(shape=(4, 4, 3), shift=0.0, source="v.nii.gz"):
    from medssl.data.volume import Volume

    affine = np.eye(4)
    affine[0, 3] = shift
    return Volume(np.zeros(shape, np.uint8), affine, affine, shape, source=source)


def test_grid_mismatch_is_the_one_geometry_check():
    from medssl.data.readers import grid_mismatch
    from medssl.sam.inputs import check_pair

    img = _vol(source="img.nii.gz")
    assert grid_mismatch(_vol(), img) is None and grid_mismatch(_vol(shift=1e-4), img) is None
    shape = grid_mismatch(_vol((4, 4, 2), source="lab.nii.gz"), img)
    assert shape == "label lab.nii.gz has shape (4, 4, 2) but image img.nii.gz has shape (4, 4, 3)"
    moved = grid_mismatch(_vol(shift=0.5, source="p.nii.gz"), img, "prediction", "ground truth")
    assert moved.startswith("prediction p.nii.gz affine differs from ground truth img.nii.gz") and "0.5 mm" in moved
    with pytest.raises(DataError, match="^coarse mask c.nii.gz has shape"):
        check_pair(_vol((2, 2, 2), source="c.nii.gz"), img, "coarse mask")


def test_class_names_from_the_predictions_manifest(tmp_path):
    from medssl.evaluation.folders import manifest_names
    from medssl.sam.inputs import class_names_for

    (tmp_path / "predictions.json").write_text(json.dumps({"labels": {"0": "background", "2": "tumour"}}))
    assert manifest_names(tmp_path) == {0: "background", 2: "tumour"} and manifest_names(tmp_path / "x") == {}
    names = class_names_for(tmp_path, tmp_path / "img.nii.gz", None, {0, 3})
    assert names == {0: "background", 1: "class_1", 2: "tumour", 3: "class_3"}
    (tmp_path / "predictions.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="invalid predictions manifest"):
        class_names_for(tmp_path, tmp_path, None, set())


def test_console_prints_refine_and_propagation(capsys):
    from medssl.report.console import print_propagation, print_refine

    print_refine({"cases": ["a"], "stats": {"a": {"boxes": 3}},
                  "policy": {"classes": {"liver": {"choice": "union", "val_dice_keep": 0.5, "best_candidate": "union",
                                                   "val_dice_best": 0.6}}}}, "out/")
    out = capsys.readouterr().out
    assert "liver: union (validation Dice keep 0.500, union 0.600)" in out
    assert "refined 1 volume(s) (3 boxes) -> out/" in out
    assert "Dice before" not in out  # no table without labels
    print_propagation({"metrics": {"propagated": {"dice": {1: 0.9}, "dice_mean": 0.9}},
                       "stops": {1: {"forward": {"reason": "empty", "slice": 7}}}, "key_slices": {1: 4}}, "p.nii.gz")
    out = capsys.readouterr().out
    assert " propagated: 3D Dice mean 0.900 (1: 0.900)" in out and "class 1 stopped: forward empty at slice 7" in out
    assert "key slices {1: 4}; wrote p.nii.gz" in out
