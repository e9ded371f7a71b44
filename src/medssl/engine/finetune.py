"""``medssl finetune``: supervised training on the labelled budget, selection on the validation split."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.metrics import compute_dice
from torch.utils.data import DataLoader

from medssl.config import Config
from medssl.data.atomic import write_json, write_text
from medssl.data.augment import build_augmentation, make_generator, sample_seed
from medssl.data.cache import SliceCache, prepare
from medssl.data.layouts import open_data
from medssl.data.patches import patch_active, random_patches
from medssl.data.splits import (Split, describe_rule, load_split, make_split, patient_groups, save_split,
                                 with_labelled_cases)
from medssl.data.torch_data import EpochSampler, SliceDataset
from medssl.engine.checkpoint import load_checkpoint
from medssl.engine.distributed import DistInfo, barrier, broadcast_object, init_distributed
from medssl.engine.inference import segment_logits
from medssl.engine.runs import RunDir
from medssl.engine.trainer import Trainer
from medssl.errors import ConfigError, DataError
from medssl.models import build_model, load_encoder


def read_case_list(path: str, key: str) -> list[str]:
    """Case ids from a file: one per line (blank lines and lines starting with ``#`` skipped), a JSON list, or
    the ``advice.json`` of ``medssl advise`` (every case of its chosen patients)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"config key '{key}': file not found: {file}")
    text = file.read_text(encoding="utf-8")
    if text.lstrip()[:1] not in ("[", "{"):
        return [s for s in (ln.strip() for ln in text.splitlines()) if s and not s.startswith("#")]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config key '{key}': {file}: not valid JSON: {exc.msg} (line {exc.lineno})") from None
    if isinstance(data, dict) and isinstance(data.get("cases"), dict):  # advice.json
        data = [c for cases in data["cases"].values() for c in (cases if isinstance(cases, list) else [cases])]
    if not isinstance(data, list) or not all(isinstance(c, str) for c in data):
        raise ConfigError(f"config key '{key}': {file}: expected a JSON list of case ids or an advice.json")
    return data


def build_split(cfg: Config, cache: SliceCache) -> Split:
    """Split the labelled cases by patient; cases without labels only ever feed pretraining.

    ``split.labelled`` (or ``split.labelled_file``) replaces the seeded draw of the labelled patients by the
    patients of the listed training cases; test and validation parts stay those of the seeded split."""
    labelled, unlabelled_only = cache.labelled_cases, cache.unlabelled_cases
    if not labelled:
        raise DataError(f"{cache.dataset_root}: no labelled cases: fine-tuning needs at least one")
    test_cases = None
    if cfg.split.test_cases:
        path = Path(cfg.split.test_cases).expanduser()
        if not path.is_file():
            raise ConfigError(f"config key 'split.test_cases': file not found: {path}")
        test_cases = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    groups = patient_groups(labelled, regex=cfg.split.group_regex, mapping_file=cfg.split.group_file)
    split = make_split(labelled, fold=cfg.split.fold, n_folds=cfg.split.n_folds, fold_seed=cfg.split.fold_seed,
                       val_patients=cfg.split.val, val_seed=cfg.split.val_seed, budget=cfg.split.budget,
                       budget_seed=cfg.split.budget_seed, budget_mode=cfg.split.budget_mode, groups=groups,
                       test_cases=test_cases,
                       rule=describe_rule(cfg.split.group_regex, cfg.split.group_file))
    if cfg.split.labelled or cfg.split.labelled_file:
        key = "split.labelled" if cfg.split.labelled else "split.labelled_file"
        given = cfg.split.labelled or read_case_list(cfg.split.labelled_file, key)
        split = with_labelled_cases(split, given, groups, no_label=unlabelled_only, key=key)
    split.unlabelled = sorted(set(split.unlabelled) | set(unlabelled_only))
    return split


def model_meta(cfg: Config, cache: SliceCache) -> dict:
    return {"kind": "finetune", "model": dataclasses.asdict(cfg.model), "data": dataclasses.asdict(cfg.data),
            "modality": cache.meta["settings"]["modality"], "labels": cache.meta["labels"],
            "n_classes": cache.n_classes, "in_channels": 1, "train_patch": cfg.train.patch_size,
            "sw": {"overlap": cfg.eval.sw_overlap, "mode": cfg.eval.sw_mode}}


