"""KAF keypoints: SIFT detection, exact coordinate transport through augmentation (docs/kaf.md#keypoints), the per-slice
keypoint cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from medssl.config import AugConfig, DataConfig
from medssl.data.augment import BatchAugment, make_generator
from medssl.data.slicing import SliceFit
from medssl.models.kaf import (
    Keypoints,
    KeypointSettings,
    KeypointStore,
    augment_with_keypoints,
    crop_points,
    detect_batch,
    detect_keypoints,
    fit_points,
    flip_points,
    pad_points,
    transport_points,
)

H = W = 64
SPATIAL_ONLY = dict(intensity_prob=0.0, noise_prob=0.0)
AUGS = {
    "flip": AugConfig(flip_prob=0.5, rotate_prob=0, scale_prob=0, elastic_prob=0, **SPATIAL_ONLY),
    "rotation": AugConfig(flip_prob=0, rotate_prob=1, rotate_deg=180, scale_prob=0, elastic_prob=0, **SPATIAL_ONLY),
    "zoom": AugConfig(flip_prob=0, rotate_prob=0, scale_prob=1, scale_range=[0.7, 1.3], elastic_prob=0,
                      **SPATIAL_ONLY),
    "elastic": AugConfig(flip_prob=0, rotate_prob=0, scale_prob=0, elastic_prob=1, elastic_magnitude=[2.0, 4.0],
                         elastic_spacing=32, **SPATIAL_ONLY),
    "elastic_default": AugConfig(flip_prob=0, rotate_prob=0, scale_prob=0, elastic_prob=1, **SPATIAL_ONLY),
    "all": AugConfig(flip_prob=0.5, rotate_prob=1, rotate_deg=180, scale_prob=1, scale_range=[0.7, 1.3],
                     elastic_prob=1, elastic_magnitude=[2.0, 4.0], elastic_spacing=32, **SPATIAL_ONLY),
}


def _dots(xy: torch.Tensor, h: int = H, w: int = W, sigma: float = 1.5) -> torch.Tensor:
    """(B, 2) (x, y) -> (B, 1, H, W) images, one Gaussian dot each."""
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    d2 = (xx[None] - xy[:, 0, None, None]) ** 2 + (yy[None] - xy[:, 1, None, None]) ** 2
    return torch.exp(-d2 / (2 * sigma**2))[:, None]


def _centroid(img: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) -> (B, 2) intensity centroids (x, y)."""
    m = img[:, 0].clamp_min(0)
    yy, xx = torch.meshgrid(torch.arange(img.shape[-2], dtype=torch.float32),
                            torch.arange(img.shape[-1], dtype=torch.float32), indexing="ij")
    s = m.sum((1, 2))
    return torch.stack([(m * xx).sum((1, 2)) / s, (m * yy).sum((1, 2)) / s], 1)


# --------------------------------------------------------------------------------------- augmentation
def test_apply_is_bit_identical_to_call():
    """The additive API draws exactly what ``__call__`` draws: existing runs are unchanged."""
    aug = BatchAugment(AugConfig(elastic_prob=1.0))
    x = torch.randn(4, 1, H, W)
    y = torch.randint(0, 3, (4, H, W))
    a_img, a_lab = aug(x, y, make_generator(7))
    b_img, b_lab, warp = aug.apply(x, y, make_generator(7))
    assert torch.equal(a_img, b_img) and torch.equal(a_lab, b_lab) and warp.disp is not None
    kp = Keypoints(torch.rand(4, 5, 2) * 60, torch.ones(4, 5, dtype=torch.bool))
    c_img, c_lab, _ = augment_with_keypoints(aug, x, y, kp, make_generator(7))
    assert torch.equal(a_img, c_img) and torch.equal(a_lab, c_lab)


@pytest.mark.parametrize("name", list(AUGS))
def test_bright_dot_stays_under_transported_keypoint(name):
    """docs/kaf.md#exact-transport: a Gaussian dot (sigma 1.5) at p, warped, has its centroid within 0.5 px of the
    transported p, over 100 random draws. Keypoint 0 of each sample is the dot (regression for the released code's keypoint-0 defect)."""
    b = 100
    g = torch.Generator().manual_seed(1)
    dot = 18 + torch.rand(b, 2, generator=g) * 28
    others = torch.rand(b, 7, 2, generator=g) * (W - 1)
    kp = Keypoints(torch.cat([dot[:, None], others], 1), torch.ones(b, 8, dtype=torch.bool))
    img, _, out = augment_with_keypoints(BatchAugment(AUGS[name]), _dots(dot), None, kp, make_generator(3))
    moved = out.xy[:, 0]
    inner = out.valid[:, 0] & ((moved >= 6) & (moved <= W - 7)).all(1)  # whole dot inside the image
    assert inner.sum() >= 80
    err = (_centroid(img) - moved).norm(dim=1)[inner]
    assert err.max() < 0.5, f"{name}: worst centroid error {err.max():.3f} px"
    if name != "flip":  # the transform did something
        assert (moved - dot).norm(dim=1).max() > 1


