"""The on-disk slice cache built by ``medssl prepare``.

Layout of one cache (a folder named ``<dataset>-<key>``, key = hash of everything that shapes it):

    meta.json    the settings, the dataset fingerprint, class names, per-case slice ranges
    images.f32   raw float32 (N, S, S): normalised, fitted slices   (memory-mapped on load)
    labels.u8    raw uint8   (N, S, S): label slices (zeros for unlabelled cases)
    index.csv    one row per slice: row, case_id, slice, n_slices, rel_pos, labelled, present_<c>...

The folder is written under a temporary name and renamed when complete, so an interrupted
``prepare`` never leaves a cache that looks valid. Loading reads only meta.json and index.csv and
maps the arrays: no volume is read again. A changed setting or a changed input file (size or
modification time) gives another key, hence a rebuild; a stale cache is never reused silently.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medssl.config import DataConfig
from medssl.data.atomic import atomic_dir
from medssl.data.cases import Case, DatasetInfo
from medssl.data.intensity import normalize
from medssl.data.layouts import open_data
from medssl.data.readers import read_case
from medssl.data.slicing import SliceFit, foreground_box, volume_slices
from medssl.errors import DataError

CACHE_VERSION = 4  # 4: one pad value (0) for every volume; 3: crop / spacing, images cubic, labels linear on
# one-hot (2: nearest-exact labels)
PAD_VALUE = 0.0  # canvas outside the slice, after normalisation: the same for every volume (no identity cue)


def case_fingerprint(case: Case) -> list:
    """Paths, sizes and modification times of a case's files (a DICOM folder: of every file in it)."""
    out = []
    paths = list(case.images) + ([case.label] if case.label else [])
    for p in paths:
        p = Path(p)
        files = sorted(p.iterdir()) if p.is_dir() else [p]
        for f in files:
            try:
                st = f.stat()
                out.append([str(f), st.st_size, st.st_mtime_ns])
            except OSError:
                out.append([str(f), None, None])
    return out


def preprocess_settings(data: DataConfig, info: DatasetInfo) -> dict:
    """The settings that decide what a cached slice looks like (the channel only when it is not the first, so the
    caches of single-channel data keep their keys)."""
    settings = {
        "version": CACHE_VERSION,
        "modality": info.modality,
        "axis": data.axis,
        "size": data.size,
        "fit": data.fit,
        "spacing": [float(v) for v in data.spacing],
        "crop": data.crop,
        "ct_window": list(data.ct_window),
        "mri_percentiles": list(data.mri_percentiles),
        "mri_mode": data.mri_mode,
        "pad_value": PAD_VALUE,
    }
    if info.channel:
        settings["channel"] = info.channel
    return settings


