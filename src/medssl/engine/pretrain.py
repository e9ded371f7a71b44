"""``medssl pretrain --method NAME``: self-supervised pretraining of a backbone's encoder.

Pretraining images are the fold's training patients other than the validation ones, with their
labels unused: the labelled budget's patients and the "unlabelled" ones together. That set does not
depend on M, so one pretraining per fold serves every label budget. Test and validation patients are
never seen. The run folder matches fine-tuning's (config, splits, commit, TensorBoard, ``last.pt``,
``--resume``), and ``last.pt`` loads into ``medssl finetune --init``.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from medssl.config import Config, resolve_options
from medssl.data.atomic import write_json, write_text
from medssl.data.augment import make_generator, sample_seed
from medssl.data.torch_data import EpochSampler, SliceDataset
from medssl.engine.distributed import barrier, init_distributed
from medssl.engine.finetune import begin_run, setup_run
from medssl.engine.runs import RunDir
from medssl.engine.trainer import Trainer
from medssl.errors import DataError
from medssl.methods import build_method
from medssl.methods.registry import method_class
from medssl.methods.collapse import CollapseMonitor
from medssl.models import build_model


def pretrain(cfg: Config, *, resume: bool = False, progress: bool = True) -> Path:
    dist = init_distributed()
    run = RunDir.for_config(cfg)
    if resume:
        cfg = run.saved_config()
    method_class(cfg.pretrain.method)  # an unknown method is an error before any work
    resolve_options(cfg.pretrain)  # the methods' options (pretrain.<section>) are checked before any work
    cache, split = setup_run(cfg, run, dist, resume=resume, progress=progress)
    cases = sorted(set(split.labelled) | set(split.unlabelled))
    rows = cache.rows(cases)
    if len(rows) < 2 * cfg.train.batch_size:
        raise DataError(f"pretraining needs at least {2 * cfg.train.batch_size} slices (2 batches); "
                        f"the {len(cases)} pretraining cases have {len(rows)}")

    seg = build_model(cfg.model.backbone, in_channels=1, n_classes=cache.n_classes, features=cfg.model.features,
                      **cfg.model.options)
    method = build_method(cfg.pretrain.method, seg.encoder, cfg.pretrain, cfg.aug, decoder=seg.decoder)
    method.check_labels(cache, rows)  # a method that needs_labels gets them for every pretraining case
    rows = method.select_rows(cache, rows)  # its own example selection (PolyCL, KAF), or all rows
    if dist.is_main and method.counts:
        print(f"{cfg.pretrain.method}: {method.counts}")
    if len(rows) < cfg.train.batch_size:
        raise DataError(f"{cfg.pretrain.method}: {len(rows)} usable anchor slices, fewer than one batch "
                        f"({cfg.train.batch_size})")
    begin_run(cfg, run, dist, split, resume=resume, kind="pretrain")
    dataset = SliceDataset(cache, rows)
    steps = cfg.train.steps_per_epoch or max(1, math.ceil(len(rows) / cfg.train.batch_size))
    per_rank = max(2, cfg.train.batch_size // dist.world)
    sampler = EpochSampler(len(rows), steps * per_rank * dist.world, seed=cfg.train.seed, rank=dist.rank,
                           world=dist.world)

    def make_loader(epoch: int):
        sampler.set_epoch(epoch)
        return DataLoader(dataset, batch_size=per_rank, sampler=sampler, num_workers=cfg.train.num_workers,
                          drop_last=True)

    monitor = CollapseMonitor(cfg.train.epochs * steps, method=cfg.pretrain.method)

    def loss_fn(net, batch, step):
        batch = {k: (v.to(dist.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        g = make_generator(sample_seed(cfg.train.seed, dist.rank, step), dist.device)
        method.set_step(step, cfg.train.epochs * steps)  # staged methods (gcl-full)
        loss, logs = net(batch, g)  # net: the method or its DDP wrapper (which averages the gradients over ranks)
        monitor(step, logs, float(loss.detach()))  # embedding spread + stuck loss: warns, then stops
        return loss, logs

    meta = {"kind": "pretrain", "method": cfg.pretrain.method, "model": dataclasses.asdict(cfg.model),
            "pretrain": cfg.to_dict()["pretrain"], "data": dataclasses.asdict(cfg.data),
            "n_cases": len(cases), "n_slices": int(len(rows)), "selection": method.counts,
            "transfer_decoder_stages": list(method.transfer_decoder_stages)}
    trainer = Trainer(model=method, cfg=cfg.train, run=run, dist=dist, loss_fn=loss_fn, make_loader=make_loader,
                      steps_per_epoch=steps, validate=None, meta=meta, progress=progress,
                      find_unused=method.ddp_find_unused)
    state = trainer.fit(resume=resume)
    if dist.is_main:
        write_json(run.path / "train_state.json", dataclasses.asdict(state))
        write_text(run.path / "summary.md", "\n".join([
            f"# {cfg.name}: pretraining ({cfg.pretrain.method})", "",
            f"- data: `{cfg.data.path}`, fold {split.fold} of {split.n_folds}: {len(cases)} training patients' "
            f"images ({len(rows)} slices); validation and test patients excluded",
            f"- backbone: {cfg.model.backbone} f={cfg.model.features}; method settings: "
            f"{cfg.to_dict()['pretrain']}",
            f"- example selection: {method.counts or 'none'}",
            f"- {cfg.train.epochs} epochs, {state.step} steps, batch {cfg.train.batch_size}, lr {cfg.train.lr}",
            f"- encoder for fine-tuning: `{run.last}` (medssl finetune --init {run.last})", ""]))
    barrier(dist)
    return run.path
