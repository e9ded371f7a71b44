"""Find the volumes of an input by case id: the one discovery step of ``predict``, ``refine`` and ``propagate``.

A *source* is

* a single volume file (NIfTI ``.nii``/``.nii.gz``, HDF5 ``.h5``/``.hdf5``): case id = file name without
  the ending; it pairs with any other one-volume source whatever its name (``single``);
* a folder that :func:`medssl.data.layouts.open_dataset` recognises: MSD or nnU-Net v2 (``dataset.json``),
  a folder of HDF5 files (SSL4MIS per-slice files restacked), a DICOM series folder (``single`` too);
* a plain folder of NIfTI files such as the output of ``medssl predict``: case id = file name without
  the ending (for images a trailing nnU-Net channel suffix ``_0000`` is dropped too).

Images of multi-channel data give the one ``channel`` asked for (``data.channel`` of the run): file ``_000K`` of a
one-file-per-channel case (nnU-Net v2, or a plain folder of ``CASE_000K`` files), or channel K of a 4D NIfTI file.

Every problem is a one-line :class:`~medssl.errors.DataError` naming the file or folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from medssl.data.layouts import open_dataset
from medssl.data.readers import (NIFTI_ENDINGS, channel_source, guess_kind, label_kind, read_slices, read_volume,
                                 volume_stem)
from medssl.data.volume import Volume
from medssl.errors import DataError

ROLES = ("image", "label")
CHANNEL_SUFFIX = re.compile(r"_\d{4}$")  # nnU-Net's per-channel file suffix


@dataclass(frozen=True)
class VolumeItem:
    """One volume of a source. ``files`` lists the per-slice files of an ``"h5slices"`` stack (else empty)."""

    case_id: str
    path: Path
    kind: str = "nifti"
    modality: str | None = None  # from dataset.json / DICOM tags, when known
    single: bool = False  # the source was one volume (paired regardless of its name)
    files: tuple[Path, ...] = ()
    channel: int = 0  # images: the channel of a 4D NIfTI file to read


def read_item(item: VolumeItem, role: str) -> Volume:
    """Read an item's image (``role="image"``) or label map (``role="label"``)."""
    if item.kind == "h5slices":
        return read_slices(item.files, role=role)
    return read_volume(item.path, kind=item.kind, role=role, channel=item.channel if role == "image" else 0)


def _is_dataset(path: Path) -> bool:
    """A folder open_dataset should read (dataset.json, HDF5 files, a DICOM series): any without NIfTI files."""
    if (path / "dataset.json").is_file():
        return True
    return not any(p.is_file() and p.name.endswith(NIFTI_ENDINGS) and not p.name.startswith(".")
                   for p in path.iterdir())


def find_volumes(source: str | Path, role: str = "image", channel: int = 0) -> dict[str, VolumeItem]:
    """``{case_id: VolumeItem}`` of a file or folder; ``role`` picks images or label maps of a dataset; ``channel``
    the image channel of multi-channel data."""
    if role not in ROLES:
        raise DataError(f"{source}: unknown role {role!r} (expected 'image' or 'label')")
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"{path}: not found")
    if path.is_file():
        name = volume_stem(path.name)
        if name is None:
            raise DataError(f"{path}: not a NIfTI (.nii/.nii.gz) or HDF5 (.h5/.hdf5) file")
        return {name: VolumeItem(name, path, guess_kind(path), single=True, channel=channel)}
    items: dict[str, VolumeItem] = {}
    if _is_dataset(path):
        info = open_dataset(path)
        single = info.layout == "dicom"
        for case in info.cases:
            files = tuple(case.images) if case.kind == "h5slices" else ()
            if role == "image" and case.images:
                image, within = channel_source(case, channel)
                items[case.case_id] = VolumeItem(case.case_id, image, case.kind, info.modality, single, files, within)
            elif role == "label" and case.label is not None:
                kind = "h5slices" if files else label_kind(case)
                items[case.case_id] = VolumeItem(case.case_id, Path(case.label), kind, info.modality, False, files)
    else:
        named = ((volume_stem(p.name), p) for p in sorted(path.iterdir()) if not p.name.startswith(".") and p.is_file())
        files = [(name, p) for name, p in named if name is not None]
        stems = {name for name, _ in files}
        for name, p in files:
            if role == "label":
                items[name] = VolumeItem(name, p, guess_kind(p))
            elif CHANNEL_SUFFIX.search(name) and f"{name[:-5]}_0000" in stems:  # nnU-Net: CASE_000K per channel
                if name.endswith(f"_{channel:04d}"):
                    items[name[:-5]] = VolumeItem(name[:-5], p, guess_kind(p))
            else:  # one file per case (channel K of a 4D file)
                items[name] = VolumeItem(name, p, guess_kind(p), channel=channel)
    if not items:
        raise DataError(f"{path}: no {role} volumes found")
    return items