def test_affine_round_trip_within_1e4_px():
    aug = BatchAugment(AugConfig(flip_prob=0.5, rotate_prob=1, rotate_deg=180, scale_prob=1,
                                 scale_range=[0.7, 1.3], elastic_prob=0, **SPATIAL_ONLY))
    x = torch.zeros(16, 1, H, W)
    _, _, warp = aug.apply(x, None, make_generator(5))
    p = torch.rand(16, 30, 2, dtype=torch.float64) * (W - 1)
    o, _ = transport_points(warp, p, torch.ones(16, 30, dtype=torch.bool))
    # map the output points back through the image's own sampling map (normalised, align_corners=False)
    on = (2 * o + 1) / W - 1
    theta = warp.theta.double()
    back = torch.einsum("bij,bnj->bni", theta[:, :, :2], on) + theta[:, None, :, 2]
    back = ((back + 1) * W - 1) / 2
    assert (back - p).abs().max() < 1e-4


def test_elastic_inversion_solves_the_sampling_grid():
    """Independent check: interpolate the sampling grid actually used by grid_sample at the transported
    point (scipy, bilinear between pixel centres); it must land on the original point."""
    aug = BatchAugment(AugConfig(flip_prob=0.5, rotate_prob=1, rotate_deg=30, scale_prob=1, elastic_prob=1,
                                 elastic_magnitude=[2.0, 4.0], elastic_spacing=24, **SPATIAL_ONLY))
    x = torch.zeros(4, 1, H, W)
    _, _, warp = aug.apply(x, None, make_generator(11))
    p = 12 + torch.rand(4, 40, 2, dtype=torch.float64) * 40
    o, ok = transport_points(warp, p, torch.ones(4, 40, dtype=torch.bool))
    grid = F.affine_grid(warp.theta, [4, 1, H, W], align_corners=False) + warp.disp  # (B, H, W, 2)
    grid_px = ((grid.double() + 1) * W - 1) / 2
    for b in range(4):
        coords = [o[b, ok[b], 1].numpy(), o[b, ok[b], 0].numpy()]  # (row, col)
        back = np.stack([ndimage.map_coordinates(grid_px[b, :, :, c].numpy(), coords, order=1) for c in (0, 1)], 1)
        assert np.abs(back - p[b, ok[b]].numpy()).max() < 1e-3
    assert ok.float().mean() > 0.8


def test_points_leaving_the_field_of_view_are_dropped():
    aug = BatchAugment(AugConfig(flip_prob=0, rotate_prob=0, scale_prob=1, scale_range=[1.3, 1.3],
                                 elastic_prob=0, **SPATIAL_ONLY))  # zoom in by 1.3 about the centre
    p = torch.tensor([[[0.5, 0.5], [31.5, 31.5], [63.0, 40.0], [20.0, 20.0]]])
    valid = torch.tensor([[True, True, True, False]])
    _, _, out = augment_with_keypoints(aug, torch.zeros(1, 1, H, W), None, Keypoints(p, valid), make_generator(0))
    assert out.valid.tolist() == [[False, True, False, False]]  # corners leave; padding stays invalid
    torch.testing.assert_close(out.xy[0, 1], torch.tensor([31.5, 31.5]), atol=1e-5, rtol=0)


