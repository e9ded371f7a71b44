"""Typed configuration: dataclasses loaded from YAML, with dotted command-line overrides.

    cfg = load_config("hippocampus", overrides=["train.lr=3e-4", "split.budget=5"])

A preset name resolves to ``medssl/configs/<name>.yaml``; anything else is a path. Unknown keys
and values of the wrong type raise :class:`~medssl.errors.ConfigError` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Union

import yaml

from medssl.errors import ConfigError


@dataclass
class DataConfig:
    path: str = ""  # dataset folder (MSD, nnU-Net v2, DICOM series, HDF5 folder)
    modality: str | None = None  # override dataset.json ("CT" or "MRI")
    axis: int = 2  # slicing axis in canonical RAS orientation (2 = axial)
    size: int = 64  # target in-plane size (square); must be divisible by 16
    fit: str = "pad"  # "pad": pad (downscale only if larger); "resize": scale to fit, keep aspect, pad
    spacing: list[float] = field(default_factory=list)  # in-plane target spacing (mm) [rows, cols]; [] = native
    crop: str = "none"  # "none" or "foreground": crop each volume in-plane to its body bounding box first
    ct_window: list[float] = field(default_factory=lambda: [-160.0, 240.0])
    mri_percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])
    mri_mode: str = "zscore"  # "zscore" or "minmax"
    cache_dir: str = "~/.cache/medssl/slices"


@dataclass
class SplitConfig:
    n_folds: int = 5
    fold: int = 0
    fold_seed: int = 12345
    test_cases: str | None = None  # file with a fixed hold-out list (one case id per line) instead of k-fold
    val: float = 2  # validation patients: an integer count, or a fraction of the training patients
    val_seed: int = 0
    budget: Any = "all"  # labelled patients M: an integer, a fraction in (0, 1], or "all"
    budget_seed: int = 0
    budget_mode: str = "nested"  # "nested" (clean) or "legacy" (KAF/PCL random.sample)
    group_regex: str | None = None  # e.g. "(patient\\d+)_frame\\d+": cases of one patient never straddle a split
    group_file: str | None = None  # CSV (case,patient) or JSON {case: patient}


@dataclass
class ModelConfig:
    backbone: str = "unet"
    features: int = 32
    options: dict = field(default_factory=dict)  # extra backbone-specific keyword arguments


@dataclass
class AugConfig:
    enabled: bool = True
    flip_prob: float = 0.5
    flip_axes: list[int] = field(default_factory=lambda: [0, 1])
    rotate_prob: float = 0.5
    rotate_deg: float = 15.0
    scale_prob: float = 0.3
    scale_range: list[float] = field(default_factory=lambda: [0.85, 1.15])
    elastic_prob: float = 0.2
    elastic_spacing: float = 16.0  # MONAI Rand2DElastic: control-point spacing (pixels)
    elastic_magnitude: list[float] = field(default_factory=lambda: [0.5, 1.5])  # control-point offsets (pixels)
    intensity_prob: float = 0.5
    intensity_scale: float = 0.1  # multiplicative jitter (1 +- s)
    intensity_shift: float = 0.1  # additive jitter in normalised units
    noise_prob: float = 0.2
    noise_std: float = 0.05


@dataclass
class TrainConfig:
    epochs: int = 30
    steps_per_epoch: int = 0  # 0 = one pass over the labelled slices
    batch_size: int = 16
    optimizer: str = "adamw"  # "adam", "adamw" or "sgd" (Nesterov off; momentum below)
    momentum: float = 0.9  # SGD only (KAF pretraining: SGD 0.9, lr 0.002)
    lr: float = 2e-3
    min_lr: float = 1e-5
    warmup_steps: int = 0
    weight_decay: float = 1e-5
    dice_weight: float = 1.0
    ce_weight: float = 1.0
    amp: str = "auto"  # "auto" (bf16 where supported), "bf16" or "off"
    channels_last: bool = True  # channels_last memory for the convolutions (same maths; faster on CPU and GPU)
    compile: bool = False  # torch.compile the encoder / decoder (cached; falls back to eager if it fails)
    deterministic: bool = False
    seed: int = 0
    num_workers: int = 0
    val_every: int = 1  # epochs
    init: str | None = None  # checkpoint to start from
    init_mode: str = "encoder"  # "encoder" or "full"
    freeze_encoder: bool = False  # fine-tune decoder and head only (encoder weights and BatchNorm statistics fixed)
    encoder_lr_scale: float = 1.0  # fine-tuning: the encoder's learning rate is lr x this (every init alike)
    encoder_frozen_steps: int = 0  # fine-tuning: linear probe first, encoder frozen for these steps, then all
    foreground_oversample: float = 0.0  # fraction of each batch drawn from slices containing foreground
    threads: int = 0  # torch.set_num_threads (0 = leave the default)
    patch_size: int = 0  # square training patch cut from the data.size canvas (0 = the whole canvas)


@dataclass
class ViewAugConfig:
    """Contrastive views for SimCLR / PCL / GCL-global (the project's default views; see data/views.py)."""

    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])  # random resized crop: area fraction
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333])  # and aspect ratio (log-uniform)
    flip_prob: float = 0.5
    flip_axes: list[int] = field(default_factory=lambda: [0, 1])  # disable for lateralised tasks
    rotate_prob: float = 0.5
    rotate_deg: float = 15.0
    intensity_prob: float = 0.8  # brightness (additive) and contrast (multiplicative), on [0, 1]
    brightness: float = 0.2
    contrast: list[float] = field(default_factory=lambda: [0.8, 1.2])
    gamma_prob: float = 0.3
    gamma: list[float] = field(default_factory=lambda: [0.7, 1.5])
    noise_prob: float = 0.3
    noise_std: float = 0.05  # sigma ~ U(0, noise_std), on [0, 1]
    blur_prob: float = 0.5
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 1.0])  # pixels


