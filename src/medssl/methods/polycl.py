"""PolyCL (Ward, Moseley, Imran): task-focused example selection for contrastive pretraining. Selection rules below.

Each anchor slice s of a scan's central slab gets one positive s+ and one explicit negative s-:

| variant | positive | negative |
|---|---|---|
| polycl-s | another slab slice of the same scan | a slab slice of another scan |
| polycl-o | a slab slice (any scan) with T = T(s) | a slab slice (any scan) with T != T(s) |
| polycl-m | a same-scan slab slice with T = T(s) | T != T(s): same scan (default) or another scan |

T(x) = "a target label is present in slice x" comes from the labels of the pretraining cases (the slice
cache's presence flags): polycl-o and polycl-m therefore use slice-level weak labels, polycl-s none.
Anchors without a valid positive or negative are dropped and counted. Triplets are drawn afresh every
step (``online``) or fixed per anchor (``offline_fixed``, as the released code). No augmentation, but
every image the encoder sees is one fixed-size window (the smallest content side among the pretraining
slices) at a random position inside the slice's content, resized to the canvas: slices of the same scan
would otherwise share their padding and frame, which tells "same scan" apart without looking at anatomy.
Loss: single-negative cosine InfoNCE with tau = 1 / batch size by default. Options: :class:`PolyCLOptions`
(``pretrain.polycl``, shared by the three variants).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from medssl.config import AugConfig, PretrainConfig, check_choice
from medssl.data.cache import SliceCache
from medssl.data.augment import make_generator
from medssl.data.views import content_windows
from medssl.errors import ConfigError, DataError
from medssl.methods.collapse import spread
from medssl.methods.losses import polycl_infonce
from medssl.methods.registry import PretrainMethod, register_method
from medssl.models.polycl_unet import PolyCLProjectionHead


def slab_mask(slice_idx: np.ndarray, n_slices: np.ndarray, fraction: float) -> np.ndarray:
    """k in [round(D(0.5 - f/2)), round(D(0.5 + f/2))): the central-slab rule (rounded cleanly)."""
    lo = np.round(n_slices * (0.5 - fraction / 2))
    hi = np.round(n_slices * (0.5 + fraction / 2))
    return (slice_idx >= lo) & (slice_idx < np.maximum(hi, lo + 1))


@dataclass
class PolyCLOptions:
    """``pretrain.polycl``: options of polycl-s, polycl-o and polycl-m."""

    tau: Any = "inverse_batch"  # a positive float, or "inverse_batch" (1 / batch size, as released)
    slab_fraction: float = 0.3  # only the central fraction of each scan's slices is used
    target_labels: list[int] = field(default_factory=list)  # polycl-o/m organ flag T: these labels (empty = any)
    m_negative_scope: str = "same_scan"  # polycl-m negative: "same_scan" (paper figure) or "other_scan" (code)
    triplets: str = "online"  # "online" (fresh each epoch) or "offline_fixed" (one fixed triplet per anchor)

    def __post_init__(self) -> None:
        check_choice("pretrain.polycl.m_negative_scope", self.m_negative_scope, ("same_scan", "other_scan"))
        check_choice("pretrain.polycl.triplets", self.triplets, ("online", "offline_fixed"))
        if not 0 < self.slab_fraction <= 1:
            raise ConfigError("config key 'pretrain.polycl.slab_fraction' must lie in (0, 1]")
        if self.tau != "inverse_batch" and not (isinstance(self.tau, (int, float)) and not isinstance(self.tau, bool)
                                                and self.tau > 0):
            raise ConfigError(f"config key 'pretrain.polycl.tau' must be a positive number or 'inverse_batch', "
                              f"got {self.tau!r}")


class _PolyCL(PretrainMethod):
    options_cls = PolyCLOptions
    options_section = "polycl"
    needs_labels = True  # polycl-o/m: slice-level organ flags T from the labels of the pretraining cases
    labels_use = "slice-level organ flags"

    def __init__(self, encoder, cfg: PretrainConfig, aug: AugConfig):
        super().__init__(encoder, cfg, aug)
        self.head = PolyCLProjectionHead(encoder.out_channels[-1], encoder.out_channels[-1])
        self.cache: SliceCache | None = None

    # ------------------------------------------------------------------ example selection
    def select_rows(self, cache: SliceCache, rows: np.ndarray) -> np.ndarray:
        """Keep slab anchors that have a valid positive and negative; remember the candidate pools."""
        rows = np.asarray(rows)
        slab = rows[slab_mask(cache.slice_idx[rows], cache.n_slices[rows], self.opts.slab_fraction)]
        if self.needs_labels:
            self.check_labels(cache, slab)  # the engine checks it before; select_rows may be called directly
            bad = [c for c in self.opts.target_labels if not 1 <= c < cache.n_classes]
            if bad:  # a negative id would index from the end, one too large would be an IndexError
                raise ConfigError(f"config key 'pretrain.polycl.target_labels': no foreground class {bad} in "
                                  f"{cache.root} (its classes: 1..{cache.n_classes - 1})")
            cols = [c for c in (self.opts.target_labels or range(1, cache.n_classes))]
            target = cache.present[slab][:, cols].any(1)
        else:
            target = np.zeros(len(slab), bool)
        self.cache, self.slab, self.target = cache, slab, target
        self.scan = cache.case_ids[slab]
        self.scan_code = np.unique(self.scan, return_inverse=True)[1]  # integer ids: fast "other scan" masks
        scans = sorted(set(self.scan))
        if len(scans) < 2 and self.name != "polycl-m":
            raise DataError(f"pretrain.method={self.name} needs at least 2 pretraining scans, got {len(scans)}")
        self.pools = {(s, t): np.flatnonzero((self.scan == s) & (self.target == t)) for s in scans for t in (0, 1)}
        self.by_scan = {s: np.flatnonzero(self.scan == s) for s in scans}
        self.by_t = {t: np.flatnonzero(self.target == t) for t in (0, 1)}
        self.pos_of_row = {int(r): i for i, r in enumerate(slab)}
        box = cache.content[slab]  # every image is cut to one window size: no frame or padding cue
        self.window = int(np.minimum(box[:, 1] - box[:, 0], box[:, 3] - box[:, 2]).min()) if len(slab) else 0
        valid = np.array([self._valid(i) for i in range(len(slab))], bool)
        self.counts = {"anchors": int(valid.sum()), "dropped": int((~valid).sum()),
                       "anchors_T1": int((valid & target).sum()), "anchors_T0": int((valid & ~target).sum()),
                       "scans": len(scans)}
        if not valid.any():
            t1 = int(target.sum())
            raise DataError(f"pretrain.method={self.name}: no anchor slice has a valid positive and negative "
                            f"({len(slab)} slab slices of {len(scans)} scans, {t1} with the target, "
                            f"{len(slab) - t1} without); widen pretrain.polycl.slab_fraction or change "
                            "pretrain.polycl.target_labels")
        return slab[valid]

    def _candidates(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _valid(self, i: int) -> bool:
        pos, neg = self._candidates(i)
        return len(pos[pos != i]) > 0 and len(neg) > 0

    def _draw(self, rows: list[int], g: torch.Generator) -> tuple[list[int], list[int]]:
        pos_rows, neg_rows = [], []
        for r in rows:
            i = self.pos_of_row[int(r)]
            gi = make_generator(int(r) * 7919 + 13) if self.opts.triplets == "offline_fixed" else g
            pos, neg = self._candidates(i)
            pos = pos[pos != i]
            u = torch.rand(2, generator=gi, device=gi.device).tolist()
            pos_rows.append(int(self.slab[pos[int(u[0] * len(pos))]]))
            neg_rows.append(int(self.slab[neg[int(u[1] * len(neg))]]))
        return pos_rows, neg_rows

    # ------------------------------------------------------------------ loss
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x)[-1])

    def _images(self, rows: list[int], device) -> torch.Tensor:
        return torch.from_numpy(self.cache.read_images(rows))[:, None].to(device)

    def triplets(self, x: torch.Tensor, rows: list[int], generator: torch.Generator) -> torch.Tensor:
        """Anchors ``x`` (B, 1, H, W) of cache ``rows`` -> (3B, 1, H, W): anchors, positives, negatives, each
        cut to the method's content window."""
        pos_rows, neg_rows = self._draw(rows, generator)
        xs = torch.cat([x, self._images(pos_rows, x.device), self._images(neg_rows, x.device)])
        boxes = torch.from_numpy(self.cache.content[np.concatenate([rows, pos_rows, neg_rows])])
        return content_windows(xs, boxes, self.window, generator)

    def loss(self, batch: dict, generator: torch.Generator):
        x = batch["image"]
        # one encoder pass for all three: PolyCL's InstanceNorm couples nothing across the batch
        z = self.embed(self.triplets(x, batch["row"].tolist(), generator)).float()
        a, p, n = z.chunk(3)
        loss = polycl_infonce(a, p, n, self.opts.tau)
        with torch.no_grad():
            logs = {"cos_pos": float(torch.cosine_similarity(a, p).mean()),
                    "cos_neg": float(torch.cosine_similarity(a, n).mean()), **spread(z)}
        return loss, logs


@register_method("polycl-s")
class PolyCLS(_PolyCL):
    needs_labels = False

    def _candidates(self, i):
        return self.by_scan[self.scan[i]], np.flatnonzero(self.scan_code != self.scan_code[i])


@register_method("polycl-o")
class PolyCLO(_PolyCL):
    def _candidates(self, i):
        t = int(self.target[i])
        return self.by_t[t], self.by_t[1 - t]


@register_method("polycl-m")
class PolyCLM(_PolyCL):
    def _candidates(self, i):
        s, t = self.scan[i], int(self.target[i])
        if self.opts.m_negative_scope == "same_scan":
            neg = self.pools[(s, 1 - t)]
        else:
            neg = np.flatnonzero((self.scan_code != self.scan_code[i]) & (self.target != t))
        return self.pools[(s, t)], neg