def init_from_checkpoint(model, path: str, mode: str, backbone: str) -> None:
    ckpt = load_checkpoint(path)
    meta = ckpt["meta"]
    have = meta.get("model", {}).get("backbone")
    if have is not None and have != backbone:
        raise ConfigError(f"--init {path}: checkpoint backbone '{have}' does not match model.backbone '{backbone}'")
    if mode == "encoder":
        load_encoder(model, ckpt["model"], strict=True)
        for i in meta.get("transfer_decoder_stages") or []:  # pretrained decoder stages (gcl-full)
            prefix = f"decoder.stages.{i}."
            stage = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
            try:
                model.decoder.stages[i].load_state_dict(stage, strict=True)
            except (RuntimeError, IndexError, AttributeError) as exc:
                raise ConfigError(f"--init {path}: pretrained decoder stage {i} does not fit the model "
                                  f"({str(exc).splitlines()[0][:160]})") from None
    else:
        try:
            model.load_state_dict(ckpt["model"], strict=True)
        except RuntimeError as exc:
            raise ConfigError(f"--init {path}: weights do not fit the model "
                              f"({str(exc).splitlines()[0][:160]})") from None


def param_groups(model, cfg: Config) -> list[dict]:
    """Encoder apart from decoder and head: its own lr scale and linear-probe phase, whatever the init.

    ``train.encoder_lr_scale`` multiplies the encoder's learning rate; ``train.encoder_frozen_steps`` = K keeps it
    frozen (lr 0, BatchNorm statistics fixed) for the first K steps while decoder and head learn, then ramps it up
    over ``train.warmup_steps`` (LP-FT). Random init goes through the same protocol, so a comparison stays fair.
    """
    enc = [p for p in model.encoder.parameters() if p.requires_grad]
    ids = {id(p) for p in enc}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": rest, "name": "decoder+head"}]
    if enc:
        groups.append({"params": enc, "name": "encoder", "lr_scale": cfg.train.encoder_lr_scale,
                       "frozen_until": cfg.train.encoder_frozen_steps})
    return groups


class Validator:
    """Mean foreground 3D Dice over the validation cases, on the cached (fitted) slices.

    A model trained on patches (``patch`` smaller than the canvas) is applied by sliding windows, as in
    :func:`medssl.engine.inference.segment_logits`.
    """

    def __init__(self, cache: SliceCache, case_ids: list[str], device: torch.device, batch_size: int = 32,
                 patch: int = 0, overlap: float = 0.5, mode: str = "gaussian"):
        self.cache, self.case_ids, self.device, self.batch_size = cache, case_ids, device, batch_size
        self.patch, self.overlap, self.mode = patch, overlap, mode

    def __call__(self, model) -> dict:
        n = self.cache.n_classes
        per_case = []
        for case in self.case_ids:
            x, y = self.cache.case_volume(case)
            preds = []
            for i in range(0, len(x), self.batch_size):
                xb = torch.from_numpy(np.array(x[i:i + self.batch_size]))[:, None].to(self.device)
                logits = segment_logits(model, xb, self.patch, self.overlap, self.mode, sw_batch_size=self.batch_size)
                preds.append(logits.float().argmax(1).cpu())
            pred = torch.cat(preds)  # (Z, S, S)
            gt = torch.from_numpy(np.array(y, dtype=np.int64))
            p1 = torch.nn.functional.one_hot(pred, n).permute(3, 0, 1, 2)[None]
            g1 = torch.nn.functional.one_hot(gt, n).permute(3, 0, 1, 2)[None]
            d = compute_dice(p1, g1, include_background=False, ignore_empty=True)[0]  # NaN where GT empty
            both_empty = (p1[0, 1:].flatten(1).sum(1) == 0) & (g1[0, 1:].flatten(1).sum(1) == 0)
            d = torch.where(both_empty, torch.ones_like(d), torch.nan_to_num(d, nan=0.0))
            per_case.append(d.numpy())
        arr = np.stack(per_case) if per_case else np.zeros((0, n - 1))
        out = {"score": float(arr.mean()) if arr.size else 0.0}
        for c in range(1, n):
            out[f"dice_{c}"] = float(arr[:, c - 1].mean()) if arr.size else 0.0
        return out


