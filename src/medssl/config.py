"""Typed configuration: dataclasses loaded from YAML, with dotted command-line overrides.

    cfg = load_config("hippocampus", overrides=["train.lr=3e-4", "split.budget=5"])

A preset name resolves to ``medssl/configs/<name>.yaml``; anything else is a path. Unknown keys
and values of the wrong type raise :class:`~medssl.errors.ConfigError` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from medssl.errors import ConfigError
from medssl.registry import Registry
from medssl.typed_config import build_dataclass, parse_overrides  # noqa: F401  (re-exported)
from medssl.typed_config import deep_merge as _deep_merge
from medssl.typed_config import yaml_load as _yaml_load


@dataclass
class DataConfig:
    path: str = ""  # dataset folder (MSD, nnU-Net v2, DICOM series, HDF5 folder)
    modality: str | None = None  # override dataset.json ("CT" or "MRI")
    channel: int = 0  # the input channel of a multi-channel dataset (MSD 4D image, nnU-Net v2 _0000/_0001 files)
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
    labelled: list[str] = field(default_factory=list)  # these training cases' patients are labelled ([] = drawn)
    labelled_file: str | None = None  # the same from a file: one case id per line, a JSON list, or advice.json


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
    """Settings shared by the pretraining methods; each method's own options live in ``pretrain.<section>``
    (``pretrain.pcl.theta``, ``pretrain.kaf.w_local``, ...), typed by the options dataclass the method declares
    (docs/extending.md). Flat keys of earlier releases (``pretrain.pcl_theta``) still load: :data:`LEGACY_KEYS`."""

    method: str = "simclr"  # a name from medssl.methods (simclr, pcl, ...)
    tau: float = 0.1  # contrastive temperature
    base_tau: float = 0.07  # SupCon's base temperature (the loss is scaled by tau / base_tau)
    proj_dim: int = 512  # projection head output (PCL-style head: pool -> Linear -> ReLU -> Linear)
    # PCL / GCL / KAF: positives by position cross scans only where position explains at least this share of slice
    # appearance (methods/position_gate.py); below, within each scan only. 0 = always across scans
    position_r2_min: float = 0.1
    view_aug: str = "project"  # SimCLR/PCL/GCL views: "project" (pretrain.views) or "finetune" (the aug block)
    views: ViewAugConfig = field(default_factory=ViewAugConfig)
    options: dict = field(default_factory=dict)  # section -> that method's options (written pretrain.<section>)


@dataclass
class EvalConfig:
    batch_size: int = 32
    hd95: bool = True
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
        """Plain nested dict in the file layout: method options as ``pretrain.<section>``."""
        out = dataclasses.asdict(self)
        out["pretrain"].update(out["pretrain"].pop("options"))
        return out


# --------------------------------------------------------------------------------------------
# Method options. A pretraining method declares its own options dataclass; ``medssl.methods`` registers it here
# under the method's section, so that ``pretrain.<section>.<key>`` is checked like any other key.
_OPTIONS: Registry[type] = Registry("options section")

# Flat pretraining keys of earlier releases -> where they live now. They still load (files, overrides, the
# config.yaml of old runs) and mean what they meant: pcl_theta was the theta of PCL's and KAF's positives.
LEGACY_KEYS: dict[str, tuple[str, ...]] = {
    "pcl_theta": ("pcl.theta", "kaf.theta"), "polycl_tau": ("polycl.tau",),
    **{k: (f"polycl.{k}",) for k in ("slab_fraction", "target_labels", "m_negative_scope", "triplets")},
    **{f"gcl_{k}": (f"gcl.{k}",) for k in ("parts", "strategy", "formulation", "local_fraction", "local_blocks",
                                            "local_regions", "local_region_size", "local_neg")},
    **{f"kaf_{k}": (f"kaf.{k}",) for k in (
        "w_cnn", "w_kp", "w_local", "kp_scales", "neighbour", "neighbour_fraction", "match_radius", "sinkhorn_iters",
        "match_layers", "match_dim", "match_heads", "head_dim", "dustbin_init", "norm", "local_form",
        "local_pos_weight", "local_neg_weight", "min_keypoints", "keypoints")},
}
# Keys of earlier releases that no longer mean anything: dropped where they are read (old runs' config.yaml).
REMOVED_KEYS: dict[str, tuple[str, ...]] = {"eval": ("save_predictions",)}


def register_options(section: str, cls: type) -> None:
    """Make ``pretrain.<section>`` a section typed by dataclass ``cls`` (called by ``register_method``)."""
    if section in {f.name for f in dataclasses.fields(PretrainConfig)} or section in LEGACY_KEYS:
        raise ValueError(f"options section {section!r} would shadow the config key 'pretrain.{section}'")
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"options of section {section!r} must be a dataclass, got {cls!r}")
    _OPTIONS.add(section, cls)


def resolve_options(pretrain: PretrainConfig) -> None:
    """Type every ``pretrain.<section>`` with its registered options class (their own checks run there) and add
    the defaults of the sections not given. Before ``medssl.methods`` is imported no section is registered and
    the sections stay as given; building a method resolves them (``build_method``)."""
    sections = _OPTIONS.names()
    for section, value in list(pretrain.options.items()):
        if section not in _OPTIONS:
            if sections:
                known = sorted({f.name for f in dataclasses.fields(PretrainConfig)} - {"options"} | set(sections))
                raise ConfigError(f"unknown config key 'pretrain.{section}' (known: {', '.join(known)})")
        elif not isinstance(value, _OPTIONS.get(section)):
            pretrain.options[section] = build_dataclass(_OPTIONS.get(section), value, f"pretrain.{section}.")
    for section in sections:
        pretrain.options.setdefault(section, _OPTIONS.get(section)())
    pretrain.options = dict(sorted(pretrain.options.items()))


def _upgrade(data: dict) -> dict:
    """One source's keys in the stored layout: legacy flat keys (:data:`LEGACY_KEYS`) and ``pretrain.<section>``
    mappings move into ``pretrain.options`` (within a source the new spelling wins); :data:`REMOVED_KEYS` go."""
    if isinstance(data, dict):
        data = {**data, **{s: {k: v for k, v in data[s].items() if k not in keys}
                           for s, keys in REMOVED_KEYS.items() if isinstance(data.get(s), dict)}}
    pre = data.get("pretrain") if isinstance(data, dict) else None
    if not isinstance(pre, dict):
        return data
    fields = {f.name for f in dataclasses.fields(PretrainConfig)}
    pre, legacy, sections = dict(pre), {}, {}
    for key in list(pre):
        if key in LEGACY_KEYS:
            value = pre.pop(key)
            for target in LEGACY_KEYS[key]:
                section, name = target.split(".")
                legacy.setdefault(section, {})[name] = value
        elif key not in fields and isinstance(pre[key], dict):
            sections[key] = pre.pop(key)
    if isinstance(pre.get("options", {}), dict):
        sections = _deep_merge(pre.pop("options", None) or {}, sections)
    if legacy or sections:
        pre["options"] = _deep_merge(legacy, sections)
    return {**data, "pretrain": pre}


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
    data = _upgrade(data)
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
        data = _deep_merge(data, _upgrade(extra))
    data = _deep_merge(data, _upgrade(parse_overrides(overrides)))
    cfg = build_dataclass(Config, data, "")
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    """A Config from a nested dict (a run's saved config.yaml; legacy keys are read as :func:`load_config` does)."""
    cfg = build_dataclass(Config, _upgrade(data), "")
    validate(cfg)
    return cfg


def check_choice(key: str, value: Any, allowed: tuple) -> None:
    """ConfigError naming ``key`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ConfigError(f"config key '{key}' must be one of {allowed}, got {value!r}")


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
        check_choice(key, value, allowed)
    resolve_options(cfg.pretrain)  # pretrain.<section>: unknown sections and bad options (once methods registered)
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
    if cfg.split.labelled and cfg.split.labelled_file:
        raise ConfigError("config keys 'split.labelled' and 'split.labelled_file' are both set: give one of them")
    check_choice("pretrain.view_aug", cfg.pretrain.view_aug, ("project", "finetune"))
    v = cfg.pretrain.views
    if not (0 < v.crop_scale[0] <= v.crop_scale[1] <= 1 and 0 < v.crop_ratio[0] <= v.crop_ratio[1]):
        raise ConfigError(f"config keys 'pretrain.views.crop_scale' / 'crop_ratio' must be increasing pairs "
                          f"with scale in (0, 1], got {v.crop_scale} / {v.crop_ratio}")
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
    resolve_options(cfg.pretrain)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
