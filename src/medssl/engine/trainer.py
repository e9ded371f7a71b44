"""The one training loop shared by fine-tuning and pretraining.

A method supplies ``loss_fn(model, batch, step) -> (loss, logs)``, a ``make_loader(epoch)`` and optionally
``validate(model) -> dict`` with a ``score`` entry (higher is better). The loop owns everything else:
the optimiser and cosine schedule, bf16 autocast, DDP, non-finite checks, checkpoints after every
epoch (``last.pt``, and ``best.pt`` on the best validation score), ``--resume``, TensorBoard and a
JSON-lines log. Randomness is a function of (seed, epoch), so a resumed run on CPU in
deterministic mode ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from medssl.config import TrainConfig
from medssl.engine.checkpoint import load_checkpoint, save_checkpoint
from medssl.engine.distributed import DistInfo, all_reduce_mean, barrier
from medssl.engine.runs import RunDir
from medssl.errors import TrainingError
from medssl.machine import has_bf16_units


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    step: int = 0
    best_score: float = -math.inf
    best_epoch: int = -1


def amp_enabled(mode: str, device: torch.device) -> bool:
    """bf16 autocast: "bf16" forces it, "auto" uses it where the hardware has native bf16."""
    if mode == "off":
        return False
    if mode == "bf16":
        return True
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return has_bf16_units()


def lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def to_channels_last(model: nn.Module) -> nn.Module:
    """channels_last memory for every 4-D parameter and buffer (in place; the same maths).

    oneDNN (CPU) and cuDNN convolutions, pooling and batch norm then run on NHWC tensors without the
    reorders they need around each NCHW call; the speed-up is measured in BENCHMARKS.md. State dicts keep
    their keys and shapes, so checkpoints load either way.
    """
    return model.to(memory_format=torch.channels_last)


def compile_parts(model: nn.Module) -> list[nn.Module]:
    """``torch.compile`` the model's ``encoder`` and ``decoder`` in place (or the whole model without them).

    Compilation happens at the first call; its artefacts are cached (``TORCHINDUCTOR_CACHE_DIR``, default
    ``~/.cache/medssl/inductor``) so a second run of the same network skips most of it.
    """
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.expanduser("~/.cache/medssl/inductor"))
    parts = [m for m in (getattr(model, "encoder", None), getattr(model, "decoder", None))
             if isinstance(m, nn.Module)] or [model]
    for part in parts:
        part.compile(dynamic=False)
    return parts


def uncompile(parts: list[nn.Module]) -> None:
    for part in parts:
        part._compiled_call_impl = None


def group_lr(group: dict, lr: float, step: int, warmup: int) -> float:
    """A param group's learning rate: ``lr`` x its ``lr_scale``; a group with ``frozen_until`` K gets 0 before step
    K (a linear probe of the others), then ramps up linearly over ``warmup`` steps."""
    k = int(group.get("frozen_until", 0))
    if step < k:
        return 0.0
    ramp = min(1.0, (step - k + 1) / warmup) if (k and warmup) else 1.0
    return lr * float(group.get("lr_scale", 1.0)) * ramp


def build_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    """``params``: tensors, or param-group dicts that may carry an ``lr_scale`` (applied by the loop)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class Trainer:
    def __init__(self, *, model: nn.Module, cfg: TrainConfig, run: RunDir, dist: DistInfo,
                 loss_fn: Callable, make_loader: Callable, steps_per_epoch: int,
                 validate: Callable | None = None, meta: dict | None = None, progress: bool = True,
                 param_groups: list[dict] | None = None, find_unused: bool = False):
        """``find_unused``: the model may leave parameters unused in a step (its ``ddp_find_unused``); multi-GPU
        DistributedDataParallel must then look for them."""
        self.model, self.cfg, self.run, self.dist = model.to(dist.device), cfg, run, dist
        self.find_unused = find_unused
        self.loss_fn, self.make_loader, self.validate = loss_fn, make_loader, validate
        self.steps_per_epoch, self.meta, self.progress = steps_per_epoch, meta or {}, progress
        self.amp = amp_enabled(cfg.amp, dist.device)
        if cfg.channels_last:
            to_channels_last(self.model)
        self.compiled: list[nn.Module] = compile_parts(self.model) if cfg.compile else []
        groups = param_groups or [{"params": [p for p in model.parameters() if p.requires_grad]}]
        self.optimizer = build_optimizer(cfg, groups)
        self.state = TrainState()
        self.writer = None

    # ---------------------------------------------------------------- checkpoints
    def _meta(self) -> dict:
        return {**self.meta, "state": asdict(self.state), "amp": self.amp}

    def save(self, best: bool = False) -> None:
        if not self.dist.is_main:
            return
        sd = self.model.state_dict()
        if best:
            save_checkpoint(self.run.best, model=sd, meta=self._meta())
        else:
            save_checkpoint(self.run.last, model=sd, meta=self._meta(), optimizer=self.optimizer.state_dict())

    def resume(self) -> bool:
        if not self.run.last.is_file():
            return False
        ckpt = load_checkpoint(self.run.last)
        self.model.load_state_dict(ckpt["model"], strict=True)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.state = TrainState(**ckpt["meta"]["state"])
        return True

    # ---------------------------------------------------------------- loop
    def fit(self, resume: bool = False) -> TrainState:
        cfg, dist = self.cfg, self.dist
        if resume and self.resume() and dist.is_main:
            print(f"resuming {self.run.path} after epoch {self.state.epoch} (step {self.state.step})")
        net = self.model
        if dist.enabled:
            ids = [dist.device.index] if dist.device.type == "cuda" else None
            net = nn.parallel.DistributedDataParallel(  # staged methods leave parameters unused per step
                self.model, device_ids=ids, find_unused_parameters=self.find_unused)
        if dist.is_main:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.run.path / "tensorboard"))
        total = cfg.epochs * self.steps_per_epoch
        self._first_step = self.state.step
        try:
            for epoch in range(self.state.epoch, cfg.epochs):
                self._epoch(net, epoch, total)
        finally:
            if self.writer is not None:
                self.writer.close()
        return self.state

    def _forward(self, net: nn.Module, batch) -> tuple[torch.Tensor, dict]:
        """The method's loss under autocast; a compiled part that fails to compile falls back to eager."""
        with torch.profiler.record_function("medssl.forward"), \
                torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self.amp):
            try:
                return self.loss_fn(net, batch, self.state.step)
            except Exception as exc:  # inductor / C compiler problems surface at the first call
                if not self.compiled or self.state.step > self._first_step:
                    raise
                warnings.warn(f"train.compile: torch.compile failed ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); training eagerly",
                              stacklevel=2)
                uncompile(self.compiled)
                self.compiled = []
                return self.loss_fn(net, batch, self.state.step)

    def _epoch(self, net: nn.Module, epoch: int, total: int) -> None:
        from tqdm.auto import tqdm

        cfg, dist, t0 = self.cfg, self.dist, time.time()
        torch.manual_seed(cfg.seed * 100_003 + epoch * 101 + dist.rank)
        net.train()
        sums: dict[str, float] = {}
        n = 0
        bar = tqdm(self.make_loader(epoch), total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=None if (self.progress and dist.is_main) else True, leave=False)
        for batch in bar:
            lr = lr_at(cfg, self.state.step, total)
            for group in self.optimizer.param_groups:
                group["lr"] = group_lr(group, lr, self.state.step, cfg.warmup_steps)
            loss, logs = self._forward(net, batch)
            value = all_reduce_mean(dist, loss.detach().float())
            if not torch.isfinite(value):
                raise TrainingError(
                    f"non-finite loss ({value.item()}) at epoch {epoch + 1}, step {self.state.step}; stopped. "
                    f"The last good checkpoint is kept: {self.run.last if self.run.last.exists() else 'none yet'}")
            self.optimizer.zero_grad(set_to_none=True)
            with torch.profiler.record_function("medssl.backward"):
                loss.backward()
            with torch.profiler.record_function("medssl.optimizer"):
                self.optimizer.step()
            self.state.step += 1
            n += 1
            logs = {"loss": value.item(), **{k: float(v) for k, v in logs.items()}}
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix(loss=f"{logs['loss']:.4f}")
            if self.writer is not None and self.state.step % 10 == 0:
                for k, v in logs.items():
                    self.writer.add_scalar(f"train/{k}", v, self.state.step)
                self.writer.add_scalar("train/lr", lr, self.state.step)
        record = {"epoch": epoch + 1, "step": self.state.step, "seconds": round(time.time() - t0, 2),
                  **{f"train_{k}": v / max(1, n) for k, v in sums.items()}}
        self.state.epoch = epoch + 1
        last_epoch = self.state.epoch == cfg.epochs
        if self.validate is not None and (self.state.epoch % cfg.val_every == 0 or last_epoch):
            if dist.is_main:
                self.model.eval()
                with torch.no_grad(), torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=self.amp), \
                        torch.profiler.record_function("medssl.validate"):
                    val = self.validate(self.model)
                record.update({f"val_{k}": v for k, v in val.items()})
                if val["score"] > self.state.best_score:
                    self.state.best_score, self.state.best_epoch = float(val["score"]), self.state.epoch
                    self.save(best=True)
                if self.writer is not None:
                    for k, v in val.items():
                        self.writer.add_scalar(f"val/{k}", v, self.state.epoch)
            barrier(dist)
        with torch.profiler.record_function("medssl.checkpoint"):
            self.save()
        if dist.is_main:
            self.run.log(record)
            if self.progress:
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in record.items()}))
