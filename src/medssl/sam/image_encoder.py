"""TinyViT image encoder in LiteMedSAM's configuration (docs/sam.md#architecture).

medssl's own implementation (no timm): TinyViT (Wu et al., ECCV 2022) as modified by MobileSAM /
LiteMedSAM — a 1×1 stride-1 patch embedding (no downsampling), an MBConv stage at 256×256, three
windowed-attention stages at 128², 64², 64², and SAM's neck, giving a B×256×64×64 embedding for a
B×3×256×256 input. Parameter names match the published LiteMedSAM state dict exactly.

Inference speed-ups that keep the maths: the relative-position bias is added explicitly (cheaper
on CPU than the masked path of ``F.scaled_dot_product_attention``), tokens and maps share
channels_last memory so the depthwise convolutions need no copies, and
:meth:`TinyViT.fuse_batchnorm` folds every BatchNorm into the preceding convolution (a one-off,
inference-only change; the state dict keys change afterwards, so load weights first).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medssl.sam.common import LayerNorm2d


class Conv2d_BN(nn.Sequential):  # noqa: N801 - upstream name, keys ``c`` and ``bn``
    """Conv2d without bias followed by BatchNorm2d (``.c`` and ``.bn``)."""

    def __init__(self, a: int, b: int, ks: int = 1, stride: int = 1, pad: int = 0, groups: int = 1) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(a, b, ks, stride, pad, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(b))

    @torch.no_grad()
    def fused(self) -> nn.Conv2d:
        """A single Conv2d equal to conv → BN (eval statistics)."""
        c, bn = self.c, self.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        conv = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding,
                         groups=c.groups, bias=True)
        conv.weight.copy_(c.weight * scale[:, None, None, None])
        conv.bias.copy_(bn.bias - bn.running_mean * scale)
        return conv


def _fuse_children(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, Conv2d_BN):
            setattr(module, name, child.fused())
        else:
            _fuse_children(child)


class PatchEmbed(nn.Module):
    """LiteMedSAM's patch embedding: two 1×1 stride-1 Conv2d_BN with GELU (no downsampling)."""

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        n = embed_dim
        self.seq = nn.Sequential(Conv2d_BN(in_chans, n // 2), nn.GELU(), Conv2d_BN(n // 2, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual: 1×1 expand → GELU → depthwise 3×3 → GELU → 1×1 → + input → GELU."""

    def __init__(self, chans: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(chans * expand_ratio)
        self.conv1 = Conv2d_BN(chans, hidden)
        self.conv2 = Conv2d_BN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.conv3 = Conv2d_BN(hidden, chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.conv1(x))
        y = F.gelu(self.conv2(y))
        return F.gelu(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """1×1 → GELU → depthwise 3×3 (stride 2, or 1 when out_dim is 320/448/576) → GELU → 1×1; returns tokens."""

    def __init__(self, input_resolution: tuple[int, int], dim: int, out_dim: int) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        stride = 1 if out_dim in (320, 448, 576) else 2
        self.conv1 = Conv2d_BN(dim, out_dim)
        self.conv2 = Conv2d_BN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2d_BN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            h, w = self.input_resolution
            x = x.view(x.shape[0], h, w, -1).permute(0, 3, 1, 2)
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x))
        x = self.conv3(x)
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])  # a view for channels_last maps


