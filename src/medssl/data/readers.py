"""Read one volume (NIfTI, DICOM series, HDF5) or one case (image + label) into canonical :class:`Volume`s.

Every reader loads the voxels eagerly, so a corrupt or truncated file is detected here
and reported as a one-line :class:`~medssl.errors.DataError` naming the file, never later
inside a data loader worker.

Conventions:
  * images come back as ``float32``; labels as ``uint8`` (values 0..255) or ``int16``;
  * a 4D file whose trailing dimensions are all 1 is squeezed to 3D; a 4D NIfTI image with C > 1 channels
    in its 4th dimension (the MSD layout of multi-modal data) gives the one ``channel`` asked for; any
    other non-3D array is rejected ("expected a 3D volume, got shape ...");
  * DICOM geometry (ITK, LPS) is converted to a RAS affine and then canonicalised like a
    NIfTI file; the "original" geometry of a DICOM volume is that RAS affine;
  * HDF5 files hold datasets ``image`` and ``label``. The stored array is taken as
    (X, Y, Z) unless ``axes="zyx"`` is passed or the dataset/file has an ``axes`` attribute
    (``"zyx"`` is what the SSL4MIS ACDC volumes use: (slices, H, W)). Optional attributes
    ``affine`` (4x4, RAS, for the (X, Y, Z) array) or ``spacing`` (3 floats, X/Y/Z order);
    without them the grid is 1 mm isotropic with an identity affine;
  * SSL4MIS per-slice HDF5 files ``<case>_slice_<K>.h5`` (2D ``image``/``label``, kind ``"h5slices"``)
    are restacked by K into one volume: the stack is what the whole (slices, H, W) volume file gives
    with ``axes="zyx"``; the slice files' ``spacing``/``affine`` attributes (of the first file) apply.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from medssl.data.cases import Case, DatasetInfo
from medssl.data.volume import Volume, from_nifti_image
from medssl.errors import DataError

log = logging.getLogger(__name__)

KINDS = ("nifti", "dicom", "h5")  # one file or folder each; "h5slices" (a stack of files) is read by read_slices
ROLES = ("image", "label")
AFFINE_TOL_MM = 1e-3
H5_SUFFIXES = (".h5", ".hdf5")
NIFTI_ENDINGS = (".nii.gz", ".nii")
SLICE_FILE = re.compile(r"^(?P<case>.+)_slice_(?P<k>\d+)\.(?:h5|hdf5)$", re.IGNORECASE)  # SSL4MIS per-slice file


def volume_stem(name: str, endings: tuple[str, ...] = NIFTI_ENDINGS + H5_SUFFIXES) -> str | None:
    """A file name without its volume ending (``.nii.gz``, ``.nii``, ``.h5``, ``.hdf5``), or None without one."""
    for end in endings:
        if name.endswith(end):
            return name[: -len(end)]
    return None


def slice_file(path: str | Path) -> tuple[str, int] | None:
    """``(case id, K)`` of an SSL4MIS per-slice file name ``<case>_slice_<K>.h5``, else None."""
    m = SLICE_FILE.match(Path(path).name)
    return (m["case"], int(m["k"])) if m else None


def guess_kind(path: str | Path) -> str:
    """``"dicom"`` for a folder, ``"h5"`` for .h5/.hdf5, else ``"nifti"``."""
    path = Path(path)
    if path.is_dir():
        return "dicom"
    if path.suffix.lower() in H5_SUFFIXES:
        return "h5"
    return "nifti"


def read_volume(path: str | Path, *, kind: str = "nifti", role: str = "image", axes: str | None = None,
                channel: int = 0) -> Volume:
    """Read one 3D volume into RAS+ orientation.

    Args:
        path: a .nii/.nii.gz file, a DICOM series folder, or an HDF5 file.
        kind: ``"nifti"``, ``"dicom"``, ``"h5"`` or ``"auto"`` (from the path).
        role: ``"image"`` (float32, must be finite) or ``"label"`` (integer values).
        axes: HDF5 only: ``"xyz"`` (default) or ``"zyx"`` storage order.
        channel: NIfTI images only: the channel of a 4D (X, Y, Z, C) file; must be 0 for anything else.
    """
    path = Path(path)
    if kind == "auto":
        kind = guess_kind(path)
    if kind not in KINDS:
        raise DataError(f"{path}: unknown volume kind {kind!r} (expected one of {', '.join(KINDS)})")
    if role not in ROLES:
        raise DataError(f"{path}: unknown role {role!r} (expected 'image' or 'label')")
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if channel and (kind != "nifti" or role != "image"):
        raise DataError(f"{path}: channel {channel} asked for (data.channel), but a {kind} {role} has one channel")
    if kind == "nifti":
        vol = _read_nifti(path, channel if role == "image" else None)
    elif kind == "dicom":
        vol = _read_dicom(path)
    else:
        vol = _read_h5(path, role, axes)
    vol.array = _finish_array(vol.array, path, role)
    return vol


def _shape_error(path: Path, shape) -> DataError:
    return DataError(f"{path}: expected a 3D volume, got shape {tuple(int(s) for s in shape)}")


def _check_shape(path: Path, shape) -> None:
    """Accept 3D, or more dimensions whose trailing ones are all 1."""
    if len(shape) < 3 or any(int(s) != 1 for s in shape[3:]):
        raise _shape_error(path, shape)


def _read_nifti(path: Path, channel: int | None = None) -> Volume:
    """``channel``: None for a label (3D only); else the channel of a 4D multi-channel image (0 for a 3D one)."""
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for bad files
        raise DataError(f"{path}: cannot read NIfTI file ({type(exc).__name__}: {exc})") from None
    shape = tuple(int(s) for s in img.shape)
    n_channels = shape[3] if len(shape) == 4 else 1
    if channel is not None and n_channels > 1:
        if channel >= n_channels:
            raise DataError(f"{path}: channel {channel} asked for (data.channel), but the image has {n_channels}")
        shape = shape[:3]
    elif channel:
        raise DataError(f"{path}: channel {channel} asked for (data.channel), but the image has one channel")
    _check_shape(path, shape)
    try:
        if channel is not None and n_channels > 1:  # one channel of (X, Y, Z, C), same geometry
            img = nib.Nifti1Image(np.asanyarray(img.dataobj[..., channel]), img.affine, img.header)
        vol = from_nifti_image(img, source=str(path))
    except Exception as exc:  # truncated gzip: EOFError, zlib.error, OSError ...
        raise DataError(f"{path}: corrupt or truncated file ({type(exc).__name__}: {exc})") from None
    if vol.array.ndim > 3:
        vol.array = np.ascontiguousarray(vol.array.reshape(vol.array.shape[:3]))
        vol.original_shape = tuple(vol.original_shape[:3])
    return vol


def dicom_affine(origin, spacing, direction) -> np.ndarray:
    """RAS voxel-to-world affine for an (X, Y, Z)-indexed array from ITK's LPS geometry."""
    direction = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = lps_to_ras @ direction @ np.diag(np.asarray(spacing, dtype=np.float64))
    affine[:3, 3] = lps_to_ras @ np.asarray(origin, dtype=np.float64)
    return affine


