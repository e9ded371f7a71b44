"""Tiny synthetic datasets for tests (written under a pytest ``tmp_path``).

Other test modules may import these helpers: ``from synth import make_msd`` (tests/conftest.py puts
the tests folder on ``sys.path``) or ``from tests.synth import ...``.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np

SHAPE = (12, 10, 8)
LAS = np.array([[-2.0, 0, 0, 30.0], [0, 1.5, 0, -10.0], [0, 0, 3.0, 5.0], [0, 0, 0, 1]])
LPS = np.array([[-1.0, 0, 0, 20.0], [0, -1.0, 0, 15.0], [0, 0, 2.0, -7.0], [0, 0, 0, 1]])
RAS = np.diag([1.0, 1.0, 1.0, 1.0])


def blob_pair(shape=SHAPE, n_labels: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An MRI-like float image with noise and a label map of ``n_labels`` boxes (values 1..n)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(100.0, 5.0, size=shape).astype(np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    x, y, z = shape
    for k in range(1, n_labels + 1):
        sl = (slice(k * x // (n_labels + 2), (k + 1) * x // (n_labels + 2)), slice(y // 4, 3 * y // 4), slice(1, z - 1))
        label[sl] = k
        image[sl] += 50.0 * k
    return image, label


def write_nifti(path: str | Path, array: np.ndarray, affine: np.ndarray | None = None, dtype=None) -> Path:
    """Write ``array`` as NIfTI (default affine: 1 mm RAS identity)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(array) if dtype is None else np.asarray(array).astype(dtype)
    img = nib.Nifti1Image(arr, RAS if affine is None else np.asarray(affine, dtype=np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    nib.save(img, str(path))
    return path


def truncate_file(path: str | Path, keep: float = 0.5) -> Path:
    """Cut a (gzip) file to a fraction of its size, as an interrupted download would."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep))])
    return path


def write_corrupt_gz(path: str | Path) -> Path:
    """A valid gzip stream whose content is not a NIfTI file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(b"this is not a nifti header" * 20))
    return path


def make_msd(
    root: str | Path,
    n_cases: int = 3,
    *,
    shape=SHAPE,
    n_labels: int = 2,
    modality: str = "MRI",
    n_unlabelled: int = 0,
    affine: np.ndarray | None = None,
    name: str = "Synth",
) -> Path:
    """MSD v1 folder: imagesTr/labelsTr ``case_XXX.nii.gz`` + dataset.json; plus unlisted unlabelled images."""
    root = Path(root)
    training = []
    for i in range(n_cases):
        image, label = blob_pair(shape, n_labels, seed=i)
        cid = f"case_{i:03d}"
        write_nifti(root / "imagesTr" / f"{cid}.nii.gz", image, affine)
        write_nifti(root / "labelsTr" / f"{cid}.nii.gz", label, affine)
        training.append({"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"})
    for j in range(n_unlabelled):
        image, _ = blob_pair(shape, n_labels, seed=100 + j)
        write_nifti(root / "imagesTr" / f"extra_{j:03d}.nii.gz", image, affine)
    meta = {
        "name": name,
        "tensorImageSize": "3D",
        "modality": {"0": modality},
        "labels": {str(k): ("background" if k == 0 else f"class{k}") for k in range(n_labels + 1)},
        "numTraining": n_cases,
        "numTest": 0,
        "training": training,
        "test": [],
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return root


def make_msd_multichannel(root: str | Path, n_cases: int = 4, *, shape=SHAPE, informative: int = 1,
                           channels: tuple[str, ...] = ("T2", "ADC")) -> Path:
    """MSD folder of 4D images (X, Y, Z, C), as MSD Prostate/BrainTumour: only channel ``informative`` shows the
    labels (the blob image); the others are noise. Channel k's noise has mean 10 * k, so channels are told apart."""
    root = Path(root)
    make_msd(root, n_cases, shape=shape, modality=channels[0])
    meta = json.loads((root / "dataset.json").read_text())
    meta["modality"] = {str(k): name for k, name in enumerate(channels)}
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    for i in range(n_cases):
        image, _ = blob_pair(shape, seed=i)
        rng = np.random.default_rng(1000 + i)
        stack = [image if k == informative else rng.normal(10.0 * k, 5.0, size=shape).astype(np.float32)
                 for k in range(len(channels))]
        write_nifti(root / "imagesTr" / f"case_{i:03d}.nii.gz", np.stack(stack, axis=-1))
    return root


def make_nnunetv2(
    root: str | Path,
    n_cases: int = 2,
    *,
    shape=SHAPE,
    n_labels: int = 2,
    channel: str = "CT",
    n_test: int = 1,
    unlabelled: tuple[str, ...] = (),
) -> Path:
    """nnU-Net v2 folder: imagesTr/{CASE}_0000.nii.gz, labelsTr/{CASE}.nii.gz, imagesTs, dataset.json."""
    root = Path(root)
    for i in range(n_cases):
        image, label = blob_pair(shape, n_labels, seed=i)
        cid = f"pat{i:02d}"
        write_nifti(root / "imagesTr" / f"{cid}_0000.nii.gz", image)
        if cid not in unlabelled:
            write_nifti(root / "labelsTr" / f"{cid}.nii.gz", label)
    for j in range(n_test):
        image, _ = blob_pair(shape, n_labels, seed=50 + j)
        write_nifti(root / "imagesTs" / f"test{j:02d}_0000.nii.gz", image)
    meta = {
        "channel_names": {"0": channel},
        "labels": {("background" if k == 0 else f"organ{k}"): k for k in range(n_labels + 1)},
        "numTraining": n_cases,
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return root


def write_h5(path: str | Path, image: np.ndarray, label: np.ndarray | None = None, **attrs) -> Path:
    """One HDF5 file with ``image`` (and ``label``) datasets; ``attrs`` go on the file."""
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(str(path), "w") as fh:
        fh.create_dataset("image", data=image)
        if label is not None:
            fh.create_dataset("label", data=label)
        for k, v in attrs.items():
            fh.attrs[k] = v
    return path


def make_h5(
    root: str | Path,
    n_cases: int = 2,
    *,
    shape=SHAPE,
    n_labels: int = 3,
    label_names: str | None = '["background", "RV", "Myo", "LV"]',
    axes: str | None = None,
    spacing=None,
) -> Path:
    """Folder of ``patientNNN.h5`` files (labels named by a JSON ``labels`` attribute)."""
    root = Path(root)
    for i in range(n_cases):
        image, label = blob_pair(shape, n_labels, seed=i)
        attrs = {}
        if label_names is not None:
            attrs["labels"] = label_names
        if spacing is not None:
            attrs["spacing"] = np.asarray(spacing, dtype=np.float64)
        if axes == "zyx":
            image, label = image.transpose(2, 1, 0), label.transpose(2, 1, 0)
            attrs["axes"] = "zyx"
        write_h5(root / f"patient{i:03d}.h5", image / image.max(), label, **attrs)
    return root
