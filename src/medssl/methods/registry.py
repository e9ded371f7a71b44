"""Pretraining methods behind a small registry: a new method is one file and one decorator line.

A method is an ``nn.Module`` holding ``.encoder`` (the backbone's encoder, transferred to
fine-tuning) and its own heads. ``loss(batch, generator)`` turns a batch of cached slices
(``image`` (B,1,H,W), ``rel_pos``, ``case``, ``slice``, ``n_slices``) into ``(loss, logs)``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from medssl.config import AugConfig, PretrainConfig
from medssl.errors import ConfigError

_METHODS: dict[str, type] = {}


def register_method(name: str) -> Callable[[type], type]:
    def decorator(cls: type) -> type:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"pretraining method {name!r} is already registered")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return decorator


def available_methods() -> list[str]:
    return sorted(_METHODS)


def build_method(name: str, encoder: nn.Module, cfg: PretrainConfig, aug: AugConfig,
                 decoder: nn.Module | None = None) -> "PretrainMethod":
    """Build method ``name``; methods with ``uses_decoder = True`` also get the segmentation decoder."""
    if name not in _METHODS:
        raise ConfigError(f"pretrain.method: unknown method {name!r}; available: {', '.join(available_methods())}")
    cls = _METHODS[name]
    if getattr(cls, "uses_decoder", False):
        return cls(encoder, cfg, aug, decoder=decoder)
    return cls(encoder, cfg, aug)


class ProjectionHead(nn.Module):
    """PCL-style head (baselines.md §0): AdaptiveAvgPool(centre) -> Linear(C, C) -> ReLU -> Linear(C, d)."""

    def __init__(self, channels: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(channels, channels), nn.ReLU(inplace=True), nn.Linear(channels, out_dim))
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, a=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, bottleneck: torch.Tensor) -> torch.Tensor:
        return self.net(torch.flatten(nn.functional.adaptive_avg_pool2d(bottleneck, 1), 1))


class PretrainMethod(nn.Module):
    name = "base"
    needs_labels = False  # methods that select examples by organ presence set this
    uses_decoder = False  # methods that pretrain decoder stages too (get ``decoder=`` and list them in
    transfer_decoder_stages: list[int] = []  # ``transfer_decoder_stages`` for ``finetune --init``)

    def __init__(self, encoder: nn.Module, cfg: PretrainConfig, aug: AugConfig):
        super().__init__()
        self.encoder, self.cfg, self.aug_cfg = encoder, cfg, aug

    def loss(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError
