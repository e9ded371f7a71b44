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
from medssl.report.console import print_propagation, print_refine

REFINE_SETTINGS = ("Settings: sam.KEY=VALUE for the refinement, e.g. sam.merge=union sam.iou_threshold=0.8 "
                   "sam.box_mode=per_component sam.exclude=[3] sam.policy=auto (with --run); data.KEY=VALUE "
                   "for the data, e.g. data.modality=CT. See docs/sam.md.")
PROPAGATE_SETTINGS = ("Settings: propagate.KEY=VALUE for the propagation, e.g. propagate.backend=register "
                      "propagate.label=2 propagate.iou_threshold=0.6; data.KEY=VALUE for the data, e.g. "
                      "data.modality=CT data.axis=1. See docs/sam.md.")


def _inputs(ctx: typer.Context, cls: type, section: str, data: Optional[str], command: str, needs: str,
            checkpoint: Optional[str], config: Optional[str], moved: dict[str, str] | None = None):
    """``(the --data input, the section's settings (``cls`` from section.KEY=VALUE, and --checkpoint), the
    configuration)``; ``moved``: more options of earlier releases and the overrides that replace them."""
    moved = {**moved_options(cls, section), "--modality": "data.modality=VALUE", **(moved or {})}
    overrides, words = extras(ctx, moved)
    source = legacy(words, data, command, "--data")
    if source is None:
        raise ConfigError(f"{command.split()[0]} needs {needs}")
    mine, rest = split_section(overrides, section)
    settings = section_settings(cls, mine, section)
    if checkpoint is not None:
        settings.checkpoint = checkpoint
    return source, settings, load(config, rest, section=section)


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

    images, rcfg, cfg = _inputs(ctx, RefineConfig, "sam", data, "refine COARSE", "the images: --data FILE_OR_FOLDER",
                                checkpoint, config, {"--per-component": "sam.box_mode=per_component",
                                                     "--min-component": "sam.min_component_px=VALUE"})
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
    print_refine(result, output)


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

    image, pcfg, cfg = _inputs(ctx, PropagateConfig, "propagate", data, "propagate", "the image: --data IMAGE",
                               checkpoint, config)
    rule, key_index = _key(key)
    if rule is not None:
        pcfg.key_slice = rule
    from medssl.pipeline.propagate import run_propagate

    info = run_propagate(image, output, dataclasses.asdict(pcfg), cfg.data, mask=mask, slice_index=slice_index,
                         labels=labels, key_index=key_index, gt=gt)
    print_propagation(info, output)