def setup_run(cfg: Config, run: RunDir, dist: DistInfo, *, resume: bool, progress: bool
              ) -> tuple[SliceCache, Split]:
    """Seeds and threads, the slice cache (rank 0 builds it, the others wait) and the split.

    Nothing is written into the run folder here: callers check everything else that can fail (model,
    ``--init``, example selection) and then call :func:`begin_run`, so a bad input leaves no folder
    behind. Paths are made absolute in the saved config, so evaluate and predict work from anywhere.
    """
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.train.seed)
    if not cfg.data.path:
        raise ConfigError("config key 'data.path' is empty: give the dataset folder (data.path=...)")
    cfg.data.path = str(Path(cfg.data.path).expanduser().resolve())
    cfg.data.cache_dir = str(Path(cfg.data.cache_dir).expanduser().resolve())
    if cfg.split.labelled_file:
        cfg.split.labelled_file = str(Path(cfg.split.labelled_file).expanduser().resolve())
    info = open_data(cfg.data)
    if dist.is_main:
        if not resume:
            run.check_new()
        cache = prepare(cfg.data, info, progress=progress)
    barrier(dist)
    if not dist.is_main:
        cache = prepare(cfg.data, info, progress=False)
    split_path = run.path / "splits.json"
    if dist.is_main:
        split = load_split(split_path) if (resume and split_path.is_file()) else build_split(cfg, cache)
    return cache, broadcast_object(dist, split if dist.is_main else None)


def begin_run(cfg: Config, run: RunDir, dist: DistInfo, split: Split, *, resume: bool, kind: str) -> None:
    """Create the run folder (rank 0) with the resolved config, environment and case lists."""
    if dist.is_main:
        run.start(cfg, resume=resume, kind=kind)
        save_split(split, run.path / "splits.json")
    barrier(dist)