class ConvLayer(nn.Module):
    """Stage 0: MBConv blocks at full resolution, then PatchMerging."""

    def __init__(self, dim: int, input_resolution: tuple[int, int], depth: int, out_dim: int,
                 expand_ratio: float = 4.0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = PatchMerging(input_resolution, dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x)


class Mlp(nn.Module):
    """LayerNorm → fc1 → GELU → fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class Attention(nn.Module):
    """Window self-attention with a learned bias per (|Δrow|, |Δcol|) offset and head.

    qkv is laid out per head as [q | k | v] (key_dim each); the bias table ``attention_biases``
    (heads × w²) is indexed by ``|Δrow|·w + |Δcol|`` (a non-persistent buffer).
    """

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window * window))
        r = torch.arange(window).repeat_interleave(window)
        c = torch.arange(window).repeat(window)
        idx = (r[:, None] - r[None, :]).abs() * window + (c[:, None] - c[None, :]).abs()
        self.register_buffer("attention_bias_idxs", idx, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, N, C)
        b, n, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3 * self.key_dim).transpose(1, 2)
        q, k, v = qkv.split(self.key_dim, dim=-1)
        # explicit softmax(q kᵀ / √d + bias) v: on CPU, SDPA with a float mask takes its math path plus
        # -inf guards (all/isneginf/where) that cost more than the attention itself here
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)
        attn = ((q * self.key_dim ** -0.5) @ k.transpose(-2, -1) + bias).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


class TinyViTBlock(nn.Module):
    """x + WindowAttn(x) → depthwise local conv (no residual) → x + MLP(x)."""

    def __init__(self, dim: int, input_resolution: tuple[int, int], num_heads: int, window_size: int,
                 mlp_ratio: float = 4.0, local_conv_size: int = 3) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.window_size = window_size
        self.attn = Attention(dim, num_heads, window_size)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = Conv2d_BN(dim, dim, local_conv_size, 1, local_conv_size // 2, groups=dim)

    def _window_attention(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.input_resolution
        b, n, c = x.shape
        ws = self.window_size
        if h == ws and w == ws:
            return self.attn(x)
        x = x.view(b, h, w, c)
        pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        ph, pw = h + pad_b, w + pad_r
        nh, nw = ph // ws, pw // ws
        x = x.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        x = self.attn(x)
        x = x.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, ph, pw, c)
        if pad_b or pad_r:
            x = x[:, :h, :w]
        return x.reshape(b, n, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.input_resolution
        b, n, c = x.shape
        x = x + self._window_attention(x)
        # tokens (B, N, C) are a channels_last (B, C, H, W) map: no copies around the depthwise conv
        x = self.local_conv(x.view(b, h, w, c).permute(0, 3, 1, 2))
        x = x.permute(0, 2, 3, 1).reshape(b, n, c)
        return x + self.mlp(x)


class BasicLayer(nn.Module):
    """A TinyViT attention stage (blocks, then an optional PatchMerging)."""

    def __init__(self, dim: int, input_resolution: tuple[int, int], depth: int, num_heads: int,
                 window_size: int, out_dim: int | None, mlp_ratio: float = 4.0, local_conv_size: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, input_resolution, num_heads, window_size, mlp_ratio, local_conv_size)
            for _ in range(depth))
        self.downsample = PatchMerging(input_resolution, dim, out_dim) if out_dim is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


class TinyViT(nn.Module):
    """LiteMedSAM's TinyViT: B×3×256×256 → B×256×64×64 image embedding."""

    def __init__(self, img_size: int = 256, in_chans: int = 3,
                 embed_dims: tuple[int, ...] = (64, 128, 160, 320), depths: tuple[int, ...] = (2, 2, 6, 2),
                 num_heads: tuple[int, ...] = (2, 4, 5, 10), window_sizes: tuple[int, ...] = (7, 7, 14, 7),
                 mlp_ratio: float = 4.0, mbconv_expand_ratio: float = 4.0, local_conv_size: int = 3,
                 out_chans: int = 256) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        self.layers = nn.ModuleList()
        n = len(depths)
        for i in range(n):
            scale = 2 ** (i - 1 if i == n - 1 else i)  # the last stage keeps the previous resolution
            res = (img_size // scale, img_size // scale)
            out_dim = embed_dims[i + 1] if i < n - 1 else None
            if i == 0:
                self.layers.append(ConvLayer(embed_dims[0], res, depths[0], out_dim, mbconv_expand_ratio))
            else:
                self.layers.append(BasicLayer(embed_dims[i], res, depths[i], num_heads[i], window_sizes[i],
                                              out_dim, mlp_ratio, local_conv_size))
        self.out_res = img_size // 2 ** (n - 2)
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        b, _, c = x.shape
        x = x.view(b, self.out_res, self.out_res, c).permute(0, 3, 1, 2)
        return self.neck(x)

    def fuse_batchnorm(self) -> "TinyViT":
        """Fold every Conv2d_BN into one biased Conv2d (inference only; call after loading weights)."""
        _fuse_children(self)
        return self
