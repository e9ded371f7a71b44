"""A straightforward dense formulation of the KAF layer (docs/kaf.md#kaf-layer), for tests and the benchmark only.

It follows the released code's layout: padded (B, C, N) tensors through Conv1d-style point-wise layers and
BatchNorm1d over (B, C, N), per-head attention written out with einsum/softmax, and the attended features
written into a **dense zero (B, D, H, W) map** that then goes through the 3x3 convolution. It reads the
weights of a :class:`medssl.models.kaf.KAFLayer` but shares none of its code paths (gather, packing,
attention kernel, sparse diffusion), so agreement is a real check of the sparse implementation.

Limits (those of the released code's formulation): every keypoint of every sample is valid (the released
code truncates all samples to the batch minimum), the norm is BatchNorm, collisions add up (the released
code's last-write-wins is non-deterministic) and the sampler is the integer gather.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _bn(x: Tensor, bn, training: bool) -> Tensor:
    """BatchNorm over dim 1 with ``bn``'s affine parameters; running statistics are not updated."""
    return F.batch_norm(x, bn.running_mean.clone(), bn.running_var.clone(), bn.weight, bn.bias,
                        training, 0.0, bn.eps)


def _conv1d(x: Tensor, linear) -> Tensor:
    return F.conv1d(x, linear.weight[:, :, None], linear.bias)


def dense_kaf_forward(layer, feat: Tensor, xy: Tensor) -> tuple[Tensor, Tensor]:
    """(B, C, H, W) map and (B, N, 2) float (x, y) input-frame keypoints -> (out (B, 2C, H, W), S (B, N, D))."""
    training = layer.training
    b, c, h, w = feat.shape
    stride, dim = layer.stride, layer.dim
    p = torch.floor(xy + 0.5).long()
    px = p[..., 0].clamp(0, w * stride - 1) // stride  # (B, N)
    py = p[..., 1].clamp(0, h * stride - 1) // stride
    flat = (py * w + px)[:, None, :].expand(b, c, -1)
    fk = torch.gather(feat.reshape(b, c, h * w), 2, flat)  # (B, C, N)
    d = _conv1d(fk, layer.project)
    u = torch.stack([(px.to(feat.dtype) - w / 2), (py.to(feat.dtype) - h / 2)], 1) / (0.7 * max(h, w))  # (B,2,N)
    mods = list(layer.position.net)
    for i in range(0, len(mods) - 1, 3):  # Linear, BN, ReLU triples
        u = F.relu(_bn(_conv1d(u, mods[i]), mods[i + 1], training))
    x = d + _conv1d(u, mods[-1])
    for att in layer.attention:
        heads = att.heads
        hd = dim // heads
        q, k, v = (_conv1d(x, m).view(b, heads, hd, -1) for m in (att.q, att.k, att.v))
        scores = torch.einsum("bhdn,bhdm->bhnm", q, k) / math.sqrt(hd)
        msg = torch.einsum("bhnm,bhdm->bhdn", torch.softmax(scores, dim=-1), v).reshape(b, dim, -1)
        msg = _conv1d(msg, att.merge)
        y = torch.cat([x, msg], 1)
        y = F.relu(_bn(_conv1d(y, att.mlp[0]), att.mlp[1], training))
        x = x + _conv1d(y, att.mlp[3])
    dense = feat.new_zeros(b, dim, h, w)  # the B x D x H x W map that the sparse layer avoids
    bi = torch.arange(b, device=feat.device)[:, None].expand_as(px)
    dense.permute(0, 2, 3, 1).index_put_((bi, py, px), x.transpose(1, 2), accumulate=True)  # collisions add
    m = F.conv2d(dense, layer.diffuse1.weight, layer.diffuse1.bias, padding=1)
    m = F.relu(_bn(m, layer.diffuse_bn, training), inplace=True)  # as the medssl layer
    out = F.conv2d(m, layer.diffuse2.weight, layer.diffuse2.bias, padding=1)
    return torch.cat([feat, out], 1), x.transpose(1, 2)