@dataclass
class PretrainConfig:
    method: str = "simclr"  # a name from medssl.methods (simclr, pcl, ...)
    tau: float = 0.1  # contrastive temperature
    base_tau: float = 0.07  # SupCon's base temperature (the loss is scaled by tau / base_tau)
    proj_dim: int = 512  # projection head output (PCL-style head: pool -> Linear -> ReLU -> Linear)
    pcl_theta: float = 0.1  # PCL: positives have |pos_i - pos_j| < theta (0.1 CT-like, 0.35 ACDC-like)
    # PCL / GCL / KAF: positives by position cross scans only where position explains at least this share of slice
    # appearance (methods/position_gate.py); below, within each scan only. 0 = always across scans
    position_r2_min: float = 0.1
    polycl_tau: Any = "inverse_batch"  # PolyCL: a float, or "inverse_batch" (1 / batch size, as released)
    slab_fraction: float = 0.3  # PolyCL: only the central fraction of each scan's slices is used
    target_labels: list[int] = field(default_factory=list)  # PolyCL-O/M organ flag T: these labels (empty = any)
    m_negative_scope: str = "same_scan"  # PolyCL-M negative: "same_scan" (paper figure) or "other_scan" (code)
    triplets: str = "online"  # "online" (fresh each epoch) or "offline_fixed" (one fixed triplet per anchor)
    gcl_parts: int = 4  # GCL: partitions per volume along the slice axis
    gcl_strategy: str = "GD"  # GCL global positives: "GD" (proposed), "GD-" or "GR" (SimCLR-like)
    gcl_formulation: str = "chaitanya"  # "chaitanya" (own numerator per pair) or "supcon_partition" (PCL code)
    # KAF (docs/kaf.md; method "kaf", backbone "kaf-unet"). Global losses reuse tau, base_tau, pcl_theta, proj_dim.
    kaf_w_cnn: float = 1.0  # w1: PCL loss on the pooled bottleneck embedding z_cnn (0 = off)
    kaf_w_kp: float = 1.0  # w2: the same loss on the aggregated keypoint descriptor z_kp (0 = off)
    kaf_w_local: float = 0.01  # w3: local matching loss (Sinkhorn + dustbin; 0 = off, matcher not built)
    kaf_kp_scales: list[int] = field(default_factory=list)  # KAF scales feeding z_kp and the matcher (empty = all)
    kaf_neighbour: str = "fraction"  # neighbour rule: "fraction" (s + int(f·U(-1,1)·Z)) or "acdc" (f = min(0.18, 2/Z))
    kaf_neighbour_fraction: float = 0.05  # f of the "fraction" rule; the offset is at least 1 slice
    kaf_match_radius: float = 0.0  # correspondence radius R (px, network-input frame); 0 = max(3, 20·S/512)
    kaf_sinkhorn_iters: int = 100  # log-domain Sinkhorn iterations T_s (paper 100, cpu 30)
    kaf_match_layers: int = 4  # matcher attention layers, alternating self, cross, self, cross, ... (paper 4, cpu 2)
    kaf_match_dim: int = 256  # matcher width D and its heads
    kaf_match_heads: int = 4
    kaf_head_dim: int = 256  # width of G = Conv1d(concat of the S_l), shared by the z_kp head and the matcher
    kaf_dustbin_init: float = 1.0  # initial learnable dustbin score alpha
    kaf_norm: str = "batch"  # norm of the matcher/keypoint-head MLPs: "batch" (paper, masked BN1d), "group", "layer"
    kaf_local_form: str = "code"  # "code" (0.45·mean pos + 1.0·mean dustbin, clamp -100) or "paper" (eq. 2 sums)
    kaf_local_pos_weight: float = 0.45  # code form: weight of the matched-pair term
    kaf_local_neg_weight: float = 1.0  # code form: weight of the dustbin (unmatched) term
    kaf_min_keypoints: int = 8  # anchor slices with fewer SIFT keypoints are skipped (counted in the run's log)
    kaf_keypoints: str = "pad"  # batching: "pad" (per-item counts + masks) or "truncate" (code: batch min, matched first)
    gcl_local_fraction: float = 0.5  # gcl-full: share of the steps spent in the local stage (encoder frozen)
    gcl_local_blocks: int = 2  # gcl-full: decoder stages trained by the local loss (2 = a 1/4-resolution map)
    gcl_local_regions: int = 13  # gcl-full: K x K regions at fixed positions
    gcl_local_region_size: int = 3  # gcl-full: K
    gcl_local_neg: int = 5  # gcl-full: nearest neighbouring regions used as negatives
    view_aug: str = "project"  # SimCLR/PCL/GCL views: "project" (pretrain.views) or "finetune" (the aug block)
    views: ViewAugConfig = field(default_factory=ViewAugConfig)


