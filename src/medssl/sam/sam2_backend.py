"""SAM 2 backend: image Segmenter and slice-stack propagation with the video predictor
(docs/sam.md#sam-2-optional-user-checkpoint).

Needs the optional ``sam2`` package (``pip install 'medssl[sam2]'`` in a separate environment with a
torchvision-compatible torch, see docs/running.md#optional-sam-2-environment; the official source is
github.com/facebookresearch/sam2) and a user-supplied checkpoint such as ``sam2.1_hiera_tiny.pt``
with the matching Hydra config (``configs/sam2.1/sam2.1_hiera_t.yaml``). ``sam2`` is imported
lazily: without it a :class:`ConfigError` says what to install.

Frames for the video predictor are written as JPEG (quality 95) of the uint8 windowed slice, so the
input is lossy; prompts are given in original slice pixels (``normalize_coords=True``).
"""

from __future__ import annotations

import inspect
import tempfile
from pathlib import Path

import cv2
import numpy as np

from medssl.errors import ConfigError, DataError
from medssl.sam.predictor import ras_boxes_to_display, ras_to_display, to_uint8

DEFAULT_CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"
CONFIGS = {"tiny": "configs/sam2.1/sam2.1_hiera_t.yaml", "small": "configs/sam2.1/sam2.1_hiera_s.yaml",
           "base_plus": "configs/sam2.1/sam2.1_hiera_b+.yaml", "large": "configs/sam2.1/sam2.1_hiera_l.yaml"}
INSTALL_HINT = ("install the optional extra in a separate environment: SAM2_BUILD_CUDA=0 pip install 'medssl[sam2]' "
                "(needs torchvision; see docs/sam.md)")


def _checkpoint(checkpoint: str | Path | None) -> str:
    if checkpoint is None:
        raise ConfigError("sam2 backend: give a checkpoint path (e.g. sam2.1_hiera_tiny.pt); none is bundled")
    p = Path(checkpoint).expanduser()
    if not p.is_file():
        raise DataError(f"{p}: SAM 2 checkpoint not found")
    return str(p)


def _sam2(module: str):
    try:
        import importlib

        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"sam2 backend: the 'sam2' package is not installed ({exc.name}); {INSTALL_HINT}") from None


def _config(config: str) -> str:
    return CONFIGS.get(config, config)


def _check_cpu_support(predictor, device: str) -> None:
    """1.0-era releases hard-code CUDA inside ``init_state``; refuse CPU runs on them."""
    if str(device).startswith("cuda"):
        return
    try:
        src = inspect.getsource(type(predictor).init_state)
    except (OSError, TypeError):
        return
    if 'torch.device("cuda")' in src:
        raise ConfigError("sam2 backend: the installed sam2 release hard-codes CUDA in init_state; "
                          "use a release from Dec 2024 or later for device='cpu'")