def _same_file(a: str | None, b: str | None) -> bool:
    """Whether two init paths name the same checkpoint (a relative and an absolute path may)."""
    if a is None or b is None:
        return a == b
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def finetune(cfg: Config, *, resume: bool = False, progress: bool = True) -> Path:
    """Train a segmentation model; returns the run folder."""
    dist = init_distributed()
    run = RunDir.for_config(cfg)
    if resume:
        saved = run.saved_config()
        if cfg.train.init is not None and not _same_file(saved.train.init, cfg.train.init):
            raise ConfigError(f"--resume: the run was started with train.init={saved.train.init!r}, "
                              f"not {cfg.train.init!r}")
        cfg = saved
    cache, split = setup_run(cfg, run, dist, resume=resume, progress=progress)
    if not split.val:
        raise ConfigError("config key 'split.val' gives no validation patients: model selection needs at least 1")

    model = build_model(cfg.model.backbone, in_channels=1, n_classes=cache.n_classes,
                        features=cfg.model.features, **cfg.model.options)
    patch = cfg.train.patch_size if patch_active(cfg.train.patch_size, cfg.data.size) else 0
    if patch and model.canvas_batches:  # e.g. kaf-unet: its cached keypoints live in canvas coordinates
        raise ConfigError(f"train.patch_size is not supported with backbone {cfg.model.backbone}")
    if cfg.train.init and not (resume and run.last.is_file()):  # a run killed before its first checkpoint
        init_from_checkpoint(model, cfg.train.init, cfg.train.init_mode, cfg.model.backbone)
    if cfg.train.freeze_encoder:  # frozen transfer: the optimiser only sees decoder and head
        for p in model.encoder.parameters():
            p.requires_grad_(False)
    begin_run(cfg, run, dist, split, resume=resume, kind="finetune")

    rows = cache.rows(split.labelled)
    pipeline = build_augmentation(cfg.aug)
    dataset = SliceDataset(cache, rows)
    steps = cfg.train.steps_per_epoch or max(1, math.ceil(len(rows) / cfg.train.batch_size))
    per_rank = max(1, cfg.train.batch_size // dist.world)
    sampler = EpochSampler(len(rows), steps * per_rank * dist.world, seed=cfg.train.seed,
                           foreground=cache.present[rows, 1:].any(1),
                           fg_fraction=cfg.train.foreground_oversample, rank=dist.rank, world=dist.world)

    def make_loader(epoch: int):
        sampler.set_epoch(epoch)
        return DataLoader(dataset, batch_size=per_rank, sampler=sampler, num_workers=cfg.train.num_workers,
                          drop_last=True)

    criterion = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True,
                           lambda_dice=cfg.train.dice_weight, lambda_ce=cfg.train.ce_weight)

    def loss_fn(net, batch, step):
        x = batch["image"].to(dist.device, non_blocking=True)
        y = batch["label"].to(dist.device, non_blocking=True)
        g = None
        if pipeline is not None or patch:  # seeded by (seed, step, rank): identical after --resume
            g = make_generator(sample_seed(cfg.train.seed, dist.rank, step), dist.device)
        with torch.profiler.record_function("medssl.augment"):
            if patch:  # one patch per sample, cut from the canvas before the augmentation
                x, y = random_patches(x, y, patch, cfg.train.foreground_oversample, g)
            # the augmentation, or the backbone's own (kaf-unet: keypoints with the same draws) + forward keywords
            x, y, extra = model.prepare_batch(batch, x, y, pipeline, g, cache)
        if cfg.train.freeze_encoder or step < cfg.train.encoder_frozen_steps:
            model.encoder.eval()  # BatchNorm statistics stay those of the initialisation
        else:
            model.encoder.train()
        logits = net(x, **extra)
        return criterion(logits.float(), y[:, None]), {}

    meta = model_meta(cfg, cache)
    trainer = Trainer(model=model, cfg=cfg.train, run=run, dist=dist, loss_fn=loss_fn, make_loader=make_loader,
                      steps_per_epoch=steps, meta=meta, param_groups=param_groups(model, cfg),
                      validate=Validator(cache, split.val, dist.device, patch=patch, overlap=cfg.eval.sw_overlap,
                                         mode=cfg.eval.sw_mode),
                      progress=progress, find_unused=model.ddp_find_unused)
    state = trainer.fit(resume=resume)
    if dist.is_main:
        write_json(run.path / "train_state.json", dataclasses.asdict(state))
        write_text(run.path / "summary.md", training_summary(cfg, split, state, len(rows), trainer.amp))
    barrier(dist)
    return run.path


def training_summary(cfg: Config, split: Split, state, n_slices: int, amp: bool) -> str:
    return "\n".join([
        f"# {cfg.name}: fine-tuning",
        "",
        f"- data: `{cfg.data.path}` (axis {cfg.data.axis}, {cfg.data.size} px, fit {cfg.data.fit})",
        f"- split: fold {split.fold} of {split.n_folds} (seed {split.fold_seed}); patients grouped by {split.rule}; "
        f"label budget M={split.budget_m} ({split.budget_mode})",
        f"- labelled: {len(split.labelled)} cases ({n_slices} slices); validation {len(split.val)}; "
        f"test {len(split.test)}; unlabelled {len(split.unlabelled)}",
        f"- model: {cfg.model.backbone} f={cfg.model.features}; init: {cfg.train.init or 'random'}",
        f"- training: {cfg.train.epochs} epochs, {state.step} steps, batch {cfg.train.batch_size}, "
        f"lr {cfg.train.lr}, bf16 {'on' if amp else 'off'}" + (
            f"; {cfg.train.patch_size} px patches, sliding-window inference ({cfg.eval.sw_mode}, overlap "
            f"{cfg.eval.sw_overlap})" if patch_active(cfg.train.patch_size, cfg.data.size) else ""),
        f"- encoder: lr x {cfg.train.encoder_lr_scale}, frozen for the first {cfg.train.encoder_frozen_steps} steps"
        + (" (never trained)" if cfg.train.freeze_encoder else ""),
        f"- best validation Dice {state.best_score:.4f} at epoch {state.best_epoch}",
        "",
    ])