def _read_dicom(path: Path) -> Volume:
    import SimpleITK as sitk

    if not path.is_dir():
        raise DataError(f"{path}: a DICOM series must be a folder of slice files")
    try:
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
    except Exception as exc:
        raise DataError(f"{path}: cannot scan DICOM folder ({exc})") from None
    if not series:
        raise DataError(f"{path}: no DICOM series found in the folder")
    files_per_series = {s: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), s) for s in series}
    chosen = max(series, key=lambda s: len(files_per_series[s]))
    if len(series) > 1:
        log.warning("%s holds %d DICOM series; reading the largest (%s)", path, len(series), chosen)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files_per_series[chosen])
    try:
        itk = reader.Execute()
        data = sitk.GetArrayFromImage(itk)  # (Z, Y, X)
    except Exception as exc:
        raise DataError(f"{path}: cannot read DICOM series ({type(exc).__name__}: {str(exc).strip().splitlines()[-1]})") from None
    if itk.GetDimension() != 3 or itk.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(f"{path}: expected a single-channel 3D DICOM series, got size {itk.GetSize()}")
    data = np.ascontiguousarray(np.transpose(data, (2, 1, 0)))
    affine = dicom_affine(itk.GetOrigin(), itk.GetSpacing(), itk.GetDirection())
    vol = from_nifti_image(nib.Nifti1Image(data, affine), source=str(path))
    vol.meta.update(dicom_series=chosen, n_series=len(series), n_files=len(files_per_series[chosen]))
    return vol


def _h5_attr(dset, fh, name):
    if name in dset.attrs:
        return dset.attrs[name]
    if name in fh.attrs:
        return fh.attrs[name]
    return None


