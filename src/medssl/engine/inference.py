"""Inference: slices through a model, and whole volumes back to their own grid.

``predict_volume`` applies exactly the preprocessing the model was trained with (stored in its
checkpoint), runs the slices in batches, maps class probabilities back onto each slice's own
(h, w) grid, and returns a label map on the volume's canonical grid; ``Volume.to_original`` /
``save_like`` then write it in the input's geometry.

A model trained on patches smaller than the canvas (``train.patch_size``) is applied by sliding-window
inference over the canvas (:func:`segment_logits`, shared with the validation during fine-tuning).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from medssl.config import DataConfig, ModelConfig
from medssl.data.cache import normalize_volume, volume_to_slices
from medssl.data.slicing import stack_slices
from medssl.data.volume import Volume
from medssl.engine.checkpoint import load_checkpoint
from medssl.engine.trainer import amp_enabled, to_channels_last
from medssl.errors import ConfigError
from medssl.models import build_model

SW_BATCH_SIZE = 16


def segment_logits(model: nn.Module, x: torch.Tensor, patch: int = 0, overlap: float = 0.5,
                   mode: str = "gaussian", sw_batch_size: int = SW_BATCH_SIZE) -> torch.Tensor:
    """A batch of canvas slices (B, 1, H, W) -> logits (B, C, H, W).

    With ``0 < patch < min(H, W)`` (a model trained on patches), MONAI's sliding-window inference over
    ``patch`` x ``patch`` windows blended with ``mode`` ("gaussian" or "constant") at ``overlap``; the
    blended logits are float32. Otherwise the model sees the whole canvas, exactly as ``model(x)``.
    """
    if not 0 < patch < min(x.shape[-2:]):
        return model(x)
    return sliding_window_inference(x, (patch, patch), max(1, sw_batch_size), model, overlap=overlap, mode=mode)


@dataclass
class Predictor:
    model: nn.Module
    data: DataConfig
    modality: str
    class_names: dict[int, str]
    device: torch.device = torch.device("cpu")
    amp: bool = False
    batch_size: int = 32
    patch: int = 0  # training patch size (train.patch_size); 0 = trained on the whole canvas
    sw_overlap: float = 0.5
    sw_mode: str = "gaussian"

    @torch.no_grad()
    def predict_slices(self, x: np.ndarray) -> np.ndarray:
        """(Z, S, S) normalised slices -> (Z, C, S, S) softmax probabilities (float32)."""
        self.model.eval()
        out = []
        for i in range(0, len(x), self.batch_size):
            xb = torch.from_numpy(np.ascontiguousarray(x[i:i + self.batch_size], np.float32))[:, None]
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                logits = segment_logits(self.model, xb.to(self.device), self.patch, self.sw_overlap,
                                        self.sw_mode, sw_batch_size=self.batch_size)
            out.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.class_names)) + x.shape[1:], np.float32)

    def predict_volume(self, volume: Volume) -> np.ndarray:
        """Canonical image volume -> canonical uint8 label map of the same shape."""
        norm = normalize_volume(volume.array, self.modality, self.data)
        xs, _, fit = volume_to_slices(norm, None, self.data, volume.spacing)
        probs = self.predict_slices(xs)
        labels = np.stack([fit.inverse(p).argmax(0) for p in probs]).astype(np.uint8)
        return stack_slices(labels, self.data.axis)


def load_predictor(checkpoint: str | Path, *, device: str | None = None, batch_size: int = 32,
                   amp: str = "auto") -> Predictor:
    """Rebuild model and preprocessing from a fine-tuning checkpoint."""
    ckpt = load_checkpoint(checkpoint)
    meta = ckpt["meta"]
    if meta.get("kind") != "finetune":
        raise ConfigError(f"{checkpoint}: not a fine-tuned segmentation checkpoint (kind={meta.get('kind')!r})")
    mcfg = ModelConfig(**meta["model"])
    model = build_model(mcfg.backbone, in_channels=1, n_classes=meta["n_classes"], features=mcfg.features,
                        **mcfg.options)
    model.load_state_dict(ckpt["model"], strict=True)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    to_channels_last(model.to(dev))
    sw = meta.get("sw") or {}  # checkpoints from before patch training: whole-canvas inference
    return Predictor(model=model, data=DataConfig(**meta["data"]), modality=meta["modality"],
                     class_names={int(k): v for k, v in meta["labels"].items()}, device=dev,
                     amp=amp_enabled(amp, dev), batch_size=batch_size, patch=int(meta.get("train_patch", 0) or 0),
                     sw_overlap=float(sw.get("overlap", 0.5)), sw_mode=str(sw.get("mode", "gaussian")))
