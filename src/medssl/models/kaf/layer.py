"""The KAF layer (docs/kaf.md#kaf-layer): keypoint features from a CNN map, self-attention, sparse diffusion back.

Per scale l (stride 2^(l-1)), for B samples with up to N keypoints each (``valid`` marks real ones):

1. gather F_l at the keypoints (integer gather at floor(p / 2^(l-1)); optional bilinear sampler);
2. project C_l -> D and add the positional MLP of the normalised cell position;
3. L_att self-attention layers, x <- x + MLP([x || MHA(x, x, x)]) (one stream; docs/kaf.md#released-code-defects, 3);
4. diffuse: the attended features S_l go through Conv3x3 D->64 as if scattered into a zero map, but
   without ever building the B x D x H x W map (defect 4 of the released code): each keypoint contributes
   W1[:, :, i, j] · s_k to the 64-channel map at cell p_k - (i-1, j-1); collisions add up (scatter-add,
   deterministic, unlike the released code's last write wins), or average with ``collision="mean"``.
   Then +b1 -> BN -> ReLU -> Conv3x3 64->C_l,
   also sparse: only the cells the keypoints reach differ from one constant (see :meth:`KAFLayer.diffuse`),
   so no 64-channel map is built either (3.9-4.7x less peak memory than the dense layer, BENCHMARKS.md).
5. output Concat(F_l, D_l(S_l)) (2·C_l channels) and S_l (B, N, D).

Point-wise layers (the paper's Conv1d with kernel 1) run on the *packed* valid keypoints (M, C), so
BatchNorm1d statistics come from real keypoints only and padding never leaks in; attention runs on the
padded (B, N, D) layout with padded keys masked out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medssl.errors import ConfigError

__all__ = ["KAFLayer", "AttentionLayer", "PositionalMLP", "make_point_norm", "normalise_positions",
           "keypoint_cells", "NORMS", "SAMPLERS", "COLLISIONS"]

NORMS = ("batch", "group", "layer")
SAMPLERS = ("nearest", "bilinear")
COLLISIONS = ("sum", "mean")
DIFFUSION_CHANNELS = 64
POSITION_WIDTHS = (32, 64, 128, 256)


class _PointBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over packed keypoints (M, C); with fewer than 2 keypoints in training mode (no batch
    statistics possible) it normalises with the running statistics instead of failing."""

    def forward(self, x: Tensor) -> Tensor:
        if self.training and x.shape[0] < 2:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


