"""Inputs of ``medssl refine`` / ``medssl propagate``: pair volumes by case id, check geometry, write records.

Volumes are found by :func:`medssl.data.discover.find_volumes` (a file, a dataset folder or a plain folder of
NIfTI files) and read by :func:`medssl.data.discover.read_item`. Every problem is a one-line
:class:`~medssl.errors.DataError` naming the file.
"""

from __future__ import annotations

import logging
from pathlib import Path

from medssl.data.atomic import write_csv, write_json
from medssl.data.discover import VolumeItem
from medssl.data.layouts import normalize_modality
from medssl.data.readers import grid_mismatch
from medssl.data.volume import Volume
from medssl.errors import DataError

log = logging.getLogger(__name__)


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


def check_pair(vol: Volume, image: Volume, what: str) -> None:
    """A label volume must have the image's canonical shape and (within 1e-3 mm) its affine."""
    problem = grid_mismatch(vol, image, what)
    if problem:
        raise DataError(problem)


def guess_modality(image: Volume, given: str | None) -> str:
    """The given modality (normalised), else CT when the image holds Hounsfield-like values below -200."""
    if given and normalize_modality(given) != "UNKNOWN":
        return normalize_modality(given)
    mod = "CT" if image.array.size and float(image.array.min()) < -200 else "MRI"
    log.info("%s: modality not given, assuming %s from the intensity range", image.source, mod)
    return mod


def class_names_for(pred_source, image_source, label_source, present: set[int]) -> dict[int, str]:
    """Declared class names (dataset.json of the label/image source, or predictions.json), plus present ids."""
    from medssl.evaluation.folders import declared_classes, manifest_names

    declared = (declared_classes(src) for src in (label_source, image_source) if src is not None)
    names = next((n for n in declared if n), None) or manifest_names(Path(pred_source).expanduser())
    for v in range(max(set(names) | {int(p) for p in present} | {0}) + 1):  # every id up to the largest
        names.setdefault(v, "background" if v == 0 else f"class_{v}")
    return dict(sorted(names.items()))


def write_metrics(out: Path, result: dict, rows: list[dict]) -> None:
    """``refine.json`` (settings, stats), and with labels ``refine_metrics.json`` + ``refine_per_case.csv``."""
    write_json(out / "refine.json", {k: v for k, v in result.items() if k not in ("before", "after")},
               nan_as_null=True)
    if "before" in result:
        write_json(out / "refine_metrics.json", result, nan_as_null=True)
        write_csv(out / "refine_per_case.csv", rows)
