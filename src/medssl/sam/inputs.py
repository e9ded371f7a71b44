"""Inputs of ``medssl refine`` / ``medssl propagate``: find volumes by case id, read them, check geometry.

A *source* is a single file (NIfTI, HDF5; a DICOM series folder), a dataset folder that
:func:`medssl.data.layouts.open_dataset` recognises (MSD, nnU-Net v2, HDF5 folder), or a plain folder of
NIfTI files such as the output of ``medssl predict`` (case id = file name without ``.nii.gz``; for
images a trailing nnU-Net channel suffix ``_0000`` is dropped too). Every problem is a one-line
:class:`~medssl.errors.DataError` naming the file.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medssl.data.layouts import normalize_modality, open_dataset
from medssl.data.readers import AFFINE_TOL_MM, guess_kind, read_volume
from medssl.data.volume import Volume, atomic_write
from medssl.errors import DataError

log = logging.getLogger(__name__)

NIFTI_ENDINGS = (".nii.gz", ".nii")


@dataclass(frozen=True)
class VolumeItem:
    case_id: str
    path: Path
    kind: str = "nifti"
    modality: str | None = None  # from dataset.json / DICOM tags, when known
    single: bool = False  # the source was one file (paired regardless of its name)


def _strip(name: str) -> str | None:
    for end in NIFTI_ENDINGS + (".h5", ".hdf5"):
        if name.endswith(end):
            return name[: -len(end)]
    return None


def _dataset(path: Path):
    """open_dataset for folders that are datasets (dataset.json, HDF5 files, a DICOM series), else None."""
    if (path / "dataset.json").is_file():
        return open_dataset(path)
    files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
    if any(p.name.endswith(NIFTI_ENDINGS) for p in files):
        return None
    return open_dataset(path)


def collect(source: str | Path, role: str) -> dict[str, VolumeItem]:
    """``{case_id: VolumeItem}`` for a file or folder (``role`` is ``"image"`` or ``"label"``)."""
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"{path}: not found")
    if path.is_file():
        name = _strip(path.name)
        if name is None:
            raise DataError(f"{path}: not a NIfTI (.nii/.nii.gz) or HDF5 file")
        return {name: VolumeItem(name, path, guess_kind(path), single=True)}
    info = _dataset(path)
    items: dict[str, VolumeItem] = {}
    if info is not None:
        for case in info.cases:
            if role == "image" and case.images:
                items[case.case_id] = VolumeItem(case.case_id, case.images[0], case.kind, info.modality)
            elif role == "label" and case.label is not None:
                kind = "h5" if Path(case.label).suffix.lower() in (".h5", ".hdf5") else "nifti"
                items[case.case_id] = VolumeItem(case.case_id, Path(case.label), kind, info.modality)
        if info.layout == "dicom" and role == "image":
            items = {k: VolumeItem(k, v.path, v.kind, v.modality, single=True) for k, v in items.items()}
    else:
        for p in sorted(path.iterdir()):
            name = _strip(p.name)
            if name is None or p.name.startswith(".") or not p.is_file():
                continue
            if role == "image" and name.endswith("_0000"):
                name = name[:-5]
            items[name] = VolumeItem(name, p, guess_kind(p))
    if not items:
        raise DataError(f"{path}: no {role} volumes found")
    return items


def match_cases(coarse: dict[str, VolumeItem], images: dict[str, VolumeItem],
                labels: dict[str, VolumeItem] | None = None
                ) -> list[tuple[VolumeItem, VolumeItem, VolumeItem | None]]:
    """Pair every coarse label map with its image (and label) by case id; one-file sources pair directly."""
    single_img = len(images) == 1 and next(iter(images.values())).single and len(coarse) == 1
    single_lab = labels is not None and len(labels) == 1 and next(iter(labels.values())).single and len(coarse) == 1
    pairs = []
    for cid, item in sorted(coarse.items()):
        img = next(iter(images.values())) if single_img else images.get(cid)
        if img is None:
            raise DataError(f"{item.path}: no image for case '{cid}' among {len(images)} image volume(s)")
        lab = None
        if labels is not None:
            lab = next(iter(labels.values())) if single_lab else labels.get(cid)
            if lab is None:
                raise DataError(f"{item.path}: no ground-truth label for case '{cid}'")
        pairs.append((item, img, lab))
    return pairs


def read_item(item: VolumeItem, role: str) -> Volume:
    return read_volume(item.path, kind=item.kind, role=role)


def check_pair(vol: Volume, image: Volume, what: str) -> None:
    """A label volume must have the image's canonical shape and (within 1e-3 mm) its affine."""
    if vol.shape != image.shape:
        raise DataError(f"{vol.source}: {what} has shape {vol.shape} but image {image.source} has shape "
                        f"{image.shape}")
    diff = float(np.abs(np.asarray(vol.affine) - np.asarray(image.affine)).max())
    if diff > AFFINE_TOL_MM:
        raise DataError(f"{vol.source}: {what} affine differs from image {image.source} (max difference "
                        f"{diff:.4g} mm)")


def guess_modality(image: Volume, given: str | None) -> str:
    """The given modality (normalised), else CT when the image holds Hounsfield-like values below -200."""
    if given and normalize_modality(given) != "UNKNOWN":
        return normalize_modality(given)
    mod = "CT" if image.array.size and float(image.array.min()) < -200 else "MRI"
    log.info("%s: modality not given, assuming %s from the intensity range", image.source, mod)
    return mod


def class_names_for(pred_source, image_source, label_source, present: set[int]) -> dict[int, str]:
    """Declared class names (dataset.json of the label/image source, or predictions.json), plus present ids."""
    names: dict[int, str] = {}
    for src in (label_source, image_source):
        p = Path(src).expanduser() if src is not None else None
        if p is not None and p.is_dir() and (p / "dataset.json").is_file():
            names = dict(open_dataset(p).labels)
            break
    manifest = Path(pred_source).expanduser() / "predictions.json"
    if not names and manifest.is_file():
        try:
            names = {int(k): str(v) for k, v in json.loads(manifest.read_text()).get("labels", {}).items()}
        except (ValueError, AttributeError):
            raise DataError(f"{manifest}: invalid predictions manifest") from None
    for v in range(max(set(names) | {int(p) for p in present} | {0}) + 1):  # every id up to the largest
        names.setdefault(v, "background" if v == 0 else f"class_{v}")
    return dict(sorted(names.items()))


def _clean(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        return _clean(obj.item())
    return obj


def write_json(path: Path, obj) -> None:
    text = json.dumps(_clean(obj), indent=1, default=str)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda tmp: Path(tmp).write_text(buf.getvalue()))


def write_metrics(out: Path, result: dict, rows: list[dict]) -> None:
    """``refine.json`` (settings, stats), and with labels ``refine_metrics.json`` + ``refine_per_case.csv``."""
    write_json(out / "refine.json", {k: v for k, v in result.items() if k not in ("before", "after")})
    if "before" in result:
        write_json(out / "refine_metrics.json", result)
        write_csv(out / "refine_per_case.csv", rows)
