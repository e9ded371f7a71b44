"""A built-in procedural abdominal CT phantom (MSD v1 layout) for ``medssl demo``.

Every volume is drawn from a numpy ``Generator`` seeded with ``(seed, case index)``, so the
dataset is reproducible without any download. Axes are canonical RAS+: axis 0 runs from the
patient's left to right, axis 1 from posterior to anterior, axis 2 from inferior to superior.

Content: a body cross-section (skin-level fat, an abdominal-wall muscle ring, a soft-tissue
cavity with mesenteric fat), labelled organs (1 liver on the right, 3 a crescent-shaped spleen
on the left, 2 both kidneys with a brighter cortex in perirenal fat), and unlabelled distractors
(vertebra with spinal canal, paraspinal muscles, aorta, vena cava, ribs, bowel gas). Organs
are smoothly deformed ellipsoids; they are painted liver, spleen, kidneys (a later one wins
where they meet) and the spine/muscles/vessels then win over all of them (label 0). Labels are
the exact painted regions; the image then gets a partial-volume blur and Gaussian noise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from medssl.data.atomic import atomic_path, write_json
from medssl.errors import ConfigError, DataError

GENERATOR_VERSION = 3
NAME = "medssl-phantom"
LABELS = {0: "background", 1: "liver", 2: "kidney", 3: "spleen"}
DEFAULT_SHAPE = (64, 64, 32)
DEFAULT_SPACING = (1.5, 1.5, 3.0)
PREFIX = "phantom"
# mean HU (before per-case jitter) of each tissue
HU = {
    "air": -1000.0, "fat": -100.0, "muscle": 50.0, "soft_tissue": 35.0, "liver": 62.0,
    "spleen": 56.0, "kidney_medulla": 125.0, "kidney_cortex": 185.0, "bone_cortex": 420.0,
    "bone_marrow": 230.0, "csf": 12.0, "aorta": 150.0, "vena_cava": 105.0, "gas": -920.0,
}
BLUR_SIGMA = 0.7
NOISE_SIGMA = (15.0, 25.0)


def phantom_affine(shape=DEFAULT_SHAPE, spacing=DEFAULT_SPACING) -> np.ndarray:
    """RAS voxel-to-world matrix with the given spacing, centred on the volume."""
    aff = np.diag([float(s) for s in spacing] + [1.0])
    aff[:3, 3] = [-(n - 1) / 2.0 * float(s) for n, s in zip(shape, spacing)]
    return aff


def _smooth(rng: np.random.Generator, shape, sigma) -> np.ndarray:
    """Unit-variance low-frequency noise (gaussian-filtered white noise)."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, mode="reflect")
    return f / (f.std() + 1e-6)