def test_mirror_crop_pad_and_fit_are_exact():
    rng = np.random.default_rng(0)
    img = np.zeros((40, 50), np.float32)
    pts = np.stack([rng.integers(0, 50, 20), rng.integers(0, 40, 20)], 1)  # (x, y) integer pixels
    img[pts[:, 1], pts[:, 0]] = np.arange(1, 21)
    xy = torch.as_tensor(pts, dtype=torch.float32)
    valid = torch.ones(20, dtype=torch.bool)

    def value_at(a, q):
        return a[q[:, 1].round().long().numpy(), q[:, 0].round().long().numpy()]

    for axis in (0, 1):
        assert (value_at(np.flip(img, axis), flip_points(xy, (40, 50), axis)) == np.arange(1, 21)).all()
    padded = np.pad(img, ((3, 5), (7, 2)))
    assert (value_at(padded, pad_points(xy, (7, 3))) == np.arange(1, 21)).all()
    crop, ok = crop_points(xy, valid, (10, 5), (30, 30))
    inside = (pts[:, 0] >= 10) & (pts[:, 0] < 40) & (pts[:, 1] >= 5) & (pts[:, 1] < 35)
    assert ok.numpy().tolist() == inside.tolist()
    assert (value_at(img[5:35, 10:40], crop[ok]) == np.arange(1, 21)[inside]).all()
    # the slice fit (pad only, then rescale + pad): a dot follows fit_points
    for fit in (SliceFit(40, 50, 64, "pad"), SliceFit(40, 50, 32, "resize")):
        dots = _dots(torch.tensor([[21.3, 17.8]]), 40, 50, sigma=2.5)[0, 0].numpy()
        out = torch.from_numpy(fit.forward(dots))[None, None]
        q = fit_points(fit, torch.tensor([[21.3, 17.8]]))
        tol = 1e-3 if fit.scale == 1 else 0.3
        assert (_centroid(out) - q).norm() < tol


# --------------------------------------------------------------------------------------- detection
def _hippocampus_slice(root) -> np.ndarray:
    import nibabel as nib

    path = sorted((root / "imagesTr").glob("hippocampus_*.nii.gz"))[0]
    vol = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    return vol[:, :, vol.shape[2] // 2]


def test_sift_on_a_real_slice(hippocampus_root):
    img = _hippocampus_slice(hippocampus_root)
    xy1, d1 = detect_keypoints(img)
    xy4, d4 = detect_keypoints(img, upsample=4)
    assert 10 <= len(xy1) < len(xy4)  # ~28 native, ~104 after 4x upsampling
    for xy in (xy1, xy4):
        assert xy.dtype == np.float32 and (xy >= 0).all()
        assert (xy[:, 0] <= img.shape[1] - 1).all() and (xy[:, 1] <= img.shape[0] - 1).all()
    assert d4.shape == (len(xy4), 128) and (d4 == np.round(d4)).all() and d4.max() <= 255  # uint8-exact
    again, _ = detect_keypoints(img, upsample=4)
    np.testing.assert_array_equal(again, xy4)  # deterministic
    no_desc, none = detect_keypoints(img, upsample=4, with_desc=False)  # detection only: the same points
    np.testing.assert_array_equal(no_desc, xy4)
    assert none is None
    dd, _ = detect_keypoints(img, upsample=4, dedupe=True)
    cells = np.floor(dd + 0.5)
    assert len(np.unique(cells, axis=0)) == len(dd) < len(xy4)
    capped, _ = detect_keypoints(img, upsample=4, max_keypoints=16)
    np.testing.assert_array_equal(capped, xy4[:16])  # the strongest 16


def test_detect_batch_pads_and_handles_a_blank_slice(hippocampus_root):
    img = _hippocampus_slice(hippocampus_root)
    batch = np.stack([img, np.zeros_like(img), img[::-1].copy()])
    kp = detect_batch(torch.from_numpy(batch)[:, None], KeypointSettings(upsample=2))
    counts = kp.counts().tolist()
    assert counts[1] == 0 and counts[0] > 0 and counts[2] > 0 and kp.n == max(counts)
    assert not kp.valid[1].any() and kp.desc.shape == (3, kp.n, 128)
    np.testing.assert_array_equal(kp.sample(0)[0], detect_keypoints(img, upsample=2)[0])


def test_keypoint_store_caches_per_slice(phantom_root, tmp_path):
    from medssl.data.cache import prepare

    cache = prepare(DataConfig(path=str(phantom_root), size=32, cache_dir=str(tmp_path)), progress=False)
    settings = KeypointSettings(upsample=4, max_keypoints=32)
    store = KeypointStore(cache, settings)
    rows = [0, 5, len(cache.case_ids) - 1]
    kp = store.get(rows)
    for i, r in enumerate(rows):
        xy, desc = detect_keypoints(np.asarray(cache.images[r]), settings)
        np.testing.assert_array_equal(kp.sample(i)[0], xy)
        np.testing.assert_array_equal(kp.sample(i)[1], desc)
    files = sorted(store.folder.glob("*.npz"))
    assert files and all(not f.name.startswith(".") for f in files)
    fresh = KeypointStore(cache, settings).get(rows)  # read back from disk
    assert torch.equal(fresh.xy, kp.xy) and torch.equal(fresh.valid, kp.valid) and torch.equal(fresh.desc, kp.desc)
    assert kp.counts().sum() > 0
