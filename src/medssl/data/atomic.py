"""Atomic writes: every output file (or folder) appears complete or not at all.

Each writer works on a temporary sibling of the target (same folder, so the final ``os.replace`` is a
rename on one file system) and renames it onto the target only when writing succeeded; on any error,
``KeyboardInterrupt`` included, the temporary is deleted and an existing target is left untouched.

* :func:`atomic_path` -- ``with atomic_path(p) as tmp: np.savez(tmp, ...)``: for writers that take a path
  (nibabel, numpy, torch, matplotlib). The temporary keeps the target's suffixes (``.nii.gz``, ``.npz``,
  ``.png``), so writers that look at the extension pick the right format;
* :func:`write_bytes`, :func:`write_text`, :func:`write_json`, :func:`write_csv` -- the common cases;
* :func:`atomic_dir` -- the same for a whole folder (the slice cache).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np

__all__ = [
    "atomic_dir", "atomic_path", "csv_text", "json_ready", "write_bytes", "write_csv", "write_json", "write_text",
]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` when the block succeeds.

    The parent folder is created. The file gets the usual permissions (``0666 & ~umask``), not
    ``mkstemp``'s 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary empty folder next to ``path``; it replaces ``path`` (and all it held) on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def json_ready(obj, *, nan_as_null: bool = False):
    """``obj`` with numpy scalars/arrays as Python values and keys as str; non-finite floats as None if asked."""
    if isinstance(obj, np.ndarray):
        obj = obj.tolist()
    elif isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and nan_as_null and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): json_ready(v, nan_as_null=nan_as_null) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v, nan_as_null=nan_as_null) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj, *, indent: int | None = 1, nan_as_null: bool = False) -> Path:
    """``obj`` as JSON, newline-terminated (see :func:`json_ready`; other objects are written with ``str``).

    Non-finite floats are written as ``NaN``/``Infinity`` (Python's ``json`` reads them back, e.g. a training
    state's ``best_score = -inf``), or as ``null`` with ``nan_as_null`` (strict JSON, for metrics files).
    """
    text = json.dumps(json_ready(obj, nan_as_null=nan_as_null), indent=indent, default=str)
    return write_text(path, text + "\n")


def csv_text(rows: Iterable[Mapping], fieldnames: Sequence[str] | None = None) -> str:
    """CSV text of dict rows; columns: ``fieldnames``, else every key in order of first appearance."""
    rows = list(rows)
    if fieldnames is None:
        fieldnames = list(dict.fromkeys(k for r in rows for k in r))
    if not fieldnames:
        return ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fieldnames))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_csv(path: str | os.PathLike, rows: Iterable[Mapping], fieldnames: Sequence[str] | None = None) -> Path:
    """Dict rows as CSV (see :func:`csv_text`); no rows and no field names give an empty file."""
    return write_text(path, csv_text(rows, fieldnames))
