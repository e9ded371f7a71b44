"""``medssl propagate`` on files: read the image and the annotation, check them, propagate, write the label map
and its ``.json`` record. The propagation itself (backends, key slices, stops, baselines, scoring) is in
:mod:`medssl.sam.propagate`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from medssl.config import DataConfig
from medssl.data.slicing import volume_slices
from medssl.errors import ConfigError, DataError
from medssl.sam.propagate import (PropagateConfig, annotation_from_slice, annotation_from_volume, evaluate,
                                  propagate_volume)


def read_mask2d(path: str | Path) -> np.ndarray:
    """A 2D integer mask from ``.npy`` or NIfTI (2D, or 3D with one singleton axis)."""
    from medssl.data.readers import read_volume

    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{p}: mask file not found")
    if p.suffix == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise DataError(f"{p}: cannot read .npy mask ({exc})") from None
    else:
        import nibabel as nib

        try:
            arr = np.asanyarray(nib.load(str(p)).dataobj)
        except Exception as exc:  # nibabel raises many types for bad files
            raise DataError(f"{p}: cannot read mask ({type(exc).__name__}: {exc})") from None
        if arr.ndim >= 3:
            arr = read_volume(p, role="label").array  # canonical orientation, like the image
    arr = np.squeeze(arr) if arr.ndim > 2 else arr
    if arr.ndim != 2:
        raise DataError(f"{p}: expected a 2D mask, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool) and np.any(arr != np.round(arr)):
        raise DataError(f"{p}: mask values must be integer class ids")
    return arr.astype(np.int64)


def run_propagate(image: str | Path, output: str | Path, options: dict, data: DataConfig, *,
                  mask: str | None = None, slice_index: int | None = None, labels: str | None = None,
                  key_index: int | None = None, gt: str | None = None, modality: str | None = None,
                  segmenter=None, predictor=None) -> dict:
    """``medssl propagate``: read and check everything, propagate, write ``output`` and ``<output>.json``."""
    from medssl.data.atomic import write_json
    from medssl.data.readers import read_volume
    from medssl.data.volume import save_like
    from medssl.sam.inputs import check_pair, guess_modality
    from medssl.sam.refine import sam_intensity

    cfg = PropagateConfig(**options)
    cfg.validate()
    out = Path(output).expanduser()
    if not out.name.endswith((".nii.gz", ".nii")):
        raise ConfigError(f"{out}: the output must be a .nii.gz or .nii file")
    if (mask is None) == (labels is None):
        raise ConfigError("give either --mask FILE with --slice INDEX, or --labels VOLUME")
    if mask is not None and slice_index is None:
        raise ConfigError(f"{mask}: --mask needs --slice INDEX (the annotated slice)")
    axis = data.axis if cfg.axis is None else cfg.axis
    img = read_volume(image, kind="auto", role="image")
    if mask is not None:
        ann = annotation_from_slice(read_mask2d(mask), int(slice_index), img.shape, axis, cfg.label, str(mask))
        lab_vol = None
    else:
        lab_vol = read_volume(labels, kind="auto", role="label")
        check_pair(lab_vol, img, "label volume")
        if key_index is not None:
            if not 0 <= key_index < lab_vol.shape[axis]:
                raise DataError(f"{labels}: slice index {key_index} is out of range 0..{lab_vol.shape[axis] - 1} "
                                f"along axis {axis}")
            ann = annotation_from_slice(volume_slices(lab_vol.array, axis)[key_index], key_index, img.shape, axis,
                                        cfg.label, str(labels))
        else:
            ann = annotation_from_volume(lab_vol.array, cfg.key_slice, axis, cfg.label, str(labels))
    truth = lab_vol
    if gt is not None:
        truth = read_volume(gt, kind="auto", role="label")
        check_pair(truth, img, "ground truth")
    mod = guess_modality(img, modality or data.modality)
    pred, info = propagate_volume(sam_intensity(img.array, mod, data), ann, cfg, segmenter, predictor)
    if truth is not None:
        info["metrics"] = evaluate(pred, truth.array, ann, img.spacing, cfg.copy_window)
    info.update({"image": str(image), "modality": mod, "axis": axis, "config": dataclasses.asdict(cfg),
                 "annotation": str(mask or labels)})
    dtype = np.uint8 if pred.max(initial=0) <= 255 else np.int16
    save_like(pred, img, out, dtype=dtype)
    write_json(out.parent / (out.name.rsplit(".nii", 1)[0] + ".json"), info, nan_as_null=True)
    return info