@dataclass
class EvalConfig:
    batch_size: int = 32
    hd95: bool = True
    save_predictions: bool = False
    sw_overlap: float = 0.5  # sliding-window inference overlap, used when train.patch_size < data.size
    sw_mode: str = "gaussian"  # window blending: "gaussian" or "constant" (MONAI sliding_window_inference)


@dataclass
class Config:
    name: str = "run"
    output_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` / ``3E5`` as floats (YAML 1.2); PyYAML's 1.1 rules need a dot."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check (and gently coerce) ``value`` against annotation ``tp``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _type_ok(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if origin is list:
        if isinstance(value, (list, tuple)):
            (arg,) = typing.get_args(tp) or (Any,)
            out = []
            for item in value:
                ok, v = _type_ok(item, arg)
                if not ok:
                    return False, value
                out.append(v)
            return True, out
        return False, value
    if origin is dict or tp is dict:
        return isinstance(value, dict), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, value  # an int stays an int (e.g. split.val = 2 patients)
        return False, value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is str:
        return isinstance(value, str), value
    return isinstance(value, tp), value


def build_dataclass(cls: type, data: dict, prefix: str) -> Any:
    """Build dataclass ``cls`` from ``data`` strictly: unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}' (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp, value, dotted = hints[f.name], data[f.name], prefix + f.name
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = build_dataclass(tp, value or {}, dotted + ".")
            continue
        ok, coerced = _type_ok(value, tp)
        if not ok:
            raise ConfigError(f"config key '{dotted}' expects {_type_name(tp)}, got {value!r}")
        kwargs[f.name] = coerced
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(overrides: list[str] | None) -> dict:
    """Turn ``["train.lr=1e-3", "data.size=64"]`` into a nested dict (values parsed as YAML)."""
    tree: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.lr=1e-3)")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        try:
            value = _yaml_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
            value = raw.strip()  # YAML 1.1 reads on/off/yes/no as booleans: keep the word (train.amp=off)
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{key}' conflicts with another override")
        node[parts[-1]] = value
    return tree


def preset_names() -> list[str]:
    folder = resources.files("medssl") / "configs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(source: str | Path, _chain: tuple[str, ...] = (), _folder: Path | None = None) -> dict:
    if isinstance(source, str) and source in preset_names():
        text = (resources.files("medssl") / "configs" / f"{source}.yaml").read_text()
        where = key = f"preset '{source}'"
    else:
        path = Path(source).expanduser()
        if _folder is not None and not path.is_absolute() and (_folder / path).is_file():
            path = _folder / path  # a relative ``base:`` is looked up next to the file that names it
        if not path.is_file():
            raise ConfigError(f"config file not found: {path} (presets: {', '.join(preset_names())})")
        text, where, key = path.read_text(), str(path), str(path.resolve())
        _folder = path.resolve().parent
    if key in _chain:
        raise ConfigError(f"{where}: circular 'base:' chain ({' -> '.join(_chain + (key,))})")
    try:
        data = _yaml_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping")
    base = data.pop("base", None)  # a config may extend a preset or another file
    if base:
        if not isinstance(base, (str, Path)):
            raise ConfigError(f"{where}: 'base' must be a preset name or a file path, got {base!r}")
        data = _deep_merge(_read_yaml(str(base), _chain + (key,), _folder), data)
    return data


def load_config(source: str | Path | None = None, overrides: list[str] | None = None,
                extra: dict | None = None) -> Config:
    """Load a preset or YAML file, apply ``extra`` (a nested dict) then dotted overrides."""
    data = _read_yaml(source) if source else {}
    if extra:
        data = _deep_merge(data, extra)
    data = _deep_merge(data, parse_overrides(overrides))
    cfg = build_dataclass(Config, data, "")
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    cfg = build_dataclass(Config, data, "")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Reject settings that cannot work, naming the key."""
    choices = {
        "data.fit": (cfg.data.fit, ("pad", "resize")),
        "data.mri_mode": (cfg.data.mri_mode, ("zscore", "minmax")),
        "data.crop": (cfg.data.crop, ("none", "foreground")),
        "eval.sw_mode": (cfg.eval.sw_mode, ("gaussian", "constant")),
        "train.optimizer": (cfg.train.optimizer, ("adam", "adamw", "sgd")),
        "train.amp": (cfg.train.amp, ("auto", "bf16", "off")),
        "train.init_mode": (cfg.train.init_mode, ("encoder", "full")),
        "split.budget_mode": (cfg.split.budget_mode, ("nested", "legacy")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"config key '{key}' must be one of {allowed}, got {value!r}")
    if cfg.data.size <= 0 or cfg.data.size % 16:
        raise ConfigError(f"config key 'data.size' must be a positive multiple of 16, got {cfg.data.size}")
    if cfg.data.spacing and (len(cfg.data.spacing) != 2 or not all(v > 0 for v in cfg.data.spacing)):
        raise ConfigError(f"config key 'data.spacing' must be [] or two positive mm values, got {cfg.data.spacing}")
    p = cfg.train.patch_size
    if p and (p < 0 or p % 16 or p > cfg.data.size):
        raise ConfigError(f"config key 'train.patch_size' must be 0 or a multiple of 16 no larger than data.size "
                          f"({cfg.data.size}), got {p}")
    if not 0 <= cfg.eval.sw_overlap < 1:
        raise ConfigError(f"config key 'eval.sw_overlap' must lie in [0, 1), got {cfg.eval.sw_overlap}")
    if cfg.data.axis not in (0, 1, 2):
        raise ConfigError(f"config key 'data.axis' must be 0, 1 or 2, got {cfg.data.axis}")
    if len(cfg.data.ct_window) != 2 or cfg.data.ct_window[0] >= cfg.data.ct_window[1]:
        raise ConfigError(f"config key 'data.ct_window' must be [low, high] with low < high, got {cfg.data.ct_window}")
    positive = {"train.epochs": cfg.train.epochs, "train.batch_size": cfg.train.batch_size,
                "train.lr": cfg.train.lr, "eval.batch_size": cfg.eval.batch_size,
                "model.features": cfg.model.features, "split.n_folds": cfg.split.n_folds}
    for key, value in positive.items():
        if not value > 0:
            raise ConfigError(f"config key '{key}' must be positive, got {value}")
    b = cfg.split.budget
    if not (b == "all" or (isinstance(b, (int, float)) and not isinstance(b, bool))):
        raise ConfigError(f"config key 'split.budget' must be an integer, a fraction or 'all', got {b!r}")
    for key, value, allowed in (("pretrain.m_negative_scope", cfg.pretrain.m_negative_scope,
                                 ("same_scan", "other_scan")),
                                ("pretrain.triplets", cfg.pretrain.triplets, ("online", "offline_fixed")),
                                ("pretrain.gcl_strategy", cfg.pretrain.gcl_strategy, ("GD", "GD-", "GR")),
                                ("pretrain.gcl_formulation", cfg.pretrain.gcl_formulation,
                                 ("chaitanya", "supcon_partition")),
                                ("pretrain.view_aug", cfg.pretrain.view_aug, ("project", "finetune"))):
        if value not in allowed:
            raise ConfigError(f"config key '{key}' must be one of {allowed}, got {value!r}")
    if not 0 < cfg.pretrain.gcl_local_fraction < 1 or cfg.pretrain.gcl_local_blocks not in (1, 2, 3, 4):
        raise ConfigError("config keys 'pretrain.gcl_local_fraction' must lie in (0, 1) and "
                          "'pretrain.gcl_local_blocks' in 1..4")
    v = cfg.pretrain.views
    if not (0 < v.crop_scale[0] <= v.crop_scale[1] <= 1 and 0 < v.crop_ratio[0] <= v.crop_ratio[1]):
        raise ConfigError(f"config keys 'pretrain.views.crop_scale' / 'crop_ratio' must be increasing pairs "
                          f"with scale in (0, 1], got {v.crop_scale} / {v.crop_ratio}")
    if not 0 < cfg.pretrain.slab_fraction <= 1:
        raise ConfigError("config key 'pretrain.slab_fraction' must lie in (0, 1]")
    if not 0 <= cfg.pretrain.position_r2_min < 1:
        raise ConfigError("config key 'pretrain.position_r2_min' must lie in [0, 1)")
    if not cfg.pretrain.tau > 0 or not cfg.pretrain.base_tau > 0:
        raise ConfigError("config keys 'pretrain.tau' and 'pretrain.base_tau' must be positive")
    if not cfg.train.encoder_lr_scale >= 0:
        raise ConfigError("config key 'train.encoder_lr_scale' must be >= 0")
    if cfg.train.encoder_frozen_steps < 0:
        raise ConfigError("config key 'train.encoder_frozen_steps' must be >= 0")
    if not 0 <= cfg.train.foreground_oversample <= 1:
        raise ConfigError("config key 'train.foreground_oversample' must lie in [0, 1]")


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
