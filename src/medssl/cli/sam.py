"""``medssl refine`` and ``medssl propagate``: the inputs are options, the SAM settings are dotted overrides.

    medssl refine pred/ --data DATA -o refined/ sam.merge=union sam.iou_threshold=0.8 sam.exclude=[3]
    medssl propagate --data CT.nii.gz --labels LAB.nii.gz -o prop.nii.gz propagate.backend=register

``sam.KEY=VALUE`` sets a field of :class:`medssl.sam.refine.RefineConfig` (as the ``sam:`` section of an
experiment file does), ``propagate.KEY=VALUE`` one of :class:`medssl.sam.propagate.PropagateConfig`; other
overrides (``data.axis=1``, ``data.modality=CT``) go to the configuration as in every command.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer

from medssl.cli.common import (EXTRA, ConfigOpt, app, extras, legacy, load, moved_options,
                               section_settings, split_section)
from medssl.errors import ConfigError

REFINE_SETTINGS = ("Settings: sam.KEY=VALUE for the refinement, e.g. sam.merge=union sam.iou_threshold=0.8 "
                   "sam.box_mode=per_component sam.exclude=[3] sam.policy=auto (with --run); data.KEY=VALUE "
                   "for the data, e.g. data.modality=CT. See docs/sam.md.")
PROPAGATE_SETTINGS = ("Settings: propagate.KEY=VALUE for the propagation, e.g. propagate.backend=register "
                      "propagate.label=2 propagate.iou_threshold=0.6; data.KEY=VALUE for the data, e.g. "
                      "data.modality=CT data.axis=1. See docs/sam.md.")


def _refine_moved() -> dict[str, str]:
    from medssl.sam.refine import RefineConfig

    return {**moved_options(RefineConfig, "sam"), "--per-component": "sam.box_mode=per_component",
            "--min-component": "sam.min_component_px=VALUE", "--modality": "data.modality=VALUE"}


def _propagate_moved() -> dict[str, str]:
    from medssl.sam.propagate import PropagateConfig

    return {**moved_options(PropagateConfig, "propagate"), "--modality": "data.modality=VALUE"}


@app.command(context_settings=EXTRA, epilog=REFINE_SETTINGS)
def refine(ctx: typer.Context,
           coarse: str = typer.Argument(..., help="coarse label map(s): NIfTI file or folder"),
           data: Optional[str] = typer.Option(None, "--data", "-d", help="the image(s): a file, a folder of NIfTI "
                                              "files or a dataset folder"),
           output: str = typer.Option(..., "--output", "-o", help="folder for the refined {CASE}.nii.gz"),
           labels: Optional[str] = typer.Option(None, "--labels", help="ground truth for Dice before/after"),
           config: Optional[str] = ConfigOpt,
           checkpoint: Optional[str] = typer.Option(None, help="weights file (default: the backend's own)"),
           run: Optional[str] = typer.Option(None, "--run", help="fine-tuning run whose validation patients choose "
                                             "the policy per class (with sam.policy=auto)")):
    """Refine coarse label maps with box prompts (LiteMedSAM by default); output keeps the input geometry."""
    from medssl.sam.refine import RefineConfig

    overrides, words = extras(ctx, _refine_moved())
    images = legacy(words, data, "refine COARSE", "--data")
    if images is None:
        raise ConfigError("refine needs the images: --data FILE_OR_FOLDER")
    mine, rest = split_section(overrides, "sam")
    rcfg = section_settings(RefineConfig, mine, "sam")
    if checkpoint is not None:
        rcfg.checkpoint = checkpoint
    cfg = load(config, rest, section="sam")
    if (rcfg.policy == "auto") != (run is not None):
        raise ConfigError("sam.policy=auto chooses per class on a run's validation patients: give it --run RUN_DIR "
                          "(and --run only with sam.policy=auto)")
    from medssl.pipeline.refine import refine_predictions

    validation = None
    if run is not None:
        from functools import partial

        from medssl.pipeline.sam_step import run_validation

        validation = partial(run_validation, run, Path(output) / "validation" / "coarse")
    result = refine_predictions(coarse, images, labels, out_dir=output, cfg=rcfg, data=cfg.data, validation=validation)
    if "per_class" in result:
        _print_refine(result)
    for name, d in result.get("policy", {}).get("classes", {}).items():
        typer.echo(f"{name}: {d['choice']} (validation Dice keep {d['val_dice_keep']:.3f}, "
                   f"{d['best_candidate']} {d['val_dice_best']:.3f})")
    n_boxes = sum(s["boxes"] for s in result["stats"].values())
    typer.echo(f"refined {len(result['cases'])} volume(s) ({n_boxes} boxes) -> {output}")


def _print_refine(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    def f(v, d=3):
        return "–" if v is None else f"{v:.{d}f}"

    table = Table(title=f"refinement: {len(result['cases'])} volume(s), 3D Dice / HD95 (mm) before -> after")
    for col in ("class", "Dice before", "Dice after", "Δ Dice", "HD95 before", "HD95 after"):
        table.add_column(col)
    for name, d in result["per_class"].items():
        table.add_row(name, f(d["dice_before"]), f(d["dice_after"]), f(d["dice_delta"]),
                      f(d["hd95_before"], 2), f(d["hd95_after"], 2))
    Console().print(table)


def _key(text: Optional[str]) -> tuple[Optional[str], Optional[int]]:
    """``--key``: a rule (largest, middle) or a slice index."""
    if text is None:
        return None, None
    if text.lstrip("-").isdigit():
        return None, int(text)
    if text not in ("largest", "middle"):
        raise ConfigError(f"--key: expected largest, middle or a slice index, got {text!r}")
    return text, None


@app.command(context_settings=EXTRA, epilog=PROPAGATE_SETTINGS)
def propagate(ctx: typer.Context,
              data: Optional[str] = typer.Option(None, "--data", "-d", help="the image volume (NIfTI file or DICOM "
                                                 "folder)"),
              output: str = typer.Option(..., "--output", "-o", help="output label map (.nii.gz)"),
              mask: Optional[str] = typer.Option(None, "--mask", help="2D mask of the annotated slice (.npy or NIfTI)"),
              slice_index: Optional[int] = typer.Option(None, "--slice", help="index of the annotated slice"),
              labels: Optional[str] = typer.Option(None, "--labels", help="label volume with the annotation"),
              key: Optional[str] = typer.Option(None, "--key", help="key slice of --labels per class: largest "
                                                "(default), middle, or a slice index"),
              gt: Optional[str] = typer.Option(None, "--gt", help="full label volume for 3D Dice (default: --labels)"),
              config: Optional[str] = ConfigOpt,
              checkpoint: Optional[str] = typer.Option(None, help="weights file (sam2 backend: required)")):
    """Propagate one annotated slice through the volume (LiteMedSAM chain, hybrid, registration, or SAM 2)."""
    from medssl.sam.propagate import PropagateConfig

    overrides, words = extras(ctx, _propagate_moved())
    image = legacy(words, data, "propagate", "--data")
    if image is None:
        raise ConfigError("propagate needs the image: --data IMAGE")
    mine, rest = split_section(overrides, "propagate")
    pcfg = section_settings(PropagateConfig, mine, "propagate")
    rule, key_index = _key(key)
    if rule is not None:
        pcfg.key_slice = rule
    if checkpoint is not None:
        pcfg.checkpoint = checkpoint
    cfg = load(config, rest, section="propagate")
    from medssl.pipeline.propagate import run_propagate

    info = run_propagate(image, output, dataclasses.asdict(pcfg), cfg.data, mask=mask, slice_index=slice_index,
                         labels=labels, key_index=key_index, gt=gt)
    for name, m in info.get("metrics", {}).items():
        dice = ", ".join(f"{c}: {v:.3f}" for c, v in m["dice"].items())
        typer.echo(f"{name:>11}: 3D Dice mean {m['dice_mean']:.3f} ({dice})")
    for c, by_dir in info.get("stops", {}).items():
        typer.echo(f"class {c} stopped: " + "; ".join(f"{d} {v['reason']}" + (f" at slice {v['slice']}" if
                                                       v["slice"] is not None else "") for d, v in by_dir.items()))
    typer.echo(f"key slices {info['key_slices']}; wrote {output}")
