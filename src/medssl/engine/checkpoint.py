"""Checkpoints: plain tensors and JSON strings, written atomically, read with ``weights_only=True``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from medssl.data.atomic import atomic_path
from medssl.errors import TrainingError


def save_checkpoint(path: str | Path, *, model: dict, meta: dict, **extra) -> Path:
    """Write ``{"model": state_dict, "meta": json, **extra}`` to a temporary name, then rename."""
    payload = {"model": model, "meta": json.dumps(meta), **extra}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_checkpoint(path: str | Path, *, sha256: str | None = None) -> dict:
    """Load safely; ``meta`` comes back as a dict. Optionally verify the file's SHA-256."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TrainingError(f"checkpoint not found: {path}")
    if sha256 is not None:
        digest = file_sha256(path)
        if digest != sha256:
            raise TrainingError(f"{path}: SHA-256 mismatch (expected {sha256[:12]}…, got {digest[:12]}…)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise TrainingError(f"{path}: not a readable medssl checkpoint ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:120]})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise TrainingError(f"{path}: not a medssl checkpoint (no 'model' entry)")
    ckpt["meta"] = json.loads(ckpt.get("meta") or "{}")
    return ckpt


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