def _h5_dataset(path: Path, role: str) -> tuple[np.ndarray, dict]:
    """The ``role`` dataset of an HDF5 file and its ``axes``/``spacing``/``affine`` attributes (or the file's)."""
    import h5py

    try:
        with h5py.File(str(path), "r") as fh:
            if role not in fh:
                raise DataError(f"{path}: no '{role}' dataset in HDF5 file (keys: {', '.join(sorted(fh.keys()))})")
            dset = fh[role]
            return np.asarray(dset[()]), {k: _h5_attr(dset, fh, k) for k in ("axes", "spacing", "affine")}
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: cannot read HDF5 file ({type(exc).__name__}: {exc})") from None


def _read_h5(path: Path, role: str, axes: str | None) -> Volume:
    data, attrs = _h5_dataset(path, role)
    return _h5_volume(path, data, attrs, axes)


def _h5_volume(path: Path, data: np.ndarray, attrs: dict, axes: str | None) -> Volume:
    attr_axes, spacing, affine = attrs["axes"], attrs["spacing"], attrs["affine"]
    if axes is None and attr_axes is not None:
        axes = attr_axes.decode() if isinstance(attr_axes, bytes) else str(attr_axes)
    axes = (axes or "xyz").lower()
    if axes not in ("xyz", "zyx"):
        raise DataError(f"{path}: unsupported HDF5 axes {axes!r} (expected 'xyz' or 'zyx')")
    _check_shape(path, data.shape)
    data = data.reshape(data.shape[:3])
    if axes == "zyx":
        data = np.ascontiguousarray(np.transpose(data, (2, 1, 0)))
    if affine is not None:
        aff = np.asarray(affine, dtype=np.float64)
        if aff.shape != (4, 4):
            raise DataError(f"{path}: HDF5 attribute 'affine' must be 4x4, got shape {aff.shape}")
    elif spacing is not None:
        sp = np.asarray(spacing, dtype=np.float64).ravel()
        if sp.shape != (3,) or not np.all(sp > 0):
            raise DataError(f"{path}: HDF5 attribute 'spacing' must be 3 positive numbers, got {sp.tolist()}")
        aff = np.diag([*sp, 1.0])
    else:
        aff = np.eye(4)
    vol = from_nifti_image(nib.Nifti1Image(data, aff), source=str(path))
    vol.meta.update(h5_axes=axes, h5_has_geometry=affine is not None or spacing is not None)
    return vol


def read_slices(paths: Sequence[str | Path], *, role: str = "image") -> Volume:
    """Restack SSL4MIS per-slice files ``<case>_slice_<K>.h5`` (one case, any order) into one volume.

    Every file must hold a 2D ``role`` dataset of one shape, and the K must run without a gap; each problem
    is a one-line :class:`DataError` naming the file.
    """
    if role not in ROLES:
        raise DataError(f"{paths[0] if paths else '?'}: unknown role {role!r} (expected 'image' or 'label')")
    numbered = []
    for p in map(Path, paths):
        parsed = slice_file(p)
        if parsed is None:
            raise DataError(f"{p}: not a per-slice file name '<case>_slice_<K>.h5'")
        numbered.append((parsed[1], p))
    if not numbered:
        raise DataError("no per-slice HDF5 files to stack")
    numbered.sort()
    case = slice_file(numbered[0][1])[0]
    for (k0, p0), (k1, p1) in zip(numbered, numbered[1:]):
        if k1 != k0 + 1:
            what = f"slice {k0} appears twice" if k1 == k0 else f"slice {k0 + 1} is missing"
            raise DataError(f"{p1}: {what} (case {case}, slices {numbered[0][0]}..{numbered[-1][0]})")
    slices, attrs, first = [], None, None
    for _, p in numbered:
        if not p.is_file():
            raise DataError(f"{p}: file not found")
        data, a = _h5_dataset(p, role)
        if data.ndim != 2:
            raise DataError(f"{p}: expected a 2D slice, got shape {tuple(int(s) for s in data.shape)}")
        if first is None:
            first, attrs = p, a
        elif data.shape != slices[0].shape:
            raise DataError(f"{p}: slice shape {data.shape} differs from {tuple(slices[0].shape)} of {first.name}")
        slices.append(data)
    source = first.with_name(f"{case}_slice_*{first.suffix}")
    vol = _h5_volume(source, np.stack(slices), {**attrs, "axes": None}, "zyx")  # (K, H, W): slices first
    vol.array = _finish_array(vol.array, source, role)
    vol.meta.update(n_slice_files=len(slices))
    return vol