class SAM2Segmenter:
    """SAM 2 image predictor behind the :class:`~medssl.sam.segmenter.Segmenter` interface (boxes only)."""

    name = "sam2"

    def __init__(self, checkpoint: str | Path | None = None, device: str | None = None, *,
                 config: str = DEFAULT_CONFIG, intensity: str = "minmax",
                 ct_window: tuple[float, float] = (-160.0, 240.0), orientation: str = "ras") -> None:
        if orientation not in ("ras", "as_given"):
            raise ConfigError(f"sam orientation: expected ras or as_given, got {orientation!r}")
        ckpt = _checkpoint(checkpoint)
        build = _sam2("sam2.build_sam")
        image_pred = _sam2("sam2.sam2_image_predictor")
        self.device = device or "cpu"
        self.predictor = image_pred.SAM2ImagePredictor(build.build_sam2(_config(config), ckpt, device=self.device))
        self.intensity, self.ct_window, self.orientation = intensity, ct_window, orientation
        self._shape: tuple[int, int] | None = None

    def set_image(self, image: np.ndarray) -> None:
        arr = np.asarray(image)
        if arr.ndim != 2:
            raise ConfigError(f"sam2 set_image: expected an (H, W) slice, got shape {arr.shape}")
        u8 = to_uint8(arr, self.intensity, ct_window=self.ct_window)
        if self.orientation == "ras":
            u8 = ras_to_display(u8)
        self.predictor.set_image(np.repeat(u8[..., None], 3, axis=2))
        self._shape = (int(arr.shape[0]), int(arr.shape[1]))

    def predict(self, boxes: np.ndarray | None = None,
                masks: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        if masks is not None:
            raise ConfigError("sam2 image backend: mask prompts are not supported; use propagate_sam2 for masks")
        if self._shape is None:
            raise ConfigError("sam2: call set_image before predict")
        h, w = self._shape
        b = np.asarray(boxes if boxes is not None else [[0, 0, w - 1, h - 1]], dtype=np.float32).reshape(-1, 4)
        if len(b) == 0:
            return np.zeros((0, h, w), bool), np.zeros((0,), np.float32)
        if self.orientation == "ras":
            b, (h, w) = ras_boxes_to_display(b, (h, w)), (w, h)
        m, iou, _ = self.predictor.predict(box=b, multimask_output=False, normalize_coords=True)
        m = np.asarray(m).reshape(len(b), -1, h, w)[:, 0] > 0.5
        if self.orientation == "ras":
            m = np.stack([ras_to_display(x) for x in m])
        return m, np.asarray(iou, np.float32).reshape(len(b), -1)[:, 0]


def write_frames(volume: np.ndarray, folder: str | Path, *, intensity: str = "minmax",
                 ct_window: tuple[float, float] = (-160.0, 240.0), quality: int = 95) -> None:
    """Write a (Z, H, W) slice stack as ``00000.jpg``… (gray replicated to RGB, JPEG ``quality``)."""
    folder = Path(folder)
    if intensity == "minmax":  # one window for the whole stack keeps slices comparable
        lo, hi = float(np.min(volume)), float(np.max(volume))
        intensity, ct_window = "ct", (lo, hi if hi > lo else lo + 1.0)
    for i, sl in enumerate(np.asarray(volume)):
        u8 = to_uint8(sl, intensity, ct_window=ct_window)
        if not cv2.imwrite(str(folder / f"{i:05d}.jpg"), u8, [cv2.IMWRITE_JPEG_QUALITY, int(quality)]):
            raise DataError(f"{folder}: cannot write SAM 2 frame {i:05d}.jpg")


def propagate_sam2(volume: np.ndarray, key_index: int, key_mask: np.ndarray, checkpoint: str | Path | None = None,
                   *, config: str = DEFAULT_CONFIG, device: str = "cpu", predictor=None, intensity: str = "minmax",
                   ct_window: tuple[float, float] = (-160.0, 240.0), obj_id: int = 1,
                   orientation: str = "ras") -> np.ndarray:
    """Propagate ``key_mask`` (H, W) from slice ``key_index`` through ``volume`` (Z, H, W) with SAM 2.

    Forward k..Z−1, then reverse k..0 (the key slice is written once, from the forward pass).
    Returns a (Z, H, W) bool mask. ``predictor``: an already built video predictor (or a fake with
    ``init_state``/``add_new_mask``/``propagate_in_video``/``reset_state``); otherwise one is built
    from ``checkpoint`` and ``config`` (needs the ``sam2`` package). ``orientation="ras"`` shows the
    slices to SAM 2 in radiological display orientation (as LiteMedSAM, :func:`ras_to_display`);
    ``"as_given"`` uses them as they are. The result is always in the frame of ``volume``.
    """
    vol = np.asarray(volume)
    key = np.asarray(key_mask).astype(bool)
    if vol.ndim != 3 or key.shape != vol.shape[1:]:
        raise ConfigError(f"propagate_sam2: volume (Z, H, W) and key mask (H, W) needed, got {vol.shape}, {key.shape}")
    if orientation not in ("ras", "as_given"):
        raise ConfigError(f"sam orientation: expected ras or as_given, got {orientation!r}")
    if not 0 <= int(key_index) < vol.shape[0]:
        raise ConfigError(f"propagate_sam2: key_index {key_index} outside 0..{vol.shape[0] - 1}")
    if orientation == "ras":
        vol = np.stack([ras_to_display(s) for s in vol])
        key = ras_to_display(key)
    if predictor is None:
        ckpt = _checkpoint(checkpoint)
        predictor = _sam2("sam2.build_sam").build_sam2_video_predictor(_config(config), ckpt, device=device)
    _check_cpu_support(predictor, device)
    out = np.zeros(vol.shape, bool)
    k = int(key_index)
    with tempfile.TemporaryDirectory(prefix="medssl_sam2_") as tmp:
        write_frames(vol, tmp, intensity=intensity, ct_window=ct_window)
        state = predictor.init_state(video_path=tmp, offload_video_to_cpu=False, offload_state_to_cpu=False,
                                     async_loading_frames=False)
        try:
            predictor.add_new_mask(state, frame_idx=k, obj_id=obj_id, mask=key)
            for reverse in (False, True):
                for f, _ids, logits in predictor.propagate_in_video(state, start_frame_idx=k,
                                                                    max_frame_num_to_track=None, reverse=reverse):
                    if reverse and f == k:
                        continue
                    out[f] = np.asarray((logits[0, 0] > 0).cpu()) if hasattr(logits, "cpu") else logits[0, 0] > 0
        finally:
            predictor.reset_state(state)
    return np.stack([ras_to_display(s) for s in out]) if orientation == "ras" else out