def make_point_norm(kind: str, channels: int) -> nn.Module:
    """Norm for the point-wise MLPs: BatchNorm1d (paper), GroupNorm(8) or LayerNorm (deviations, per keypoint)."""
    if kind == "batch":
        return _PointBatchNorm(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "layer":
        return nn.LayerNorm(channels)
    raise ConfigError(f"model.options.kaf_norm must be one of {NORMS}, got {kind!r}")


def normalise_positions(xy: Tensor, h: int, w: int) -> Tensor:
    """(…, 2) (x, y) cell positions -> (p - (W/2, H/2)) / (0.7 · max(H, W)) (as released, (x, y) order fixed)."""
    centre = torch.tensor([w / 2, h / 2], dtype=xy.dtype, device=xy.device)
    return (xy - centre) / (0.7 * max(h, w))


def keypoint_cells(xy: Tensor, stride: int, h: int, w: int) -> Tensor:
    """Float input-frame (x, y) -> integer cells at a map of (h, w) with ``stride``: round floor(v + 0.5),
    clip to the input frame, then truncating division floor(p / stride), as the released code."""
    p = torch.floor(xy + 0.5).long()
    p[..., 0] = p[..., 0].clamp(0, w * stride - 1)
    p[..., 1] = p[..., 1].clamp(0, h * stride - 1)
    return torch.div(p, stride, rounding_mode="floor")


class PositionalMLP(nn.Module):
    """MLP_kp: 2 -> 32 -> 64 -> 128 -> 256 -> D, norm + ReLU between layers, last bias zero (110,304 params, D=256)."""

    def __init__(self, dim: int, norm: str = "batch"):
        super().__init__()
        layers: list[nn.Module] = []
        c = 2
        for width in POSITION_WIDTHS:
            layers += [nn.Linear(c, width), make_point_norm(norm, width), nn.ReLU(inplace=True)]
            c = width
        layers.append(nn.Linear(c, dim))
        nn.init.zeros_(layers[-1].bias)
        self.net = nn.Sequential(*layers)

    def forward(self, u: Tensor) -> Tensor:
        return self.net(u)


EXPLICIT_MAX_KEYS = 128


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """softmax(q·kᵀ/√d + mask)·v; ``mask`` boolean (True = attend) or additive, broadcast to the scores.

    ``F.scaled_dot_product_attention``, except for bf16 on CPU with at most 128 keys: there its fused
    kernel's forward + backward took 1.6-3x as long as plain matmuls (32 x 4 heads x 128 keys, head width
    16-64; from 256 keys on the fused kernel was faster), so the scores are formed explicitly and the
    softmax runs in float32. Every row must have at least one key to attend to.
    """
    if q.device.type != "cpu" or q.dtype != torch.bfloat16 or k.shape[-2] > EXPLICIT_MAX_KEYS:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    return s.float().softmax(-1).to(v.dtype) @ v


class AttentionLayer(nn.Module):
    """x <- x + MLP([x || MHA(x, x, x)]); q/k/v/merge D->D with bias, contiguous heads, scores/sqrt(D/h);
    MLP 2D -> 2D -> norm -> ReLU -> D (last bias zero); no LayerNorm (658,176 params at D=256)."""

    def __init__(self, dim: int, heads: int, norm: str = "batch"):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"model.options.kaf_dim ({dim}) must be divisible by kaf_heads ({heads})")
        self.dim, self.heads = dim, heads
        self.q, self.k, self.v, self.merge = (nn.Linear(dim, dim) for _ in range(4))
        self.mlp = nn.Sequential(nn.Linear(2 * dim, 2 * dim), make_point_norm(norm, 2 * dim), nn.ReLU(inplace=True),
                                 nn.Linear(2 * dim, dim))
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x: Tensor, where: tuple[Tensor, Tensor], shape: tuple[int, int], key_mask: Tensor) -> Tensor:
        """``x`` (M, D) packed; ``where`` the (b, n) of each row; ``shape`` (B, N); ``key_mask`` (B, 1, 1, N)."""
        b, n = shape
        h, d = self.heads, self.dim // self.heads

        def pad(t: Tensor) -> Tensor:  # (M, D) -> (B, h, N, d)
            return t.new_zeros(b, n, self.dim).index_put(where, t).view(b, n, h, d).transpose(1, 2)

        m = attention(pad(self.q(x)), pad(self.k(x)), pad(self.v(x)), key_mask)
        m = self.merge(m.transpose(1, 2).reshape(b, n, self.dim)[where])
        return x + self.mlp(torch.cat([x, m], dim=1))