def cache_key(data: DataConfig, info: DatasetInfo) -> str:
    blob = {
        "settings": preprocess_settings(data, info),
        "root": str(Path(info.root).resolve()),
        "labels": {str(k): v for k, v in info.labels.items()},
        "files": [[c.case_id, case_fingerprint(c)] for c in info.cases],
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def normalize_volume(array: np.ndarray, modality: str, data: DataConfig) -> np.ndarray:
    return normalize(array, modality, ct_window=tuple(data.ct_window),
                     mri_percentiles=tuple(data.mri_percentiles), mri_mode=data.mri_mode)


def in_plane(values, axis: int) -> tuple:
    """The two in-plane entries (rows, columns of a slice) of a per-axis triple."""
    return tuple(v for i, v in enumerate(values) if i != axis)


def slice_fit(image: np.ndarray, spacing, data: DataConfig) -> SliceFit:
    """The fit of this normalised canonical volume's slices: crop box, resampling zoom, canvas."""
    _, h, w = volume_slices(image, data.axis).shape
    zoom = (1.0, 1.0)
    if data.spacing:
        if spacing is None:
            raise DataError("data.spacing is set but the volume's spacing is unknown")
        zoom = tuple(float(s) / float(t) for s, t in zip(in_plane(spacing, data.axis), data.spacing))
    crop = foreground_box(image, data.axis) if data.crop == "foreground" else None
    return SliceFit(h, w, data.size, data.fit, zoom=zoom, crop=crop)


def volume_to_slices(image: np.ndarray, label: np.ndarray | None, data: DataConfig, spacing=None
                     ) -> tuple[np.ndarray, np.ndarray | None, SliceFit]:
    """Normalised canonical volume -> fitted slices (Z, S, S) (and labels), with the fit used.

    ``spacing`` (mm per canonical axis) is needed when ``data.spacing`` asks for resampling.
    """
    img = volume_slices(image, data.axis)
    fit = slice_fit(image, spacing, data)
    xs = np.stack([fit.forward(s, fill=PAD_VALUE) for s in img]).astype(np.float32)
    ys = None
    if label is not None:
        lab = volume_slices(label, data.axis)
        ys = np.stack([fit.forward(s, label=True) for s in lab]).astype(np.uint8)
    return xs, ys, fit


@dataclass
class SliceCache:
    """A prepared slice cache (open it with :func:`load_cache`).

    Readers use this API, never the files or ``meta`` keys: the per-row arrays below, :meth:`read_images`
    (a batch of rows), :meth:`rows` / :meth:`span` (the rows of cases), :meth:`case_volume` (one case's
    slices), :meth:`volume` (one case's record: shape, spacing, labelled, crop, zoom, fit_shape, content)
    and :attr:`labelled_cases` / :attr:`unlabelled_cases` / :attr:`dataset_root`.
    """

    root: Path
    meta: dict
    images: np.ndarray  # (N, S, S) float32 memmap
    labels: np.ndarray  # (N, S, S) uint8 memmap
    case_ids: np.ndarray  # (N,) str
    slice_idx: np.ndarray  # (N,) int
    n_slices: np.ndarray  # (N,) int
    rel_pos: np.ndarray  # (N,) float, (k + 1) / Z as in PCL
    labelled: np.ndarray  # (N,) bool
    present: np.ndarray  # (N, C) bool, C = number of classes (column 0 = background)
    content: np.ndarray  # (N, 4) int: (y0, y1, x0, x1) of the slice's image on the canvas; PAD_VALUE outside

    @property
    def class_names(self) -> dict[int, str]:
        return {int(k): v for k, v in self.meta["labels"].items()}

    @property
    def n_classes(self) -> int:
        return max(self.class_names) + 1

    @property
    def dataset_root(self) -> Path:
        """The dataset folder the cache was prepared from."""
        return Path(self.meta["root"])

    @property
    def labelled_cases(self) -> list[str]:
        """Sorted ids of the cases that have a label."""
        return sorted(c for c, v in self.meta["volumes"].items() if v["labelled"])

    @property
    def unlabelled_cases(self) -> list[str]:
        """Sorted ids of the cases without a label (they only feed pretraining)."""
        return sorted(c for c, v in self.meta["volumes"].items() if not v["labelled"])

    def span(self, case_id: str) -> tuple[int, int]:
        """``(first row, last row + 1)`` of a case's slices."""
        if case_id not in self.meta["cases"]:
            raise DataError(f"{self.root}: case {case_id!r} is not in the prepared cache")
        a, b = self.meta["cases"][case_id]
        return int(a), int(b)

    def volume(self, case_id: str) -> dict:
        """A case's record as built: shape, spacing, labelled, crop, zoom, fit_shape, content (y0, y1, x0, x1)."""
        self.span(case_id)
        return self.meta["volumes"][case_id]

    def read_images(self, rows) -> np.ndarray:
        """(len(rows), S, S) float32 images of the given rows, in that order (read from disk in ascending order)."""
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows),) + self.images.shape[1:], np.float32)
        out[order] = self.images[rows[order]]
        return out

    def rows(self, case_ids) -> np.ndarray:
        """Row indices of all slices of the given cases, in case then slice order."""
        wanted = list(case_ids)
        spans = self.meta["cases"]
        missing = [c for c in wanted if c not in spans]
        if missing:
            raise DataError(f"{self.root}: cases not in the prepared cache: {', '.join(missing[:5])}")
        return np.concatenate([np.arange(*spans[c]) for c in wanted]) if wanted else np.zeros(0, int)

    def case_volume(self, case_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(Z, S, S) images and labels of one case, as cached (memory-mapped)."""
        a, b = self.span(case_id)
        return self.images[a:b], self.labels[a:b]


def load_cache(root: str | Path) -> SliceCache:
    root = Path(root)
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{root}: not a prepared slice cache (meta.json missing); run 'medssl prepare'")
    meta = json.loads(meta_path.read_text())
    n, s = meta["n_slices"], meta["settings"]["size"]
    images = np.memmap(root / "images.f32", dtype=np.float32, mode="r", shape=(n, s, s))
    labels = np.memmap(root / "labels.u8", dtype=np.uint8, mode="r", shape=(n, s, s))
    with open(root / "index.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    header, body = rows[0], rows[1:]
    if len(body) != n:
        raise DataError(f"{root}/index.csv: {len(body)} rows, expected {n}")
    col = {name: i for i, name in enumerate(header)}
    pres_cols = [i for name, i in col.items() if name.startswith("present_")]
    arr = np.array(body, dtype=object) if body else np.zeros((0, len(header)), dtype=object)
    return SliceCache(
        root=root, meta=meta, images=images, labels=labels,
        case_ids=arr[:, col["case_id"]].astype(str),
        slice_idx=arr[:, col["slice"]].astype(int),
        n_slices=arr[:, col["n_slices"]].astype(int),
        rel_pos=arr[:, col["rel_pos"]].astype(float),
        labelled=arr[:, col["labelled"]].astype(int).astype(bool),
        present=arr[:, pres_cols].astype(int).astype(bool),
        content=content_boxes(meta),
    )


def content_boxes(meta: dict) -> np.ndarray:
    """(N, 4) canvas boxes (y0, y1, x0, x1) holding each row's image (the rest is padding), as recorded at build."""
    out = np.zeros((meta["n_slices"], 4), np.int64)
    for case, (a, b) in meta["cases"].items():
        out[a:b] = meta["volumes"][case]["content"]
    return out


def cache_path(data: DataConfig, info: DatasetInfo) -> Path:
    name = (info.name or Path(info.root).name).replace(os.sep, "_").replace(" ", "_")
    return Path(data.cache_dir).expanduser() / f"{name}-{cache_key(data, info)}"


def prepare(data: DataConfig, info: DatasetInfo | None = None, *, progress: bool = True,
            force: bool = False) -> SliceCache:
    """Build (or reuse, when every setting and input file is unchanged) the slice cache."""
    if info is None:
        if not data.path:
            raise DataError("config key 'data.path' is empty: give the dataset folder")
        info = open_data(data)
    target = cache_path(data, info)
    if target.is_dir() and (target / "meta.json").is_file() and not force:
        return load_cache(target)
    with atomic_dir(target) as tmp:
        _build(data, info, tmp, progress)
    return load_cache(target)


def _build(data: DataConfig, info: DatasetInfo, out: Path, progress: bool) -> None:
    from tqdm.auto import tqdm

    n_classes = info.n_classes
    header = ["row", "case_id", "slice", "n_slices", "rel_pos", "labelled"] + [f"present_{c}" for c in range(n_classes)]
    spans, volumes, row = {}, {}, 0
    with open(out / "images.f32", "wb") as fi, open(out / "labels.u8", "wb") as fl, \
            open(out / "index.csv", "w", newline="") as fx:
        writer = csv.writer(fx)
        writer.writerow(header)
        for case in tqdm(info.cases, desc="prepare", unit="case", disable=None if progress else True):
            image, label = read_case(case, info)
            norm = normalize_volume(image.array, info.modality, data)
            xs, ys, fit = volume_to_slices(norm, None if label is None else label.array, data, image.spacing)
            if ys is None:
                ys = np.zeros(xs.shape, np.uint8)
            fi.write(np.ascontiguousarray(xs, np.float32).tobytes())
            fl.write(np.ascontiguousarray(ys, np.uint8).tobytes())
            z = xs.shape[0]
            flat = ys.reshape(z, -1)
            for k in range(z):
                pres = np.bincount(flat[k], minlength=n_classes)[:n_classes] > 0
                writer.writerow([row + k, case.case_id, k, z, f"{(k + 1) / z:.6f}", int(label is not None)]
                                + [int(p) for p in pres])
            spans[case.case_id] = [row, row + z]
            volumes[case.case_id] = {"shape": list(image.shape), "spacing": list(image.spacing),
                                     "labelled": label is not None, "crop": fit.crop,
                                     "zoom": [round(float(v), 6) for v in fit.zoom],
                                     "fit_shape": list(fit.scaled_shape), "content": list(fit.content_box)}
            row += z
    meta = {
        "dataset": info.name or Path(info.root).name,
        "root": str(Path(info.root).resolve()),
        "layout": info.layout,
        "settings": preprocess_settings(data, info),
        "key": cache_key(data, info),
        "labels": {str(k): v for k, v in info.labels.items()},
        "n_slices": row,
        "cases": spans,
        "volumes": volumes,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
