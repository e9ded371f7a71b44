"""KAF: keypoint-augmented self-supervised pretraining (Yang et al., NeurIPS 2023; docs/kaf.md#pretraining).

One item = an anchor slice s and a neighbour slice s′ ≠ s of the same volume, each augmented
independently (one warp per view, keypoints transported exactly):

1. SIFT keypoints of both slices come from the keypoint store next to the slice cache (computed once);
2. ground-truth correspondences are the mutual nearest SIFT descriptors within Manhattan radius R on the
   **un-augmented** keypoints (both slices share the in-plane frame); a pair whose partner leaves the
   augmented view becomes unmatched;
3. the KAF-UNet encoder runs on both views (one batch of 2B): centre features and the attended keypoint
   features S_l of every KAF scale;
4. losses: w1·PCL(z_cnn) + w2·PCL(z_kp) + w3·L_local, with
   z_cnn = MLP(GAP(centre)), G = Conv1d(concat_l S_l), z_kp = MLP(mean_N G), and L_local the Sinkhorn
   matching loss of :class:`~medssl.models.kaf.matching.KeypointMatcher` on (G₁, G₂).

Both views carry the anchor's position (k+1)/Z. A term with weight 0 is not computed and its head not built,
so the paper's ablation rows (docs/kaf.md#ablation-rows) run as configured. Items whose view has no keypoint
left are masked out of z_kp and L_local (counted in the logs) instead of producing NaN.
Options: :class:`KAFOptions` (``pretrain.kaf``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medssl.config import AugConfig, PretrainConfig, check_choice
from medssl.data.augment import build_augmentation
from medssl.data.cache import SliceCache
from medssl.errors import ConfigError, DataError
from medssl.methods.collapse import spread
from medssl.methods.losses.kaf_correspondence import match_target, mutual_matches, surviving_matches
from medssl.methods.losses.kaf_local import kaf_global_loss, kaf_local_loss
from medssl.methods.position_gate import PositionGate
from medssl.methods.registry import PretrainMethod, register_method
from medssl.models.kaf.keypoints import Keypoints
from medssl.models.kaf.matching import KeypointMatcher
from medssl.models.kaf.store import KeypointStore
from medssl.models.kaf.transport import augment_with_keypoints

__all__ = ["KAF", "KAFOptions", "neighbour_slices", "match_radius", "truncate_to_batch_min"]


@dataclass
class KAFOptions:
    """``pretrain.kaf`` (docs/kaf.md; method "kaf", backbone "kaf-unet"). The global losses also use the shared
    ``pretrain.tau``, ``base_tau`` and ``proj_dim``."""

    theta: float = 0.1  # PCL positives of both global losses: |pos_i - pos_j| < theta
    w_cnn: float = 1.0  # w1: PCL loss on the pooled bottleneck embedding z_cnn (0 = off)
    w_kp: float = 1.0  # w2: the same loss on the aggregated keypoint descriptor z_kp (0 = off)
    w_local: float = 0.01  # w3: local matching loss (Sinkhorn + dustbin; 0 = off, matcher not built)
    kp_scales: list[int] = field(default_factory=list)  # KAF scales feeding z_kp and the matcher (empty = all)
    neighbour: str = "fraction"  # neighbour rule: "fraction" (s + int(f·U(-1,1)·Z)) or "acdc" (f = min(0.18, 2/Z))
    neighbour_fraction: float = 0.05  # f of the "fraction" rule; the offset is at least 1 slice
    match_radius: float = 0.0  # correspondence radius R (px, network-input frame); 0 = max(3, 20·S/512)
    sinkhorn_iters: int = 100  # log-domain Sinkhorn iterations T_s (paper 100, cpu 30)
    match_layers: int = 4  # matcher attention layers, alternating self, cross, self, cross, ... (paper 4, cpu 2)
    match_dim: int = 256  # matcher width D and its heads
    match_heads: int = 4
    head_dim: int = 256  # width of G = Conv1d(concat of the S_l), shared by the z_kp head and the matcher
    dustbin_init: float = 1.0  # initial learnable dustbin score alpha
    norm: str = "batch"  # norm of the matcher/keypoint-head MLPs: "batch" (paper, masked BN1d), "group", "layer"
    local_form: str = "code"  # "code" (0.45·mean pos + 1.0·mean dustbin, clamp -100) or "paper" (eq. 2 sums)
    local_pos_weight: float = 0.45  # code form: weight of the matched-pair term
    local_neg_weight: float = 1.0  # code form: weight of the dustbin (unmatched) term
    min_keypoints: int = 8  # anchor slices with fewer SIFT keypoints are skipped (counted in the run's log)
    keypoints: str = "pad"  # batching: "pad" (per-item counts + masks) or "truncate" (code: batch min, matched first)

    def __post_init__(self) -> None:
        weights = {"w_cnn": self.w_cnn, "w_kp": self.w_kp, "w_local": self.w_local}
        for key, w in weights.items():
            if not w >= 0:
                raise ConfigError(f"config key 'pretrain.kaf.{key}' must be >= 0, got {w}")
        if not any(w > 0 for w in weights.values()):
            raise ConfigError("config keys 'pretrain.kaf.w_cnn/w_kp/w_local': at least one must be > 0")
        for key, allowed in (("neighbour", ("fraction", "acdc")), ("norm", ("batch", "group", "layer")),
                             ("local_form", ("code", "paper")), ("keypoints", ("pad", "truncate"))):
            check_choice(f"pretrain.kaf.{key}", getattr(self, key), allowed)
        for key in ("match_layers", "sinkhorn_iters", "match_dim", "head_dim", "match_heads"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key 'pretrain.kaf.{key}' must be >= 1, got {getattr(self, key)}")
        if self.match_dim % self.match_heads:
            raise ConfigError(f"config key 'pretrain.kaf.match_dim' ({self.match_dim}) must be divisible by "
                              f"pretrain.kaf.match_heads ({self.match_heads})")
        if min(self.match_radius, self.neighbour_fraction, self.min_keypoints, self.theta) < 0:
            raise ConfigError("config keys 'pretrain.kaf.match_radius', 'neighbour_fraction', 'min_keypoints' and "
                              "'theta' must be >= 0")


def match_radius(opts: KAFOptions, size: int) -> float:
    """R in network-input pixels: ``pretrain.kaf.match_radius``, or max(3, 20·S/512) when it is 0
    (docs/kaf.md#one-step)."""
    return float(opts.match_radius) if opts.match_radius > 0 else max(3.0, 20.0 * size / 512.0)


def neighbour_slices(slices, n_slices, u: Tensor, rule: str = "fraction", fraction: float = 0.05) -> np.ndarray:
    """Neighbour slice s′ ≠ s per item (docs/kaf.md#one-step), from uniforms ``u`` in [0, 1) (one per item).

    The released rule draws s′ = clip(s + trunc(c·U(−1, 1)), 0, Z−1) with c = f·Z ("fraction") or
    c = min(0.18, 2/Z)·Z ("acdc") and redraws while s′ = s. That is sampled here exactly, without a loop:
    offset k ≠ 0 has probability ∝ clip(c − |k|, 0, 1), the clipped slice gathers the mass of the offsets
    beyond the volume, and s′ = s gets none. When c ≤ 1 the released rule never ends; here the offset is
    then ±1 (so at least one slice). A one-slice volume gives s′ = s.
    """
    out = np.empty(len(slices), np.int64)
    for i, (s, z) in enumerate(zip(np.asarray(slices).tolist(), np.asarray(n_slices).tolist())):
        if z < 2:
            out[i] = s
            continue
        t = fraction if rule == "fraction" else min(0.18, 2.0 / z)
        c = t * z
        ks = np.arange(-int(math.ceil(c)), int(math.ceil(c)) + 1)
        w = np.clip(c - np.abs(ks), 0.0, 1.0)
        cand = np.clip(s + ks, 0, z - 1)
        w[(ks == 0) | (cand == s)] = 0.0
        if w.sum() <= 0:  # c <= 1: the nearest slices
            ks = np.array([-1, 1])
            cand = np.clip(s + ks, 0, z - 1)
            w = (cand != s).astype(np.float64)
        cdf = np.cumsum(w / w.sum())
        out[i] = cand[min(int(np.searchsorted(cdf, float(u[i]), side="right")), len(cand) - 1)]
    return out


def truncate_to_batch_min(kp1: Keypoints, kp2: Keypoints, pairs: list[Tensor]
                          ) -> tuple[Keypoints, Keypoints, list[Tensor]]:
    """The released code's batching: order each item's two lists matched-first (pair i
    at index i in both views, then the unmatched keypoints in their order) and cut every list to the smallest
    count among the items whose two views both have keypoints; matches beyond the cut are lost."""
    samples = [(kp1.sample(i), kp2.sample(i)) for i in range(kp1.batch_size)]
    counts = [min(len(a[0]), len(c[0])) for a, c in samples]
    n = min([c for c in counts if c > 0], default=0)
    xs1, ds1, xs2, ds2, out = [], [], [], [], []
    for ((xy1, d1), (xy2, d2)), pr in zip(samples, pairs):
        orders = []
        for col, total in ((0, len(xy1)), (1, len(xy2))):
            first = pr[:, col].numpy()
            rest = np.setdiff1d(np.arange(total), first)  # sorted: the original order
            orders.append(np.concatenate([first, rest]).astype(np.int64)[:n])
        xs1.append(xy1[orders[0]])
        ds1.append(d1[orders[0]])
        xs2.append(xy2[orders[1]])
        ds2.append(d2[orders[1]])
        k = torch.arange(min(len(pr), n))
        out.append(torch.stack([k, k], 1))
    return (Keypoints.from_lists(xs1, ds1, n=n), Keypoints.from_lists(xs2, ds2, n=n), out)


def _cat_keypoints(a: Keypoints, b: Keypoints) -> Keypoints:
    """Stack two keypoint batches (padding the shorter to the longer N)."""
    n = max(a.n, b.n)

    def pad(k: Keypoints) -> Keypoints:
        extra = n - k.n
        if extra == 0:
            return k
        desc = None if k.desc is None else F.pad(k.desc, (0, 0, 0, extra))
        return Keypoints(F.pad(k.xy, (0, 0, 0, extra)), F.pad(k.valid, (0, extra)), desc)

    a, b = pad(a), pad(b)
    desc = None if a.desc is None or b.desc is None else torch.cat([a.desc, b.desc])
    return Keypoints(torch.cat([a.xy, b.xy]), torch.cat([a.valid, b.valid]), desc)


class _CNNHead(nn.Module):
    """GAP(centre, C) → Linear C→C/2 → ReLU → Linear C/2→d (the released code's 32f → 16f → 512)."""

    def __init__(self, channels: int, out_dim: int):
        super().__init__()
        hidden = max(1, channels // 2)
        self.net = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))

    def forward(self, centre: Tensor) -> Tensor:
        return self.net(torch.flatten(F.adaptive_avg_pool2d(centre, 1), 1))