def _exact(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _targets(cells: Tensor, bi: Tensor, h: int, w: int) -> tuple[Tensor, Tensor]:
    """Flat indices (M, 3, 3) of the outputs a 3x3 kernel tap (i, j) at input ``cells`` (M, 2) (x, y) of
    samples ``bi`` reaches (output = cell - (i-1, j-1)), and which of them lie inside the H x W map."""
    off = torch.arange(-1, 2, device=cells.device)
    ty = cells[:, 1, None, None] - off[None, :, None]  # (M, 3, 1): output row for kernel row i
    tx = cells[:, 0, None, None] - off[None, None, :]  # (M, 1, 3): output col for kernel col j
    ok = (ty >= 0) & (ty < h) & (tx >= 0) & (tx < w)  # (M, 3, 3)
    return (bi[:, None, None] * h + ty) * w + tx, ok


class KAFLayer(nn.Module):
    """One KAF layer for a map of ``channels`` channels at ``stride`` = 2^(l-1) (see the module docstring)."""

    def __init__(self, channels: int, stride: int, *, dim: int = 256, heads: int = 4, n_attention: int = 16,
                 norm: str = "batch", sampler: str = "nearest", collision: str = "sum"):
        super().__init__()
        if sampler not in SAMPLERS:
            raise ConfigError(f"model.options.kaf_sampler must be one of {SAMPLERS}, got {sampler!r}")
        if collision not in COLLISIONS:
            raise ConfigError(f"model.options.kaf_collision must be one of {COLLISIONS}, got {collision!r}")
        if n_attention < 0 or dim < 1:
            raise ConfigError(f"model.options: kaf_layers must be >= 0 and kaf_dim >= 1, got {n_attention}, {dim}")
        self.channels, self.stride, self.dim = channels, stride, dim
        self.sampler, self.collision = sampler, collision
        self.project = nn.Linear(channels, dim)
        self.position = PositionalMLP(dim, norm)
        self.attention = nn.ModuleList(AttentionLayer(dim, heads, norm) for _ in range(n_attention))
        self.diffuse1 = nn.Conv2d(dim, DIFFUSION_CHANNELS, kernel_size=3, padding=1)
        self.diffuse_bn = nn.BatchNorm2d(DIFFUSION_CHANNELS)
        self.diffuse2 = nn.Conv2d(DIFFUSION_CHANNELS, channels, kernel_size=3, padding=1)

    def _gather(self, feat: Tensor, xy: Tensor, cells: Tensor, where: tuple[Tensor, Tensor]) -> Tensor:
        """Packed (M, C) features at the keypoints: integer gather at the cells, or bilinear at
        (p + 0.5) / stride - 0.5 (level pixels; the ``bilinear`` deviation, docs/kaf.md#kaf-layer)."""
        if self.sampler == "nearest":
            c = cells[where]
            return feat.permute(0, 2, 3, 1)[where[0], c[:, 1], c[:, 0]]
        h, w = feat.shape[-2:]
        q = (xy + 0.5) / self.stride - 0.5
        grid = (2 * q + 1) / torch.tensor([w, h], dtype=q.dtype, device=q.device) - 1  # (B, N, 2)
        out = F.grid_sample(feat, grid[:, None].to(feat.dtype), mode="bilinear", padding_mode="border",
                            align_corners=False)  # (B, C, 1, N)
        return out[:, :, 0].transpose(1, 2)[where]

    def _touched(self, s: Tensor, cells: Tensor, bi: Tensor, shape: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
        """Conv3x3 D->64 (with bias) of the map holding ``s`` (M, D) at ``cells`` (M, 2) of samples ``bi``,
        where it differs from the bias: (flat indices into B*H*W, their 64 values). Each keypoint adds
        W1[:, :, i, j]·s_k at cell - (i-1, j-1); the (B, D, H, W) map is never built."""
        b, h, w = shape
        c1 = DIFFUSION_CHANNELS
        bias = self.diffuse1.bias.to(_exact(self.diffuse1.bias))
        if not s.shape[0]:
            return torch.zeros(0, dtype=torch.long, device=s.device), bias.new_zeros(0, c1)
        if self.collision == "mean":
            key = (bi * h + cells[:, 1]) * w + cells[:, 0]
            cnt = torch.zeros(b * h * w, dtype=s.dtype, device=s.device).index_add_(
                0, key, torch.ones_like(key, dtype=s.dtype))
            s = s / cnt[key][:, None]
        w1 = self.diffuse1.weight.to(s.dtype)  # (64, D, 3, 3)
        g = (s @ w1.permute(1, 2, 3, 0).reshape(self.dim, 9 * c1)).view(-1, 3, 3, c1)  # (M, 3, 3, 64)
        idx, ok = _targets(cells, bi, h, w)
        keys, inverse = torch.unique(idx[ok], return_inverse=True)
        values = bias.expand(len(keys), c1).index_add(0, inverse, g[ok].to(bias.dtype))
        return keys, values

    def diffuse(self, s: Tensor, cells: Tensor, bi: Tensor, shape: tuple[int, int, int]) -> Tensor:
        """Conv3x3 64->C_l(ReLU(BN(Conv3x3 D->64 of the scattered ``s``))) -> (B, C_l, H, W), float32.

        Sparse all the way: away from the keypoints' 3x3 neighbourhoods the 64-channel map equals the bias
        b1, so BatchNorm's batch statistics, the ReLU and the second convolution are computed from the
        touched cells plus one constant: the output is Conv(constant map) (one 1-channel convolution,
        borders included) plus each touched cell's difference from the constant scattered through W2.
        Same function (and gradients) as the dense layer; no 64-channel map is ever allocated. Computed in
        float32 (float64 for float64 weights) also under bf16 autocast.
        """
        with torch.autocast(s.device.type, enabled=False):
            return self._diffuse(s.to(_exact(self.diffuse1.bias)), cells, bi, shape)

    def _diffuse(self, s: Tensor, cells: Tensor, bi: Tensor, shape: tuple[int, int, int]) -> Tensor:
        b, h, w = shape
        bn, c1, c2 = self.diffuse_bn, DIFFUSION_CHANNELS, self.channels
        keys, v = self._touched(s, cells, bi, shape)
        dt = _exact(self.diffuse1.bias)
        bias = self.diffuse1.bias.to(dt)
        n, n0 = b * h * w, b * h * w - len(keys)
        if bn.training or bn.running_mean is None:  # batch statistics over all B*H*W cells
            mean = (n0 * bias + v.sum(0)) / n
            var = (n0 * (bias - mean) ** 2 + ((v - mean) ** 2).sum(0)) / n
            if bn.training and bn.track_running_stats:
                with torch.no_grad():
                    bn.num_batches_tracked.add_(1)
                    f = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
                    bn.running_mean.mul_(1 - f).add_(f * mean)
                    bn.running_var.mul_(1 - f).add_(f * var * n / max(n - 1, 1))
        else:
            mean, var = bn.running_mean.to(dt), bn.running_var.to(dt)
        scale = (bn.weight.to(dt) if bn.affine else 1.0) / torch.sqrt(var + bn.eps)
        shift = (bn.bias.to(dt) if bn.affine else 0.0) - mean * scale
        y0 = F.relu(bias * scale + shift)  # (64,) everywhere no keypoint reaches
        w2 = self.diffuse2.weight.to(dt)  # (C_l, 64, 3, 3)
        k0 = torch.einsum("ocij,c->oij", w2, y0)[:, None]  # Conv2 of the constant map = Conv of ones with k0
        base = F.conv2d(torch.ones(1, 1, h, w, dtype=dt, device=s.device), k0, self.diffuse2.bias.to(dt), padding=1)
        out = base.permute(0, 2, 3, 1).expand(b, h, w, c2).clone(memory_format=torch.contiguous_format)
        out = out.view(b * h * w, c2)
        if len(keys):
            delta = F.relu(v * scale + shift) - y0  # (T, 64)
            g = (delta @ w2.permute(1, 2, 3, 0).reshape(c1, 9 * c2)).view(-1, 3, 3, c2)
            t = torch.stack([keys % w, (keys // w) % h], 1)
            idx, ok = _targets(t, keys // (h * w), h, w)
            out.index_put_((idx[ok],), g[ok].to(out.dtype), accumulate=True)
        return out.view(b, h, w, c2).permute(0, 3, 1, 2)

    def forward(self, feat: Tensor, xy: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """``feat`` (B, C, H, W) at this scale, ``xy`` (B, N, 2) input-frame (x, y) pixels, ``valid`` (B, N)
        -> (Concat(feat, D(S)) (B, 2C, H, W), S (B, N, D) with zero rows where not valid)."""
        b, c, h, w = feat.shape
        if c != self.channels:
            raise ConfigError(f"KAF layer: expected {self.channels} channels, got {c}")
        n = xy.shape[1]
        cells = keypoint_cells(xy, self.stride, h, w)  # (B, N, 2)
        where = tuple(valid.nonzero(as_tuple=True))  # packed rows in (b, n) order
        x = self._gather(feat, xy, cells, where)
        u = normalise_positions(cells[where].to(x.dtype), h, w)
        s = self.project(x) + self.position(u)
        if s.shape[0]:
            key_mask = valid | ~valid.any(1, keepdim=True)  # a sample without keypoints attends to padding
            key_mask = key_mask[:, None, None, :]          # (its rows are never read back)
            for layer in self.attention:
                s = layer(s, where, (b, n), key_mask)
        out = self.diffuse(s, cells[where], where[0], (b, h, w))
        padded = s.new_zeros(b, n, self.dim).index_put(where, s)
        return torch.cat([feat, out.to(feat.dtype)], dim=1), padded
