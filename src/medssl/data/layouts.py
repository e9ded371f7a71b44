"""Recognise a dataset on disk and list its cases (no voxels are read here).

Supported inputs:
  * MSD v1 folder: ``dataset.json`` with ``modality`` (labels index -> name);
  * nnU-Net v2 folder: ``dataset.json`` with ``channel_names`` (labels name -> index);
  * a folder of DICOM slices (one case; label NIfTI via ``label=``);
  * a folder of ``.h5`` files (one case per file; SSL4MIS per-slice files ``<case>_slice_<K>.h5`` are one case
    per ``<case>``, restacked by :func:`medssl.data.readers.read_slices`; a whole-volume ``<case>.h5`` wins);
  * a single ``.nii``/``.nii.gz`` (or ``.h5``) file (one case; label via ``label=``).

Missing files are *not* an error here: :func:`medssl.data.check.run_check` reports them.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

from medssl.data.cases import Case, DatasetInfo
from medssl.data.readers import H5_SUFFIXES, NIFTI_ENDINGS, read_volume, slice_file, volume_stem
from medssl.errors import ConfigError, DataError

MRI_WORDS = ("MR", "MRI", "T1", "T2", "FLAIR", "ADC")


def normalize_modality(name: str | None) -> str:
    """``"CT"`` for anything containing CT; ``"MRI"`` for MR-like names; else the upper-cased name."""
    if name is None or not str(name).strip():
        return "UNKNOWN"
    up = str(name).strip().upper()
    if "CT" in up:
        return "CT"
    tokens = set(re.split(r"[^A-Z0-9]+", up))
    if up.startswith("MR") or tokens & set(MRI_WORDS) or any(up.startswith(w) for w in MRI_WORDS):
        return "MRI"
    return up


def _visible_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON ({exc})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object at the top level")
    return data


def _labels_index_to_name(raw, source: Path) -> dict[int, str]:
    """MSD ``{"0": "background"}`` -> ``{0: "background"}``."""
    if not isinstance(raw, dict):
        raise DataError(f"{source}: 'labels' must be an object mapping index to name")
    try:
        return {int(k): str(v) for k, v in raw.items()}
    except (TypeError, ValueError):
        raise DataError(f"{source}: 'labels' keys must be integer indices, got {list(raw)}") from None


def _labels_name_to_index(raw, source: Path) -> dict[int, str]:
    """nnU-Net v2 ``{"background": 0}`` -> ``{0: "background"}``."""
    if not isinstance(raw, dict):
        raise DataError(f"{source}: 'labels' must be an object mapping name to index")
    out: dict[int, str] = {}
    for name, value in raw.items():
        if isinstance(value, (list, tuple)):
            raise ConfigError(
                f"{source}: label '{name}' maps to a list (region-based training) which is not supported"
            )
        try:
            out[int(value)] = str(name)
        except (TypeError, ValueError):
            raise DataError(f"{source}: label '{name}' has non-integer value {value!r}") from None
    return out


def _labels_any(raw, source: Path) -> dict[int, str]:
    """Accept either direction, a list of names, or a JSON string of those."""
    if isinstance(raw, bytes):
        raw = raw.decode()
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raise DataError(f"{source}: 'labels' is not valid JSON: {raw[:60]!r}") from None
    if hasattr(raw, "tolist"):
        raw = raw.tolist()
    if isinstance(raw, (list, tuple)):
        return {i: (v.decode() if isinstance(v, bytes) else str(v)) for i, v in enumerate(raw)}
    if isinstance(raw, dict) and raw and all(str(k).lstrip("-").isdigit() for k in raw):
        return _labels_index_to_name(raw, source)
    return _labels_name_to_index(raw, source)


def _rel(root: Path, entry) -> Path:
    return root / str(entry).removeprefix("./")


def _channel_names(raw, js: Path) -> dict[int, str]:
    """``{"0": "T2", "1": "ADC"}`` (MSD ``modality`` / v2 ``channel_names``) as ``{0: "T2", 1: "ADC"}``; a plain
    string (one channel) or nothing gives ``{}``."""
    if not isinstance(raw, dict):
        return {}
    try:
        return {int(k): str(v) for k, v in sorted(raw.items(), key=lambda kv: int(kv[0]))}
    except (TypeError, ValueError):
        raise DataError(f"{js}: channel indices must be integers, got {sorted(map(str, raw))}") from None


def open_data(data) -> DatasetInfo:
    """The dataset of a ``data:`` config section (path, modality override, channel): the one way to open it."""
    return open_dataset(data.path, modality=data.modality, channel=data.channel)


def describe_channels(info: DatasetInfo) -> str:
    """``"2 channels (0: T2, 1: ADC)"``, from dataset.json's names or the first case's files."""
    names = info.channel_names or {i: "" for i in range(info.n_channels)}
    listing = ", ".join(f"{i}: {n}" if n else str(i) for i, n in names.items())
    return f"{len(names)} channel{'s' if len(names) != 1 else ''} ({listing})"


def select_channel(info: DatasetInfo, channel: int) -> None:
    """Read ``channel`` of every case from now on; take its modality from dataset.json (ConfigError if absent)."""
    if isinstance(channel, bool) or not isinstance(channel, int) or channel < 0:
        raise ConfigError(f"data.channel: expected an integer >= 0, got {channel!r}")
    if info.channel_names and channel not in info.channel_names:
        raise ConfigError(f"data.channel={channel}: {info.root} has {describe_channels(info)}")
    multi_file = [c for c in info.cases if c.n_channels > 1]
    if multi_file and channel >= min(c.n_channels for c in multi_file):
        short = min(multi_file, key=lambda c: c.n_channels)
        raise ConfigError(f"data.channel={channel}: case {short.case_id} has {short.n_channels} channel files")
    info.channel = channel
    if info.channel_names:
        info.modality = normalize_modality(info.channel_names[channel])


def _open_msd(root: Path, meta: dict, js: Path) -> DatasetInfo:
    labels = _labels_index_to_name(meta.get("labels", {}), js)
    mod = meta.get("modality")
    channels = _channel_names(mod, js)
    modality = channels.get(0, next(iter(channels.values()), None)) if channels else mod
    cases: list[Case] = []
    listed: set[str] = set()
    for i, entry in enumerate(meta.get("training", []) or []):
        if not isinstance(entry, dict) or "image" not in entry:
            raise DataError(f"{js}: training entry {i} must be an object with 'image' and 'label'")
        image = _rel(root, entry["image"])
        label = _rel(root, entry["label"]) if entry.get("label") else None
        cid = volume_stem(image.name, NIFTI_ENDINGS) or image.name
        cases.append(Case(cid, (image,), label))
        listed.add(image.name)
    for i, entry in enumerate(meta.get("test", []) or []):
        name = entry.get("image") if isinstance(entry, dict) else entry
        if not name:
            raise DataError(f"{js}: test entry {i} has no image path")
        image = _rel(root, name)
        cases.append(Case(volume_stem(image.name, NIFTI_ENDINGS) or image.name, (image,), None))
        listed.add(image.name)
    for folder, labelled in (("imagesTr", True), ("imagesTs", False)):
        for image in _visible_files(root / folder):
            cid = volume_stem(image.name, NIFTI_ENDINGS)
            if cid is None or image.name in listed:
                continue
            label = root / "labelsTr" / image.name
            cases.append(Case(cid, (image,), label if labelled and label.is_file() else None))
    return DatasetInfo(root, "msd", normalize_modality(modality), labels, cases, str(meta.get("name") or root.name),
                       channels)


def _open_v2(root: Path, meta: dict, js: Path) -> DatasetInfo:
    if meta.get("regions_class_order") is not None:
        raise ConfigError(f"{js}: 'regions_class_order' (region-based training) is not supported")
    labels = _labels_name_to_index(meta.get("labels", {}), js)
    channels = _channel_names(meta.get("channel_names"), js)
    modality = channels.get(0, next(iter(channels.values()), None)) if channels else None
    ending = str(meta.get("file_ending", ".nii.gz"))
    cases: list[Case] = []
    if isinstance(meta.get("dataset"), dict):  # explicit case list (nnU-Net v2 option)
        for cid, entry in meta["dataset"].items():
            images = tuple(_rel(root, p) for p in entry.get("images", []))
            label = _rel(root, entry["label"]) if entry.get("label") else None
            cases.append(Case(str(cid), images, label))
    else:
        pattern = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})" + re.escape(ending) + "$")
        for folder, labelled in (("imagesTr", True), ("imagesTs", False)):
            groups: dict[str, list[tuple[int, Path]]] = defaultdict(list)
            for f in _visible_files(root / folder):
                m = pattern.match(f.name)
                if m:
                    groups[m["case"]].append((int(m["ch"]), f))
            for cid, chans in groups.items():
                label = root / "labelsTr" / f"{cid}{ending}"
                images = tuple(p for _, p in sorted(chans))
                cases.append(Case(cid, images, label if labelled and label.is_file() else None))
    kind = "h5" if ending.lower() in H5_SUFFIXES else "nifti"
    if kind == "h5":
        cases = [Case(c.case_id, c.images, c.label, "h5") for c in cases]
    name = str(meta.get("name") or root.name)
    return DatasetInfo(root, "nnunetv2", normalize_modality(modality), labels, cases, name, channels)


def _h5_has_label(path: Path) -> tuple[bool, object]:
    import h5py

    try:
        with h5py.File(str(path), "r") as fh:
            return "label" in fh, fh.attrs.get("labels")
    except Exception:
        return True, None  # unreadable: keep it listed as labelled so check reports the read error


def _h5_cases(files: list[Path]) -> list[Case]:
    """One case per whole-volume file, one per group of per-slice files (unless that case has a volume file)."""
    stacks: dict[str, list[Path]] = defaultdict(list)
    cases = []
    for f in files:
        parsed = slice_file(f)
        if parsed is None:
            cases.append(Case(f.stem, (f,), f, "h5"))
        else:
            stacks[parsed[0]].append(f)
    whole = {c.case_id for c in cases}
    for cid, group in stacks.items():
        if cid not in whole:
            group = sorted(group, key=lambda p: slice_file(p)[1])
            cases.append(Case(cid, tuple(group), group[0], "h5slices"))
    return cases


def _open_h5(root: Path, files: list[Path], meta: dict | None, js: Path | None) -> DatasetInfo:
    cases, first_attr = [], None
    for c in _h5_cases(files):
        has_label, attr = _h5_has_label(c.images[0])
        if first_attr is None and attr is not None:
            first_attr = attr
        cases.append(c if has_label else Case(c.case_id, c.images, None, c.kind))
    if meta is not None and "labels" in meta:
        labels = _labels_any(meta["labels"], js)
    elif first_attr is not None:
        labels = _labels_any(first_attr, files[0])
    elif any(c.has_label for c in cases):
        raise DataError(f"{root}: no label names for the .h5 files: add a dataset.json with 'labels' or a 'labels' attribute")
    else:
        labels = {}
    modality = None
    if meta is not None:
        mod = meta.get("modality") or meta.get("channel_names")
        modality = mod.get("0") if isinstance(mod, dict) else mod
    name = str((meta or {}).get("name") or root.name)
    return DatasetInfo(root, "h5", normalize_modality(modality), labels, cases, name)


def _dicom_series(folder: Path) -> bool:
    import SimpleITK as sitk

    try:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except Exception:
        return False


def _dicom_modality(folder: Path) -> str | None:
    import pydicom

    for f in _visible_files(folder):
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        except Exception:
            continue
        if "Modality" in ds:
            return str(ds.Modality)
    return None


def _single_case_labels(label: Path | None, kind: str) -> dict[int, str]:
    """Label names for a one-case dataset: the values present in its label file."""
    if label is None or not Path(label).exists():
        return {}
    import numpy as np

    try:
        values = np.unique(read_volume(label, kind=kind, role="label").array)
    except DataError:
        return {}  # run_check reports the unreadable label
    return {int(v): ("background" if int(v) == 0 else f"class_{int(v)}") for v in values} | {0: "background"}


def open_dataset(
    path: str | Path,
    *,
    modality: str | None = None,
    label: str | Path | None = None,
    labels: dict | None = None,
    channel: int = 0,
) -> DatasetInfo:
    """Recognise the layout at ``path`` and list its cases, sorted by case id.

    Args:
        path: dataset folder, DICOM folder, folder of .h5 files, or a single .nii/.nii.gz/.h5 file.
        modality: overrides the modality found in dataset.json / DICOM tags (normalised).
        label: label file for a single-file or DICOM input.
        labels: ``{index: name}`` (or v2 ``{name: index}``) overriding the label names.
        channel: the image channel to read from every case of a multi-channel dataset (``data.channel``); the
            dataset's modality becomes that channel's, unless ``modality`` overrides it.
    """
    root = Path(path)
    if not root.exists():
        raise DataError(f"{root}: dataset not found")
    label_path = Path(label) if label is not None else None
    if root.is_file() and root.name == "dataset.json":
        root = root.parent
    if root.is_file():
        stem = volume_stem(root.name, NIFTI_ENDINGS)
        if stem is not None:
            info = DatasetInfo(root, "nifti", "UNKNOWN", {}, [Case(stem, (root,), label_path)], root.name)
        elif root.suffix.lower() in H5_SUFFIXES:
            info = _open_h5(root.parent, [root], None, None)
            info.root = root
        else:
            raise DataError(f"{root}: not a dataset folder, NIfTI or HDF5 file")
        if not info.labels and info.cases[0].label is not None:
            info.labels = _single_case_labels(info.cases[0].label, "h5" if info.layout == "h5" else "nifti")
    else:
        js = root / "dataset.json"
        meta = _load_json(js) if js.is_file() else None
        h5_files = [f for f in _visible_files(root) if f.suffix.lower() in H5_SUFFIXES]
        if meta is not None and "channel_names" in meta:
            info = _open_v2(root, meta, js)
        elif meta is not None and "modality" in meta and not h5_files:
            info = _open_msd(root, meta, js)
        elif h5_files:
            info = _open_h5(root, h5_files, meta, js if meta is not None else None)
        elif meta is not None:
            raise DataError(f"{js}: has neither 'modality' (MSD) nor 'channel_names' (nnU-Net v2)")
        elif _visible_files(root) and _dicom_series(root):
            info = DatasetInfo(root, "dicom", normalize_modality(_dicom_modality(root)), {},
                               [Case(root.name, (root,), label_path, "dicom")], root.name)
            info.labels = _single_case_labels(label_path, "nifti")
        else:
            raise DataError(f"{root}: no dataset.json and no DICOM series or .h5 files found")
        if label_path is not None and info.layout != "dicom":
            raise ConfigError(f"{label_path}: label= only applies to a single image file or a DICOM folder")
    if labels is not None:
        info.labels = _labels_any(labels, root)
    select_channel(info, channel)
    if modality is not None:
        info.modality = normalize_modality(modality)
    if not info.cases:
        raise DataError(f"{root}: no cases found in the dataset")
    info.cases = sorted(info.cases, key=lambda c: c.case_id)
    return info