def _finish_array(array: np.ndarray, path: Path, role: str) -> np.ndarray:
    """Cast to float32 (images, must be finite) or to a small integer type (labels)."""
    if role == "image":
        out = np.asarray(array, dtype=np.float32)
        bad = int(np.size(out) - np.count_nonzero(np.isfinite(out)))
        if bad:
            raise DataError(f"{path}: image contains {bad} non-finite voxels (NaN/Inf)")
        return np.ascontiguousarray(out)
    arr = np.asarray(array)
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.floating) and arr.dtype != bool:
            raise DataError(f"{path}: label has unsupported dtype {arr.dtype}")
        arr_f = arr.astype(np.float64)
        finite = np.isfinite(arr_f)
        if not finite.all() or np.any(arr_f != np.round(arr_f)):
            n_bad = int((~finite).sum() + np.count_nonzero(arr_f[finite] != np.round(arr_f[finite])))
            raise DataError(f"{path}: label contains {n_bad} non-integer values")
        arr = arr_f
    if arr.size == 0:
        return arr.astype(np.uint8)
    lo, hi = arr.min(), arr.max()
    if lo >= 0 and hi <= 255:
        return np.ascontiguousarray(arr.astype(np.uint8))
    if lo >= np.iinfo(np.int16).min and hi <= np.iinfo(np.int16).max:
        return np.ascontiguousarray(arr.astype(np.int16))
    raise DataError(f"{path}: label values {int(lo)}..{int(hi)} do not fit in int16")


def label_kind(case: Case) -> str:
    """Reader kind of a case's label file (h5 labels live in the image file)."""
    if case.kind == "h5":
        return "h5"
    return "h5" if case.label is not None and Path(case.label).suffix.lower() in H5_SUFFIXES else "nifti"


def grid_mismatch(vol: Volume, ref: Volume, what: str = "label", ref_what: str = "image") -> str | None:
    """Why ``vol`` (a ``what``) is not on the grid of ``ref``: another canonical shape, or an affine more than
    :data:`AFFINE_TOL_MM` away; None when it is on it."""
    if vol.shape != ref.shape:
        return f"{what} {vol.source} has shape {vol.shape} but {ref_what} {ref.source} has shape {ref.shape}"
    diff = float(np.abs(np.asarray(vol.affine) - np.asarray(ref.affine)).max())
    if diff > AFFINE_TOL_MM:
        return f"{what} {vol.source} affine differs from {ref_what} {ref.source} affine (max difference {diff:.4g} mm)"
    return None


def pair_problems(image: Volume, label: Volume, dataset: DatasetInfo) -> list[str]:
    """Every inconsistency between an image and its label (empty list when they agree)."""
    problems = [p for p in [grid_mismatch(label, image)] if p]
    if dataset.labels:
        values = np.unique(label.array)
        unknown = sorted(int(v) for v in values if int(v) not in dataset.labels)
        if unknown:
            declared = sorted(dataset.labels)
            problems.append(f"{label.source}: label values {unknown} are not declared in the dataset labels {declared}")
    return problems


def channel_source(case: Case, channel: int) -> tuple[Path, int]:
    """Where a case's image ``channel`` lives: ``(file, channel within it)``. File ``channel`` of a
    one-file-per-channel case (nnU-Net v2), else channel ``channel`` of its one file (a 4D NIfTI image holds its
    channels in the 4th dimension; :func:`read_volume` checks it)."""
    if len(case.images) == 0:
        raise DataError(f"case {case.case_id}: no image file")
    if case.kind == "h5slices" or len(case.images) == 1:
        if channel and case.kind == "h5slices":
            raise DataError(f"case {case.case_id}: channel {channel} asked for (data.channel), but it has one")
        return Path(case.images[0]), channel
    if channel >= len(case.images):
        raise DataError(f"case {case.case_id}: channel {channel} asked for (data.channel), but it has "
                        f"{len(case.images)} channel files")
    return Path(case.images[channel]), 0


def read_image(case: Case, channel: int = 0) -> Volume:
    """Read one channel of a case's image (see :func:`channel_source`)."""
    path, within = channel_source(case, channel)
    if case.kind == "h5slices":
        return read_slices(case.images, role="image")
    return read_volume(path, kind=case.kind, role="image", channel=within)


def read_label(case: Case) -> Volume | None:
    """Read a case's label (None for an unlabelled case)."""
    if case.label is None:
        return None
    if case.kind == "h5slices":
        return read_slices(case.images, role="label")
    return read_volume(case.label, kind=label_kind(case), role="label")


def read_case(case: Case, dataset: DatasetInfo) -> tuple[Volume, Volume | None]:
    """Read a case's image and label and check that they agree with each other and the dataset."""
    image = read_image(case, dataset.channel)
    label = read_label(case)
    if label is not None:
        problems = pair_problems(image, label, dataset)
        if problems:
            raise DataError(problems[0])
    return image, label