class _KeypointHead(nn.Module):
    """mean over valid keypoints of G → Linear → BN1d → ReLU → Linear (released: 256 → 256 → 512)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.Linear(dim, out_dim)

    def forward(self, g: Tensor, valid: Tensor) -> Tensor:
        w = valid.to(g.dtype)[:, None, :]
        pooled = (g * w).sum(2) / w.sum(2).clamp(min=1.0)
        return self.fc2(F.relu(self.bn(self.fc1(pooled))))


@register_method("kaf")
class KAF(PositionGate, PretrainMethod):
    options_cls = KAFOptions
    ddp_find_unused = True  # a batch without keypoints leaves the keypoint heads unused

    def __init__(self, encoder, cfg: PretrainConfig, aug: AugConfig):
        super().__init__(encoder, cfg, aug)
        if not hasattr(encoder, "forward_kaf"):
            raise ConfigError("pretrain.method=kaf needs model.backbone=kaf-unet (an encoder with KAF layers)")
        o = self.opts
        scales = list(encoder.kaf_scales)
        self.kp_scales = list(o.kp_scales) or scales
        missing = [s for s in self.kp_scales if s not in scales]
        if missing:
            raise ConfigError(f"pretrain.kaf.kp_scales: scales {missing} carry no KAF layer "
                              f"(model.options.kaf_scales = {scales})")
        self.kp_index = [scales.index(s) for s in self.kp_scales]
        self.w_cnn, self.w_kp, self.w_local = float(o.w_cnn), float(o.w_kp), float(o.w_local)
        self.cnn_head = _CNNHead(encoder.out_channels[-1], cfg.proj_dim) if self.w_cnn > 0 else None
        uses_g = self.w_kp > 0 or self.w_local > 0
        self.g_proj = (nn.Conv1d(len(self.kp_scales) * encoder.kaf_dim, o.head_dim, kernel_size=1)
                       if uses_g else None)
        self.kp_head = _KeypointHead(o.head_dim, cfg.proj_dim) if self.w_kp > 0 else None
        self.matcher = None
        if self.w_local > 0:
            kinds = [("self", "cross")[i % 2] for i in range(o.match_layers)]
            self.matcher = KeypointMatcher(in_dim=o.head_dim, dim=o.match_dim, heads=o.match_heads,
                                           layers=kinds, sinkhorn_iters=o.sinkhorn_iters,
                                           dustbin_init=o.dustbin_init, norm=o.norm)
        self._init_heads()
        self.augment = build_augmentation(aug)  # None when aug.enabled is false
        self.cache: SliceCache | None = None
        self.store: KeypointStore | None = None

    def _init_heads(self) -> None:
        """Linear layers of the heads: Kaiming-normal (a = 0.01), bias 0, as the project's PCL head. Conv1d
        layers (G, the matcher) keep PyTorch's defaults, with the last bias of each point MLP zeroed, as released."""
        for head in (self.cnn_head, self.kp_head):
            if head is None:
                continue
            for m in head.modules():
                if isinstance(m, nn.Linear):
                    nn.init.kaiming_normal_(m.weight, a=0.01)
                    nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ data
    def select_rows(self, cache: SliceCache, rows: np.ndarray) -> np.ndarray:
        """Keep anchors with at least ``pretrain.kaf.min_keypoints`` SIFT keypoints (computing the keypoint store)."""
        rows = np.asarray(rows)
        self.cache = cache
        self.store = KeypointStore(cache, self.encoder.keypoint_settings)
        counts = np.array([self.store.count(int(r)) for r in rows], np.int64)
        keep = counts >= max(1, self.opts.min_keypoints)
        gate = self.gate(cache, rows)  # positives across scans only where position predicts appearance
        self.counts = {**gate, "anchors": int(keep.sum()), "skipped_few_keypoints": int((~keep).sum()),
                       "min_keypoints": int(self.opts.min_keypoints),
                       "keypoints_per_slice": round(float(counts.mean()), 1) if len(counts) else 0.0,
                       "match_radius_px": match_radius(self.opts, int(cache.images.shape[-1]))}
        if not keep.any():
            raise DataError(f"pretrain.method=kaf: no pretraining slice has {max(1, self.opts.min_keypoints)} or "
                            f"more SIFT keypoints ({len(rows)} slices of {cache.root}); lower "
                            f"pretrain.kaf.min_keypoints or raise model.options.sift_upsample")
        return rows[keep]

    def _neighbour_rows(self, rows: list[int], g: Tensor) -> tuple[list[int], int]:
        c = self.cache
        s, z = c.slice_idx[rows], c.n_slices[rows]
        u = torch.rand(len(rows), generator=g, device=g.device).cpu()
        nb = neighbour_slices(s, z, u, self.opts.neighbour, self.opts.neighbour_fraction)
        out = (np.asarray(rows) + (nb - s)).tolist()
        for r, o in zip(rows, out):
            if c.case_ids[o] != c.case_ids[r]:
                raise DataError(f"{c.root}: slices of case {c.case_ids[r]} are not contiguous in the cache index")
        return out, int((nb == s).sum())

    def _images(self, rows: list[int], device) -> Tensor:
        return torch.from_numpy(self.cache.read_images(rows))[:, None].to(device)

    # ------------------------------------------------------------------ loss
    def loss(self, batch: dict, generator: torch.Generator):
        if self.cache is None or self.store is None:
            raise DataError("pretrain.method=kaf: select_rows(cache, rows) must run before loss() (the keypoint store)")
        x = batch["image"]
        dev, b = x.device, x.shape[0]
        h, w = x.shape[-2:]
        rows = [int(r) for r in batch["row"].tolist()]
        nrows, same = self._neighbour_rows(rows, generator)
        kp1, kp2 = self.store.get(rows, with_desc=True), self.store.get(nrows, with_desc=True)

        pairs = []  # correspondences on the un-augmented keypoints (shared in-plane frame)
        if self.matcher is not None or self.opts.keypoints == "truncate":
            radius = match_radius(self.opts, int(w))
            for i in range(b):
                (xy1, d1), (xy2, d2) = kp1.sample(i), kp2.sample(i)
                pairs.append(mutual_matches(torch.from_numpy(xy1), torch.from_numpy(d1), torch.from_numpy(xy2),
                                            torch.from_numpy(d2), radius))
        if self.opts.keypoints == "truncate":
            kp1, kp2, pairs = truncate_to_batch_min(kp1, kp2, pairs)

        images = torch.cat([x, self._images(nrows, dev)])
        kps = _cat_keypoints(kp1, kp2)
        kps = Keypoints(kps.xy, kps.valid, None).to(dev)  # descriptors never enter the network
        views, _, kps = augment_with_keypoints(self.augment, images, None, kps, generator)
        feats, kp_feats = self.encoder.forward_kaf(views, kps)

        valid = kps.valid
        has = valid.any(1)
        item_ok = has[:b] & has[b:]  # both views keep at least one keypoint
        logs = {"keypoints_per_view": float(valid.sum(1).float().mean()), "neighbour_same_slice": float(same),
                "items_without_keypoints": float((~item_ok).sum())}
        pos = batch["rel_pos"].to(torch.float64).cpu()
        scan = self.scans(batch)
        total = feats[-1].float().sum() * 0.0  # attached to the graph even when every term is skipped
        if self.cnn_head is not None:
            z = self.cnn_head(feats[-1]).float()
            l_cnn = kaf_global_loss(z, pos, self.opts.theta, self.cfg.tau, self.cfg.base_tau, scan=scan)
            total = total + self.w_cnn * l_cnn
            logs["loss_cnn"] = float(l_cnn.detach())
            logs.update(spread(z))  # the CNN embedding: what the collapse monitor watches
        any_kp = bool(item_ok.any())
        if self.g_proj is not None and any_kp:
            s_cat = torch.cat([kp_feats[i] for i in self.kp_index], dim=2).transpose(1, 2)  # (2B, L·D, N)
            g = self.g_proj(s_cat) * valid[:, None, :].to(s_cat.dtype)
        if self.kp_head is not None and any_kp:
            keep = torch.cat([item_ok, item_ok])  # rows [view 1 of the kept items; view 2 of the kept items]
            z = self.kp_head(g[keep], valid[keep]).float()
            l_kp = kaf_global_loss(z, pos[item_ok.cpu()], self.opts.theta, self.cfg.tau, self.cfg.base_tau,
                                   scan=None if scan is None else scan[item_ok.cpu()])
            total = total + self.w_kp * l_kp
            logs["loss_kp"] = float(l_kp.detach())
        if self.matcher is not None:
            if any_kp:
                l_local, local_logs = self._local(g, kps, pairs, item_ok, b, (int(h), int(w)))
                total = total + self.w_local * l_local
                logs.update(local_logs)
            else:
                logs.update({"loss_local": 0.0, "matches_per_item": 0.0})
        return total, logs

    def _local(self, g: Tensor, kps: Keypoints, pairs: list[Tensor], item_ok: Tensor, b: int,
               size: tuple[int, int]) -> tuple[Tensor, dict]:
        """Sinkhorn matching loss on the items whose two views both keep keypoints."""
        idx = item_ok.nonzero()[:, 0]
        jdx = idx + b
        v1, v2 = kps.valid[idx], kps.valid[jdx]
        kept, before = [], 0
        for i in idx.tolist():  # a match whose partner left its view becomes unmatched (indices are kept)
            kept.append(surviving_matches(pairs[i], kps.valid[i].cpu(), kps.valid[i + b].cpu(), compact=False))
            before += len(pairs[i])
        log_p, _ = self.matcher(g[idx], g[jdx], kps.xy[idx], kps.xy[jdx], size, v1, v2)
        target = match_target(kept, v1, v2)
        loss, logs = kaf_local_loss(log_p, target, form=self.opts.local_form,
                                    pos_weight=self.opts.local_pos_weight,
                                    neg_weight=self.opts.local_neg_weight)
        out = {"loss_local": float(loss.detach()), "matches_per_item": logs["n_matches"] / len(idx),
               "matches_lost_to_augmentation": (before - logs["n_matches"]) / len(idx),
               "dustbin": float(self.matcher.dustbin.detach())}
        return loss, out
