"""Pretraining methods behind a small registry: a new method is one file with one decorator line.

A method is an ``nn.Module`` holding ``.encoder`` (the backbone's encoder, transferred to fine-tuning) and its own
heads. ``loss(batch, generator)`` turns a batch of cached slices (``image`` (B,1,H,W), ``rel_pos``, ``case``,
``slice``, ``n_slices``, ``row``, ``content``) into ``(loss, logs)``. Its own settings are a dataclass named by
``options_cls``, read from ``pretrain.<options_section>`` (default: the method's name) and handed to the method as
``self.opts``; the engine calls the hooks of :class:`PretrainMethod` (no-ops unless a method overrides them).
docs/extending.md walks through an example.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from medssl.config import AugConfig, PretrainConfig, register_options, resolve_options
from medssl.errors import DataError
from medssl.registry import Registry

_METHODS: Registry[type] = Registry("method")


def register_method(name: str) -> Callable[[type], type]:
    """Class decorator: make ``cls`` the pretraining method ``pretrain.method=name`` (and its options known)."""

    def decorator(cls: type) -> type:
        if cls.options_cls is not None:
            register_options(cls.options_section or name, cls.options_cls)
        _METHODS.add(name, cls)  # ValueError if another class holds the name
        cls.name = name
        return cls

    return decorator


def available_methods() -> list[str]:
    return _METHODS.names()


def method_class(name: str) -> type:
    """The class of method ``name``; a ConfigError on ``pretrain.method`` listing the methods otherwise."""
    return _METHODS.get(name, what="pretrain.method")


def build_method(name: str, encoder: nn.Module, cfg: PretrainConfig, aug: AugConfig,
                 decoder: nn.Module | None = None) -> "PretrainMethod":
    """Build method ``name``; methods with ``uses_decoder = True`` also get the segmentation decoder."""
    cls = method_class(name)
    resolve_options(cfg)
    if cls.uses_decoder:
        return cls(encoder, cfg, aug, decoder=decoder)
    return cls(encoder, cfg, aug)


class ProjectionHead(nn.Module):
    """PCL-style head: AdaptiveAvgPool(centre) -> Linear(C, C) -> ReLU -> Linear(C, d)
    (docs/methods.md#projection-heads)."""

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
    """Base class of the pretraining methods: class settings, ``self.opts`` and the hooks the engine calls."""

    name = "base"
    options_cls: type | None = None  # the method's options dataclass (None: no options of its own)
    options_section = ""  # its config section pretrain.<section>; "" = the method's name (share one by naming it)
    needs_labels = False  # True: selects examples by the labels of the pretraining cases (checked before any step)
    labels_use = ""  # what it takes from them, for the error message (PolyCL-O/M: "slice-level organ flags")
    uses_decoder = False  # True: pretrains decoder stages too (gets ``decoder=``; lists the stages to transfer in
    transfer_decoder_stages: list[int] = []  # ``transfer_decoder_stages`` for ``finetune --init``)
    ddp_find_unused = False  # True: a step may leave parameters unused (multi-GPU DDP must look for them)

    def __init__(self, encoder: nn.Module, cfg: PretrainConfig, aug: AugConfig):
        super().__init__()
        self.encoder, self.cfg, self.aug_cfg = encoder, cfg, aug
        self.opts = None  # the method's options (an ``options_cls``), from pretrain.<options_section>
        if self.options_cls is not None:
            resolve_options(cfg)
            self.opts = cfg.options[self.options_section or self.name]
        self.counts: dict = {}  # what example selection kept and dropped: logged, saved in the checkpoint's meta

    def loss(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """One step: ``(scalar loss, {name: float})`` for a batch of cached slices."""
        raise NotImplementedError

    def forward(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """The step's loss through ``nn.Module.__call__``: the engine calls the method (or its
        DistributedDataParallel wrapper) this way, so that under DDP the gradients are averaged over the ranks."""
        return self.loss(batch, generator)

    # ------------------------------------------------------------------ hooks (no-ops by default)
    def select_rows(self, cache, rows: np.ndarray) -> np.ndarray:
        """Example selection: the cache rows to draw anchors from (default: all of ``rows``). Runs once before
        training, with the slice cache; may fill ``self.counts``."""
        return np.asarray(rows)

    def set_step(self, step: int, total: int) -> None:
        """Called before every step with the global step and the run's total steps (staged methods)."""

    # ------------------------------------------------------------------ checks the engine runs
    def check_labels(self, cache, rows: np.ndarray) -> None:
        """DataError when the method ``needs_labels`` and some pretraining case of ``rows`` has no label."""
        if not self.needs_labels:
            return
        rows = np.asarray(rows)
        missing = sorted({str(c) for c in cache.case_ids[rows][~cache.labelled[rows]]})
        if missing:
            free = [m for m in available_methods() if not _METHODS.get(m).needs_labels]
            use = f" ({self.labels_use})" if self.labels_use else ""
            raise DataError(f"pretrain.method={self.name} needs the labels of its pretraining cases{use}; these have "
                            f"none: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} "
                            f"(methods that need none: {', '.join(free)})")