def _smooth_coarse(rng: np.random.Generator, shape, factor: int = 4) -> np.ndarray:
    """Very smooth unit-variance noise: filtered on a coarse grid, then zoomed up (fast)."""
    coarse = tuple(max(2, -(-n // factor)) for n in shape)
    f = ndimage.gaussian_filter(rng.standard_normal(coarse, dtype=np.float32), 1.0, mode="reflect")
    f = ndimage.zoom(f, [n / c for n, c in zip(shape, coarse)], order=1, mode="nearest", grid_mode=True)
    f = f[: shape[0], : shape[1], : shape[2]]
    return (f - f.mean()) / (f.std() + 1e-6)


def _ellipsoid(x, y, z, centre, radii, theta: float = 0.0) -> np.ndarray:
    """Implicit ellipsoid value (<= 1 inside), rotated by ``theta`` in the axial plane."""
    dx, dy, dz = x - centre[0], y - centre[1], z - centre[2]
    c, s = np.float32(np.cos(theta)), np.float32(np.sin(theta))
    u = c * dx + s * dy
    v = -s * dx + c * dy
    return (u / radii[0]) ** 2 + (v / radii[1]) ** 2 + (dz / radii[2]) ** 2


def _z_cut(z, rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    """Random superior/inferior truncation: the organ begins/ends at a random slice."""
    top = rng.uniform(hi - 0.25, hi + 0.4) if rng.random() < 0.5 else np.inf
    bottom = rng.uniform(lo - 0.4, lo + 0.25) if rng.random() < 0.5 else -np.inf
    return (z <= top) & (z >= bottom)


def generate_case(index: int, *, shape=DEFAULT_SHAPE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One phantom volume: ``(image int16 HU, label uint8)`` of ``shape`` (RAS axes).

    Deterministic in ``(seed, index, shape)``.
    """
    shape = tuple(int(n) for n in shape)
    rng = np.random.default_rng([int(seed), int(index), GENERATOR_VERSION])
    ax = [(np.arange(n, dtype=np.float32) + 0.5) / n * 2 - 1 for n in shape]
    x0, y0, z0 = np.meshgrid(*ax, indexing="ij")
    u = rng.uniform

    # smooth displacement field shared by all structures (organs deformed more than the body)
    amp = np.float32(u(0.035, 0.06))
    disp = [_smooth_coarse(rng, shape) * amp for _ in range(3)]
    x, y, z = x0 + disp[0], y0 + disp[1], z0 + disp[2]
    xb, yb = x0 + 0.4 * disp[0], y0 + 0.4 * disp[1]

    # body: superellipse cross-section, slowly varying along z
    bx = u(0.84, 0.95) * (1 + u(-0.06, 0.06) * z0)
    by = u(0.62, 0.74) * (1 + u(-0.05, 0.05) * z0)
    cy = u(-0.04, 0.04)
    p = u(2.0, 2.6)
    qb = np.abs(xb / bx) ** p + np.abs((yb - cy) / by) ** p
    t_fat, t_mus = u(0.07, 0.14), u(0.04, 0.07)
    body = qb <= 1.0
    inner = qb <= (1.0 - t_fat) ** p
    cavity = qb <= (1.0 - t_fat - t_mus) ** p
    y_post = cy - by * (1.0 - t_fat)  # posterior inner edge of the fat layer (per slice)

    shift = u(-6, 6)  # scanner/contrast-timing offset shared by soft tissues, plus a small own jitter
    jit = {k: v + shift + u(-4, 4) for k, v in HU.items() if k not in ("air", "gas")}
    jit["air"], jit["gas"] = HU["air"], HU["gas"]
    img = np.full(shape, jit["air"], dtype=np.float32)
    img[body] = jit["fat"] + 6 * _smooth(rng, shape, 2.0)[body]
    img[inner] = jit["muscle"]
    tex = _smooth(rng, shape, 3.0)
    mesentery = np.clip((_smooth(rng, shape, 2.5) - u(0.5, 0.9)) / 0.4, 0, 1)
    tissue = jit["soft_tissue"] + 8 * tex
    img[cavity] = (tissue * (1 - mesentery) + jit["fat"] * mesentery)[cavity]

    # organs: liver (right lobe + left lobe), spleen (crescent), kidneys (bean with hilum)
    lab = np.zeros(shape, dtype=np.uint8)
    liver_c = (u(0.28, 0.42), u(-0.05, 0.12), u(0.15, 0.45))
    liver = _ellipsoid(x, y, z, liver_c, (u(0.34, 0.44), u(0.36, 0.46), u(0.5, 0.75)), u(-0.3, 0.3)) <= 1
    left_c = (liver_c[0] - u(0.3, 0.42), liver_c[1] + u(0.12, 0.22), liver_c[2] + u(0.0, 0.15))
    liver |= _ellipsoid(x, y, z, left_c, (u(0.18, 0.26), u(0.12, 0.18), u(0.25, 0.4)), u(-0.4, 0.1)) <= 1
    if rng.random() < 0.85:
        liver &= _z_cut(z0, rng, liver_c[2] - 0.6, liver_c[2] + 0.6)
    sp_c = (u(-0.62, -0.5), u(-0.32, -0.18), u(0.1, 0.45))
    sp_r = (u(0.17, 0.22), u(0.26, 0.34), u(0.3, 0.44))
    sp_t = u(-0.7, -0.3)
    spleen = _ellipsoid(x, y, z, sp_c, sp_r, sp_t) <= 1
    # a shallow concave (hilar) cut: a crescent that stays thick enough to learn at 64 px
    cut_c = (sp_c[0] + u(0.2, 0.26), sp_c[1] + u(0.0, 0.06), sp_c[2])
    spleen &= _ellipsoid(x, y, z, cut_c, (sp_r[0] * 0.7, sp_r[1] * 0.6, sp_r[2] * 1.2), sp_t) > 1
    if rng.random() < 0.5:
        spleen &= _z_cut(z0, rng, sp_c[2] - sp_r[2], sp_c[2] + sp_r[2])
    lab[liver & cavity] = 1
    lab[spleen & cavity] = 3
    # patchy fat around liver and spleen (the fat planes a reader uses to find organ borders)
    halo = ndimage.binary_dilation(lab > 0, iterations=2) & cavity & (lab == 0)
    halo &= _smooth(rng, shape, 2.0) > u(-0.6, 0.0)
    img[halo] = jit["fat"] + 8 * tex[halo]
    kidney = np.zeros(shape, dtype=bool)
    cortex = np.zeros(shape, dtype=bool)
    for side in (1.0, -1.0):
        kc = (side * u(0.3, 0.4), u(-0.36, -0.24), u(-0.35, 0.05) + (0.08 if side < 0 else 0.0))
        kr = (u(0.13, 0.17), u(0.16, 0.21), u(0.3, 0.42))
        kt = side * u(-0.6, -0.2)
        qk = _ellipsoid(x, y, z, kc, kr, kt)
        hilum = _ellipsoid(x, y, z, (kc[0] - side * kr[0] * 1.05, kc[1] + 0.03, kc[2]),
                           (kr[0] * 0.55, kr[1] * 0.45, kr[2] * 0.45)) <= 1
        k = (qk <= 1) & ~hilum
        kidney |= k
        cortex |= k & (qk > u(0.4, 0.55))
    kidney &= cavity
    perirenal = ndimage.binary_dilation(kidney, iterations=2) & cavity & ~kidney
    img[perirenal & (lab == 0)] = jit["fat"] + 8 * tex[perirenal & (lab == 0)]
    lab[kidney] = 2

    # distractors (label 0): vertebra with canal, paraspinal muscles, aorta, vena cava
    sx, sy = u(-0.04, 0.04), y_post + u(0.26, 0.32)
    sr = np.float32(u(0.1, 0.13))
    dvert = np.hypot((x0 - sx) / sr, (y0 - sy) / (sr * 0.9))
    canal = np.hypot((x0 - sx) / (sr * 0.45), (y0 - (sy - sr * 1.35)) / (sr * 0.45))
    muscles = np.zeros(shape, dtype=bool)
    for side in (1.0, -1.0):
        muscles |= _ellipsoid(x0, y0, z0, (sx + side * sr * 1.7, sy - sr * 1.5, 0), (sr * 1.4, sr * 1.0, 9.0)) <= 1
    muscles &= inner
    aorta = np.hypot(x0 - (sx - sr * u(0.4, 0.8)), y0 - (sy + sr * 1.6)) <= u(0.045, 0.06)
    cava = _ellipsoid(x0, y0, z0, (sx + sr * u(0.9, 1.3), sy + sr * 1.5, 0), (u(0.06, 0.08), 0.04, 9.0)) <= 1
    bone = (dvert <= 1) | ((canal > 1) & (canal <= 1.7))
    img[muscles] = jit["muscle"] + 4 * tex[muscles]
    img[bone] = jit["bone_cortex"]
    img[dvert <= 0.8] = jit["bone_marrow"] + 25 * tex[dvert <= 0.8]
    img[canal <= 1] = jit["csf"]
    img[aorta] = jit["aorta"]
    img[cava] = jit["vena_cava"]
    lab[muscles | bone | (canal <= 1) | aorta | cava] = 0

    # ribs in the upper slices: small bone dots in the muscle wall, moving along z
    for _ in range(int(rng.integers(3, 7))):
        phi = u(-0.95, 0.95) * np.pi + (np.pi if rng.random() < 0.5 else 0.0)
        if np.sin(phi) > 0.2:  # no ribs in front of the belly
            continue
        zr = u(-0.1, 0.5)
        rad = (1.0 - t_fat - t_mus / 2)
        rx = rad * bx * np.cos(phi + 0.5 * (z0 - zr))
        ry = cy + rad * by * np.sin(phi + 0.5 * (z0 - zr))
        rib = (np.hypot(x0 - rx, y0 - ry) <= 0.04) & (z0 >= zr) & inner
        img[rib] = jit["bone_cortex"]
        lab[rib] = 0

    # organ intensities (from the final label map, so labels and image agree exactly)
    fine = _smooth(rng, shape, 1.2)
    liv, spl, kid = lab == 1, lab == 3, lab == 2
    img[liv] = jit["liver"] + 6 * fine[liv] + 5 * tex[liv]
    img[spl] = jit["spleen"] + 5 * fine[spl] + 3 * tex[spl]
    img[kid] = jit["kidney_medulla"] + 8 * fine[kid]
    kc_ = kid & cortex
    img[kc_] = jit["kidney_cortex"] + 8 * fine[kc_]

    # bowel gas, kept away from organs so that blurred organ voxels stay soft-tissue-like
    near = ndimage.binary_dilation(lab > 0, iterations=3)
    gas = np.zeros(shape, dtype=bool)
    for _ in range(int(rng.integers(2, 6))):
        c = (u(-0.4, 0.4), u(0.0, 0.45) + cy, u(-0.9, 0.9))
        gas |= _ellipsoid(x, y, z, c, (u(0.03, 0.07), u(0.03, 0.06), u(0.05, 0.15)), u(0, 3)) <= 1
    gas &= cavity & ~near & (lab == 0) & ~muscles & ~bone & ~aorta & ~cava
    img[gas] = jit["gas"]

    img = ndimage.gaussian_filter(img, BLUR_SIGMA, mode="nearest")
    img += rng.standard_normal(shape, dtype=np.float32) * np.float32(u(*NOISE_SIGMA))
    return np.clip(np.rint(img), -1024, 3071).astype(np.int16), lab


def _params(n_cases, shape, spacing, seed, n_unlabelled) -> dict:
    if len(tuple(shape)) != 3 or any(int(n) < 16 for n in shape):
        raise ConfigError(f"phantom shape: expected 3 sizes >= 16, got {tuple(shape)}")
    if len(tuple(spacing)) != 3 or any(not float(s) > 0 for s in spacing):
        raise ConfigError(f"phantom spacing: expected 3 positive values, got {tuple(spacing)}")
    if int(n_cases) < 1:
        raise ConfigError(f"phantom n_cases: must be >= 1, got {n_cases}")
    if int(n_unlabelled) < 0:
        raise ConfigError(f"phantom n_unlabelled: must be >= 0, got {n_unlabelled}")
    return {"generator": "medssl.data.phantom", "version": GENERATOR_VERSION, "n_cases": int(n_cases),
            "shape": [int(n) for n in shape], "spacing": [float(s) for s in spacing], "seed": int(seed),
            "n_unlabelled": int(n_unlabelled)}


def _is_complete(root: Path, meta: dict, params: dict) -> bool:
    if meta.get("phantom") != params:
        return False
    files = [e[k] for e in meta.get("training", []) for k in ("image", "label")] + list(meta.get("test", []))
    return all((root / f.removeprefix("./")).is_file() for f in files)


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(array, affine)
    img.set_data_dtype(array.dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_slope_inter(1, 0)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


def write_phantom_dataset(
    root: str | os.PathLike,
    *,
    n_cases: int = 16,
    shape=DEFAULT_SHAPE,
    spacing=DEFAULT_SPACING,
    seed: int = 0,
    n_unlabelled: int = 0,
) -> Path:
    """Write (or reuse) a phantom CT dataset in MSD v1 layout under ``root`` and return ``root``.

    ``n_cases`` labelled volumes go to imagesTr/labelsTr, ``n_unlabelled`` extra images to
    imagesTs (listed under ``test``). Files are written atomically and dataset.json last, so an
    interrupted run is redone; a folder already holding a complete phantom with the same
    parameters (dataset.json ``phantom`` key) is returned untouched.
    """
    root = Path(root)
    params = _params(n_cases, shape, spacing, seed, n_unlabelled)
    js = root / "dataset.json"
    if js.is_file():
        try:
            meta = json.loads(js.read_text())
        except (OSError, json.JSONDecodeError):
            meta = None
        if not isinstance(meta, dict) or "phantom" not in meta:
            raise DataError(f"{js}: the folder holds another dataset; choose an empty folder for the phantom")
        if _is_complete(root, meta, params):
            return root
        js.unlink()  # from now on the folder is incomplete until dataset.json is rewritten
    root.mkdir(parents=True, exist_ok=True)

    shape, spacing = tuple(params["shape"]), tuple(params["spacing"])
    affine = phantom_affine(shape, spacing)
    total = params["n_cases"] + params["n_unlabelled"]
    width = max(3, len(str(total - 1)))
    training, test, keep = [], [], set()
    for i in range(total):
        name = f"{PREFIX}_{i:0{width}d}.nii.gz"
        image, label = generate_case(i, shape=shape, seed=params["seed"])
        if i < params["n_cases"]:
            _save(image, affine, root / "imagesTr" / name)
            _save(label, affine, root / "labelsTr" / name)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
            keep |= {f"imagesTr/{name}", f"labelsTr/{name}"}
        else:
            _save(image, affine, root / "imagesTs" / name)
            test.append(f"./imagesTs/{name}")
            keep.add(f"imagesTs/{name}")
    for folder in ("imagesTr", "labelsTr", "imagesTs"):  # stale phantom files and interrupted temp files
        for f in (root / folder).glob(f"*{PREFIX}_*.nii.gz"):
            if f"{folder}/{f.name}" not in keep:
                f.unlink()
    for f in root.glob(".dataset.json.*"):
        f.unlink()
    meta = {
        "name": NAME,
        "description": "Procedural abdominal CT phantom generated by medssl (no download needed)",
        "reference": "medssl", "licence": "CC0", "release": f"{GENERATOR_VERSION}.0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {str(k): v for k, v in LABELS.items()},
        "numTraining": len(training), "numTest": len(test),
        "training": training, "test": test,
        "phantom": params,
    }
    write_json(js, meta, indent=2)
    return root

