"""``medssl plan``: derive a 2D configuration from a dataset fingerprint, with the reason for each value.

The rules (docs/plan.md has the long form):

- **Slicing axis**: the coarse axis of the median spacing when it is >= 3x the finest (thick-slice data is sliced
  along its slices), else axial (canonical axis 2).
- **In-plane spacing**: the median of the dataset; no resampling when every case is already within 1 % of it.
- **Region**: crop each volume to its body bounding box when that box leaves >= 10 % of the median slice empty.
- **Canvas** (``data.size``): the 95th percentile of the cropped, resampled slice extent, rounded up to a multiple
  of 16 (the UNet pools four times), at least 64 and at most the budget's cap (larger slices are downscaled).
- **Patch** (``train.patch_size``): the whole canvas when the budget affords it, else the budget's patch cap,
  trained with foreground oversampling and predicted with a sliding window.
- **Network**: the UNet(c1) of the papers, four levels deep; width 16 on a CPU, 32 on a GPU.
- **Batch and steps**: a fixed number of pixels per step for the budget; steps from ``--hours`` and a per-pixel
  cost of the budget's device, capped at 250 passes over every slice of the dataset.
- **Intensity**: CT windowed to the 0.5-99.5 percentiles of the foreground HU; MRI z-scored per volume.
- **Flips**: only along slice axes that no pair of classes tells apart by side (``side_dependent_axes``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from medssl.config import load_config
from medssl.data.cache import in_plane
from medssl.data.fingerprint import Fingerprint, coarse_axis, side_dependent_axes
from medssl.errors import ConfigError, DataError


@dataclass(frozen=True)
class Budget:
    features: int  # UNet width f
    max_canvas: int  # largest canvas before slices are downscaled
    max_patch: int  # largest training patch
    pixels_per_step: int  # batch x patch^2 per step
    seconds_per_pixel: float  # one training step's cost per input pixel at width 16 (scales with f^2)
    hours: float  # default time budget of one fine-tuning run
    source: str  # where seconds_per_pixel comes from


BUDGETS = {
    # 101 ms per step of 16 x 64^2 at f=16 on 2 cores with bf16: the fine-tuning reference row of
    # benchmarks/bench_pretrain.py on a quiet machine (the table now in BENCHMARKS.md, 184 ms, ran beside other jobs)
    "cpu": Budget(16, 256, 128, 16 * 64 * 64, 0.101 / (16 * 64 * 64), 0.25,
                  "2 CPU cores: 101 ms per step of 16 x 64^2 at f=16 (BENCHMARKS.md)"),
    # an estimate for one current GPU with bf16: about 50x the 2-core CPU; scripts/gpu_check.sh measures it
    "gpu": Budget(32, 512, 256, 16 * 256 * 256, 0.101 / (16 * 64 * 64) / 50, 1.0,
                  "one GPU, estimated at 50x two CPU cores (not yet measured)"),
}
CROP_EMPTY = 0.10  # crop when the body box leaves this share of the median slice empty
MAX_PASSES = 250  # no more steps than this many passes over every slice of the dataset
MIN_STEPS = 250


def _ceil16(v: float) -> int:
    return int(16 * math.ceil(v / 16))


@dataclass
class Planned:
    """The planned overrides as (dotted key, value, reason), in output order."""

    items: list[tuple[str, object, str]]
    warnings: list[str]
    base: str


def plan(fp: Fingerprint, *, budget: str = "cpu", hours: float | None = None, data_path: str | None = None,
         base: str = "generic") -> Planned:
    """Planned configuration values for this fingerprint; DataError for a dataset one plan cannot serve."""
    if budget not in BUDGETS:
        raise ConfigError(f"--budget must be one of {', '.join(BUDGETS)}, got {budget!r}")
    if fp.errors:
        raise DataError(f"{fp.root}: {fp.errors[0]}")
    b = BUDGETS[budget]
    hours = b.hours if hours is None else float(hours)
    if not hours > 0:
        raise ConfigError(f"--hours must be positive, got {hours}")
    items: list[tuple[str, object, str]] = []

    def put(key, value, why):
        items.append((key, value, why))

    labelled = [c for c in fp.cases if c.labelled]
    spacing = np.array([c.spacing for c in fp.cases], float)
    median_sp = np.median(spacing, axis=0)
    put("name", f"plan-{fp.name}".replace(" ", "_"), "plan of this dataset")
    put("data.path", data_path or fp.root, "the dataset this plan was derived from")
    if fp.channel_reason:
        put("data.channel", fp.channel, fp.channel_reason)
    put("data.modality", fp.modality, f"from the dataset description ({fp.layout} layout)"
        + (f", channel {fp.channel}" if fp.channel_reason else ""))

    # -- slicing axis and in-plane spacing
    coarse = coarse_axis(median_sp)
    axis = 2 if coarse is None else coarse
    sp_txt = " x ".join(f"{v:g}" for v in median_sp)
    put("data.axis", axis, f"median spacing {sp_txt} mm is " + (
        "isotropic within 3x: axial slices (canonical axis 2)" if coarse is None
        else f"anisotropic: sliced along its coarse axis {coarse}"))
    target = [round(float(v), 4) for v in in_plane(median_sp, axis)]
    plane = np.array([in_plane(c.spacing, axis) for c in fp.cases], float)
    spread = np.abs(plane / np.array(target) - 1).max()
    if spread <= 0.01:
        put("data.spacing", [], f"every case is already at {target[0]:g} x {target[1]:g} mm in-plane: no resampling")
    else:
        put("data.spacing", target, f"median in-plane spacing (cases range {plane.min():g}-{plane.max():g} mm); "
                                    "images cubic, labels linear on one-hot")

    # -- region, canvas, patch
    def extent(c, cropped: bool) -> np.ndarray:
        dims = [(hi - lo) if cropped else n for (lo, hi), n in zip(c.body_box, c.shape)]
        zoom = np.array(in_plane(c.spacing, axis), float) / np.array(target)
        return np.array(in_plane(dims, axis), float) * zoom

    full = np.array([extent(c, False) for c in fp.cases])
    box = np.array([extent(c, True) for c in fp.cases])
    kept = float(np.median(box.prod(1) / full.prod(1)))
    crop = kept <= 1 - CROP_EMPTY
    put("data.crop", "foreground" if crop else "none",
        f"the body box keeps {kept:.0%} of the median slice: " + (
            "crop to it, so empty background is not trained on" if crop else "nothing worth cropping"))
    shapes = box if crop else full
    longest = shapes.max(1)
    p95, med = float(np.percentile(longest, 95)), float(np.median(longest))
    canvas = min(b.max_canvas, max(64, _ceil16(p95)))
    why = f"95th percentile of the slice extent at the target spacing is {p95:.0f} px (median {med:.0f})"
    if _ceil16(p95) > b.max_canvas:
        why += f"; capped by the {budget} budget: larger slices are downscaled to fit"
    put("data.size", canvas, why)
    put("data.fit", "pad", "pad at the planned spacing (only slices larger than the canvas are downscaled)")
    patch = canvas if canvas <= b.max_patch else max(64, min(b.max_patch, _ceil16(med)))
    put("train.patch_size", 0 if patch >= canvas else patch,
        f"the whole {canvas}^2 canvas fits the {budget} budget" if patch >= canvas else
        f"{patch}^2 patches (the {budget} budget's cap) with foreground oversampling; sliding-window prediction")

    # -- network, batch, steps
    put("model.backbone", "unet", "UNet(c1) of the KAF/PCL papers: four 2x pools (canvas and patch are multiples "
                                  "of 16, the bottleneck at least 4 px)")
    put("model.features", b.features, f"width for the {budget} budget")
    batch = int(max(4, min(32, b.pixels_per_step // (patch * patch))))
    put("train.batch_size", batch, f"{b.pixels_per_step} input pixels per step on the {budget} budget "
                                   f"at {patch}^2 (clamped to 4..32)")
    step_s = b.seconds_per_pixel * batch * patch * patch * (b.features / 16) ** 2
    by_time = int(hours * 3600 * 0.85 / step_s)  # 15 % of the time for validation and checkpoints
    n_slices = sum(c.shape[axis] for c in labelled)
    by_data = MAX_PASSES * math.ceil(n_slices / batch)
    steps = max(MIN_STEPS, min(by_time, by_data))
    per_epoch = int(min(250, max(25, steps // 20)))
    epochs = max(1, math.ceil(steps / per_epoch))
    put("train.steps_per_epoch", per_epoch, "about 20 validations per run (checkpoint selection on validation)")
    put("train.epochs", epochs,
        f"{epochs * per_epoch} steps: {hours:g} h at ~{step_s * 1000:.0f} ms/step ({b.source}) gives {by_time}; "
        f"{MAX_PASSES} passes over the {n_slices} labelled slices give {by_data}")
    put("train.foreground_oversample", 0.33, "a third of each batch from foreground (nnU-Net's share)")

    # -- intensity
    if fp.modality == "CT":
        lo, hi = fp.foreground.get("p0.5", -160.0), fp.foreground.get("p99.5", 240.0)
        window = [float(math.floor(lo / 10) * 10), float(math.ceil(hi / 10) * 10)]
        put("data.ct_window", window, "0.5-99.5 percentiles of the foreground HU of all labelled cases")
    else:
        put("data.mri_mode", "zscore", f"{fp.modality}: intensities are not calibrated, z-score per volume")
        put("data.mri_percentiles", [0.5, 99.5], "clip each volume's non-zero voxels to these percentiles first")

    # -- flips
    unsafe = side_dependent_axes(labelled, fp.labels, axis)
    safe = [a for a in (0, 1) if a not in unsafe]
    reasons = "; ".join(f"axis {a}: {r[0]}" for a, r in sorted(unsafe.items()))
    why = "no pair of classes is told apart by side" if not unsafe else f"not flipped ({reasons})"
    put("aug.flip_axes", safe, why)
    put("pretrain.views.flip_axes", safe, "the same rule for the contrastive views")

    n_patients = len(labelled)
    put("split.val", 4 if n_patients >= 40 else 2, f"{n_patients} labelled cases: validation patients for "
                                                   "checkpoint selection, drawn from the training part")
    load_config(base)  # the base preset must exist
    return Planned(items=items, warnings=list(fp.warnings), base=base)


def _dump(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def render(planned: Planned, fp: Fingerprint, budget: str, hours: float | None) -> str:
    """The plan as YAML with the reason next to each value (comments), deterministic."""
    lines = [f"# medssl plan of '{fp.name}' ({len(fp.cases)} cases, {sum(c.labelled for c in fp.cases)} labelled, "
             f"{fp.modality}), budget {budget}" + (f", {hours:g} h" if hours else ""),
             "# Every value below was derived from the dataset's fingerprint; the reason follows each one.",
             "# Use it like any preset: medssl finetune --config THIS_FILE ...; override keys as usual."]
    lines += [f"# WARNING: {w}" for w in planned.warnings]
    lines.append(f"base: {planned.base}")
    sections: dict[str, list] = {}
    top = []
    for key, value, why in planned.items:
        if "." in key:
            head, rest = key.split(".", 1)
            sections.setdefault(head, []).append((rest, value, why))
        else:
            top.append((key, value, why))
    for key, value, why in top:
        lines.append(f"{key}: {_dump(value)}  # {why}")
    for head, entries in sections.items():
        lines.append(f"{head}:")
        nested: dict[str, list] = {}
        for rest, value, why in entries:
            if "." in rest:
                sub, leaf = rest.split(".", 1)
                nested.setdefault(sub, []).append((leaf, value, why))
            else:
                lines.append(f"  {rest}: {_dump(value)}  # {why}")
        for sub, leaves in nested.items():
            lines.append(f"  {sub}:")
            lines += [f"    {leaf}: {_dump(value)}  # {why}" for leaf, value, why in leaves]
    return "\n".join(lines) + "\n"


def write_plan(data: str | Path, output: str | Path, *, budget: str = "cpu", hours: float | None = None,
               modality: str | None = None, progress: bool = True, base: str = "generic") -> tuple[Path, Planned]:
    """Fingerprint ``data``, plan, and write the YAML (and ``<output>.fingerprint.json``) atomically."""
    from medssl.data.atomic import atomic_path, write_json
    from medssl.data.channels import choose_channel
    from medssl.data.fingerprint import extract_fingerprint
    from medssl.data.layouts import open_dataset

    info = open_dataset(data, modality=modality)
    channel, why = choose_channel(info)
    if channel:
        info = open_dataset(data, modality=modality, channel=channel)
    fp = extract_fingerprint(info, progress=progress)
    fp.channel_reason = why
    planned = plan(fp, budget=budget, hours=hours, data_path=str(data), base=base)
    text = render(planned, fp, budget, hours)
    out = Path(output)

    with atomic_path(out) as tmp:
        tmp.write_text(text)
        load_config(tmp)  # the plan must load as a config, or nothing is written
    write_json(out.with_name(out.name + ".fingerprint.json"), fp.to_dict())
    return out, planned
