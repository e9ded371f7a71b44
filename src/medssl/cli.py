"""The ``medssl`` command line. Every command takes ``--config PRESET|FILE`` and dotted overrides.

    medssl finetune --config hippocampus --data ../shared/data/Task04_Hippocampus split.budget=5 train.epochs=20

Errors about input (files, keys, values) print one line and exit non-zero; nothing half-written
is left behind.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from medssl.errors import MedsslError
from medssl.report.console import print_metrics

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Self-supervised pretraining and low-label fine-tuning for medical image segmentation.")
EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}

ConfigOpt = typer.Option(None, "--config", "-c", help="preset name (demo, hippocampus, ct) or YAML file")
DataOpt = typer.Option(None, "--data", "-d", help="dataset folder (sets data.path)")


def _config(config: Optional[str], ctx: typer.Context, **extra):
    from medssl.config import load_config

    tree: dict = {}
    for dotted, value in extra.items():
        if value is None:
            continue
        node = tree
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return load_config(config, overrides=list(ctx.args), extra=tree)


@app.command(context_settings=EXTRA)
def prepare(ctx: typer.Context, config: Optional[str] = ConfigOpt, data: Optional[str] = DataOpt,
            force: bool = typer.Option(False, help="rebuild even if an identical cache exists")):
    """Build (or reuse) the on-disk slice cache of a dataset."""
    from medssl.data.cache import prepare as build

    cfg = _config(config, ctx, **{"data.path": data})
    cache = build(cfg.data, force=force)
    typer.echo(f"slice cache: {cache.root}  ({cache.meta['n_slices']} slices, {len(cache.meta['cases'])} cases)")


@app.command()
def check(data_dir: str = typer.Argument(..., help="dataset folder"),
          modality: Optional[str] = typer.Option(None, help="override the modality (CT or MRI)"),
          axis: int = typer.Option(2, "--axis", help="slicing axis for the flip check (data.axis)"),
          flip_axes: str = typer.Option("0,1", "--flip-axes", help="slice axes the augmentation flips (aug.flip_axes)")):
    """Report every problem of a dataset at once (exit 1 if there is any); warn about unsafe flips."""
    from medssl.data.check import flip_warnings, run_check

    result = run_check(data_dir, modality=modality)
    for problem in result.problems:
        typer.echo(str(problem))
    if not result.problems:
        for line in flip_warnings(data_dir, axis=axis, flip_axes=_int_list(flip_axes, "--flip-axes"),
                                  modality=modality):
            typer.echo(f"warning: {line}")
    typer.echo(f"{result.n_cases} cases ({result.n_labelled} labelled, {result.n_unlabelled} unlabelled): "
               f"{len(result.problems)} problem(s)")
    raise typer.Exit(1 if result.problems else 0)


@app.command()
def plan(data: str = typer.Option(..., "--data", "-d", help="dataset folder"),
         output: str = typer.Option("plan.yaml", "--output", "-o", help="the plan (a config file)"),
         budget: str = typer.Option("cpu", "--budget", help="cpu or gpu: sizes canvas, patch, width and batch"),
         hours: Optional[float] = typer.Option(None, "--hours", help="time for one fine-tuning run "
                                                                     "(default 0.25 on cpu, 1 on gpu)"),
         modality: Optional[str] = typer.Option(None, help="override the modality (CT or MRI)")):
    """Derive a configuration from the dataset's fingerprint, with the reason for each value."""
    from medssl.planning import write_plan

    out, planned = write_plan(data, output, budget=budget, hours=hours, modality=modality)
    for line in planned.warnings:
        typer.echo(f"warning: {line}")
    typer.echo(Path(out).read_text())
    typer.echo(f"wrote {out} (and {out.name}.fingerprint.json); use it as --config {out}")


@app.command(context_settings=EXTRA)
def finetune(ctx: typer.Context, config: Optional[str] = ConfigOpt, data: Optional[str] = DataOpt,
             init: Optional[str] = typer.Option(None, "--init", help="checkpoint to start from"),
             init_mode: Optional[str] = typer.Option(None, "--init-mode", help="encoder (default) or full"),
             name: Optional[str] = typer.Option(None, help="run name (folder under output_dir)"),
             resume: bool = typer.Option(False, "--resume", help="continue a killed run from its last checkpoint"),
             evaluate: bool = typer.Option(True, help="evaluate the best checkpoint on the test fold afterwards")):
    """Fine-tune a segmentation model on the labelled budget."""
    from medssl.engine.distributed import init_distributed
    from medssl.engine.finetune import finetune as run_finetune

    cfg = _config(config, ctx, **{"data.path": data, "train.init": init, "train.init_mode": init_mode, "name": name})
    run_dir = run_finetune(cfg, resume=resume)
    if evaluate and init_distributed().is_main:
        print_metrics(_evaluate(run_dir, "test", "best", False))
    typer.echo(f"run folder: {run_dir}")


@app.command(context_settings=EXTRA)
def pretrain(ctx: typer.Context, config: Optional[str] = ConfigOpt, data: Optional[str] = DataOpt,
             method: Optional[str] = typer.Option(None, "--method", "-m", help="simclr, pcl, ..."),
             name: Optional[str] = typer.Option(None, help="run name (folder under output_dir)"),
             resume: bool = typer.Option(False, "--resume", help="continue a killed run from its last checkpoint")):
    """Self-supervised pretraining of the backbone's encoder on the fold's training images."""
    from medssl.engine.pretrain import pretrain as run_pretrain

    cfg = _config(config, ctx, **{"data.path": data, "pretrain.method": method, "name": name})
    run_dir = run_pretrain(cfg, resume=resume)
    typer.echo(f"run folder: {run_dir}\nencoder for fine-tuning: --init {run_dir / 'checkpoints' / 'last.pt'}")


def _evaluate(run_dir, part, checkpoint, save):
    from medssl.evaluation.evaluate import evaluate_run

    return evaluate_run(run_dir, part=part, checkpoint=checkpoint, save_predictions=save)


@app.command()
def evaluate(run_dir: str = typer.Argument(..., help="a fine-tuning run folder"),
             part: str = typer.Option("test", help="split part: test, val, labelled"),
             checkpoint: str = typer.Option("best", help="best, last, or a path"),
             save_predictions: bool = typer.Option(False, help="also write {CASE}.nii.gz predictions")):
    """Per-volume 3D Dice / HD95 (mm), micro Dice and slice-mean Dice; writes metrics.json and a CSV."""
    from medssl.errors import ConfigError

    if not (Path(run_dir).expanduser() / "config.yaml").is_file():  # fail before the slow torch import
        raise ConfigError(f"{run_dir}: no config.yaml: not a medssl run folder")
    print_metrics(_evaluate(run_dir, part, checkpoint, save_predictions))


@app.command()
def predict(model: str = typer.Argument(..., help="a run folder (its best checkpoint) or a checkpoint file"),
            inputs: str = typer.Argument(..., help="a NIfTI file, a DICOM series folder, or a dataset folder"),
            output: str = typer.Option(..., "--output", "-o", help="folder for {CASE}.nii.gz"),
            case: Optional[list[str]] = typer.Option(None, "--case", help="only these case ids")):
    """Write label maps with the input's original shape, affine and orientation."""
    from medssl.errors import DataError

    for what, path in (("checkpoint or run folder", model), ("input", inputs)):
        if not Path(path).expanduser().exists():  # fail before the slow torch import
            raise DataError(f"{path}: {what} not found")
    from medssl.evaluation.evaluate import predict_files, run_checkpoint

    ckpt = run_checkpoint(model) if Path(model).is_dir() else Path(model)
    written = predict_files(ckpt, inputs, output, cases=case)
    typer.echo(f"wrote {len(written)} prediction(s) to {output}")


@app.command(context_settings=EXTRA)
def experiment(ctx: typer.Context, config: str = typer.Argument(..., help="experiment YAML (see medssl.report)")):
    """Methods x label budgets x seeds x folds: pretrain once per fold, fine-tune, evaluate, tabulate."""
    from medssl.report.experiment import load_experiment, run_experiment

    exp = load_experiment(config, overrides=list(ctx.args))
    run_experiment(exp)
    typer.echo((Path(exp.output_dir).expanduser() / "results.md").read_text())


@app.command(context_settings=EXTRA)
def advise(ctx: typer.Context, config: Optional[str] = ConfigOpt, data: Optional[str] = DataOpt,
           budget: int = typer.Option(..., "--budget", "-m", help="number of patients to label (M)"),
           init: Optional[str] = typer.Option(None, "--init", help="pretrained checkpoint whose encoder embeds the "
                                                                   "patients (default: intensity statistics)"),
           strategy: str = typer.Option("typical", "--strategy", help="random, kcenter, typical or facility"),
           seed: int = typer.Option(0, "--seed", help="seed of random and of k-means (typical)"),
           output: str = typer.Option("advice", "--output", "-o", help="folder for advice.csv and embedding.png")):
    """Which training patients of the fold to label first (docs/advise.md): advice.csv and a map."""
    from medssl.advise.run import check_request, run_advise

    check_request(budget, strategy, init, seed)  # before the slow imports and the data
    cfg = _config(config, ctx, **{"data.path": data})
    info = run_advise(cfg, budget=budget, strategy=strategy, init=init, seed=seed, out=output)
    for line in info["warnings"]:
        typer.echo(f"warning: {line}")
    typer.echo(f"{strategy}: label {', '.join(info['chosen'])} (of {info['candidates']} training patients of "
               f"{info['where']}; features: {info['features']})")
    typer.echo(f"wrote {Path(info['out']) / 'advice.csv'} and embedding.png")


def _int_list(text: Optional[str], option: str) -> list[int]:
    from medssl.errors import ConfigError

    try:
        return [int(v) for v in (text or "").replace(" ", "").split(",") if v]
    except ValueError:
        raise ConfigError(f"{option}: expected comma-separated class ids, got {text!r}") from None


@app.command(context_settings=EXTRA)
def refine(ctx: typer.Context,
           coarse: str = typer.Argument(..., help="coarse label map(s): NIfTI file or folder"),
           images: str = typer.Argument(..., help="the image(s): a file, a folder of NIfTI files or a dataset folder"),
           output: str = typer.Option(..., "--output", "-o", help="folder for the refined {CASE}.nii.gz"),
           labels: Optional[str] = typer.Option(None, "--labels", help="ground truth for Dice before/after"),
           config: Optional[str] = ConfigOpt,
           backend: str = typer.Option("litemedsam", help="segmenter backend: litemedsam or sam2"),
           checkpoint: Optional[str] = typer.Option(None, help="weights file (default: the backend's own)"),
           box_pad: int = typer.Option(0, "--box-pad", help="pixels added around every box"),
           per_component: bool = typer.Option(False, "--per-component", help="one box per connected component"),
           min_component: int = typer.Option(0, "--min-component", help="smaller components (px) are not prompted"),
           merge: str = typer.Option("replace", help="replace, intersect or union with the coarse mask"),
           iou_threshold: float = typer.Option(0.0, "--iou-threshold", help="keep coarse below this predicted IoU"),
           exclude: Optional[str] = typer.Option(None, "--exclude", help="class ids left unrefined, e.g. 2,3"),
           overlap: str = typer.Option("coarse", help="overlap rule between classes: coarse, score or order"),
           axis: Optional[int] = typer.Option(None, "--axis", help="slicing axis (default: data.axis)"),
           modality: Optional[str] = typer.Option(None, help="CT or MRI (default: dataset.json or guessed)"),
           device: Optional[str] = typer.Option(None, help="torch device"),
           policy: str = typer.Option("fixed", help="fixed (the options above) or auto (per class, on --run's "
                                      "validation patients)"),
           run: Optional[str] = typer.Option(None, "--run", help="fine-tuning run whose validation patients choose "
                                             "the policies (--policy auto)"),
           candidates: Optional[str] = typer.Option(None, help="policies auto tries besides keep, e.g. "
                                                    "union,gate0.8,component-replace (default: all)"),
           auto_margin: float = typer.Option(0.01, "--auto-margin", help="auto: Dice a policy must gain over keep")):
    """Refine coarse label maps with box prompts (LiteMedSAM by default); output keeps the input geometry."""
    from medssl.errors import ConfigError
    from medssl.sam.refine import RefineConfig
    from medssl.sam.refine_folder import refine_predictions

    cfg = _config(config, ctx)
    rcfg = RefineConfig(backend=backend, checkpoint=checkpoint, device=device, axis=axis,
                        box_mode="per_component" if per_component else "global", box_pad=box_pad,
                        min_component_px=min_component, merge=merge, iou_threshold=iou_threshold,
                        exclude=_int_list(exclude, "--exclude"), overlap=overlap, modality=modality, policy=policy,
                        candidates=[v for v in (candidates or "").replace(" ", "").split(",") if v],
                        auto_margin=auto_margin)
    if (policy == "auto") != (run is not None):
        raise ConfigError("--policy auto chooses per class on a run's validation patients: give it --run RUN_DIR "
                          "(and --run only with --policy auto)")
    validation = None
    if run is not None:
        from functools import partial

        from medssl.sam.policy import run_validation

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


@app.command(context_settings=EXTRA)
def propagate(ctx: typer.Context,
              image: str = typer.Argument(..., help="the image volume (NIfTI file or DICOM folder)"),
              output: str = typer.Option(..., "--output", "-o", help="output label map (.nii.gz)"),
              mask: Optional[str] = typer.Option(None, "--mask", help="2D mask of the annotated slice (.npy or NIfTI)"),
              slice_index: Optional[int] = typer.Option(None, "--slice", help="index of the annotated slice"),
              labels: Optional[str] = typer.Option(None, "--labels", help="label volume with the annotation"),
              key: str = typer.Option("largest", "--key", help="key slice per class: largest, middle, or an index"),
              label: Optional[int] = typer.Option(None, "--label", help="propagate only this class id"),
              gt: Optional[str] = typer.Option(None, "--gt", help="full label volume for 3D Dice (default: --labels)"),
              config: Optional[str] = ConfigOpt,
              backend: str = typer.Option("litemedsam", help="litemedsam (box chain, SAM 2 stand-in), hybrid "
                                          "(SAM prompted by registered masks), register (optical flow) or sam2"),
              checkpoint: Optional[str] = typer.Option(None, help="weights file (sam2: required)"),
              margin: Optional[float] = typer.Option(None, help="box margin in px (default 3 px of the 256 frame)"),
              iou_threshold: float = typer.Option(0.5, "--iou-threshold", help="stop below this predicted IoU"),
              min_area_ratio: float = typer.Option(0.0, "--min-area-ratio", help="stop when area shrinks below x"),
              max_area_ratio: float = typer.Option(0.0, "--max-area-ratio", help="stop when area grows above x"),
              on_empty: str = typer.Option("stop", "--on-empty", help="stop, or key_box (retry with the key box)"),
              copy_window: Optional[int] = typer.Option(None, "--copy-window", help="copy baseline window k"),
              reg_max_area_change: float = typer.Option(2.0, "--reg-max-area-change",
                                                        help="register/hybrid: stop at an area ratio above x (0 off)"),
              reg_max_shift: float = typer.Option(0.1, "--reg-max-shift",
                                                  help="register/hybrid: diverged if mean flow > x * slice size"),
              reg_max_fold: float = typer.Option(0.05, "--reg-max-fold",
                                                 help="register/hybrid: diverged if the flow folds on > x of the mask"),
              reg_max_intensity_drift: float = typer.Option(1.0, "--reg-max-intensity-drift",
                                                            help="register/hybrid: stop when the mask's mean "
                                                                 "intensity drifts > x key-slice sd (0 off)"),
              reg_max_steps: Optional[int] = typer.Option(None, "--reg-max-steps",
                                                          help="register/hybrid: at most N slices per direction"),
              hybrid_min_dice: float = typer.Option(0.5, "--hybrid-min-dice",
                                                    help="hybrid: accept SAM where Dice with the registered mask >= x"),
              on_disagree: str = typer.Option("register", "--on-disagree",
                                              help="hybrid: register (keep the registered mask) or stop"),
              dense_prompt: bool = typer.Option(False, "--dense-prompt",
                                                help="litemedsam/hybrid: also give the mask as a dense prompt"),
              axis: Optional[int] = typer.Option(None, "--axis", help="slicing axis (default: data.axis)"),
              modality: Optional[str] = typer.Option(None, help="CT or MRI (default: guessed from the intensities)"),
              device: Optional[str] = typer.Option(None, help="torch device")):
    """Propagate one annotated slice through the volume (LiteMedSAM chain, hybrid, registration, or SAM 2)."""
    from medssl.sam.propagate import run_propagate

    cfg = _config(config, ctx)
    key_rule = key if not key.lstrip("-").isdigit() else "largest"
    pcfg = dict(backend=backend, checkpoint=checkpoint, device=device, axis=axis, key_slice=key_rule, label=label,
                margin=margin, on_empty=on_empty, iou_threshold=iou_threshold, min_area_ratio=min_area_ratio,
                max_area_ratio=max_area_ratio, copy_window=copy_window, reg_max_area_change=reg_max_area_change,
                reg_max_shift=reg_max_shift, reg_max_fold=reg_max_fold, reg_max_intensity_drift=reg_max_intensity_drift,
                reg_max_steps=reg_max_steps, hybrid_min_dice=hybrid_min_dice, on_disagree=on_disagree,
                dense_prompt=dense_prompt)
    key_index = int(key) if key.lstrip("-").isdigit() else None
    info = run_propagate(image, output, pcfg, cfg.data, mask=mask, slice_index=slice_index, labels=labels,
                         key_index=key_index, gt=gt, modality=modality)
    for name, m in info.get("metrics", {}).items():
        dice = ", ".join(f"{c}: {v:.3f}" for c, v in m["dice"].items())
        typer.echo(f"{name:>11}: 3D Dice mean {m['dice_mean']:.3f} ({dice})")
    for c, by_dir in info.get("stops", {}).items():
        typer.echo(f"class {c} stopped: " + "; ".join(f"{d} {v['reason']}" + (f" at slice {v['slice']}" if
                                                       v["slice"] is not None else "") for d, v in by_dir.items()))
    typer.echo(f"key slices {info['key_slices']}; wrote {output}")


@app.command(context_settings=EXTRA)
def demo(ctx: typer.Context, data: Optional[str] = DataOpt,
         workdir: str = typer.Option("medssl-demo", help="where the phantom, runs and predictions go"),
         config: Optional[str] = ConfigOpt):
    """The whole loop on a built-in phantom (or --data PATH): prepare, fine-tune, evaluate, predict."""
    from medssl.demo import run_demo

    run_demo(workdir=workdir, data=data, config=config, overrides=list(ctx.args))


@app.command(name="config", context_settings=EXTRA)
def show_config(ctx: typer.Context, config: Optional[str] = ConfigOpt):
    """Print the resolved configuration (preset + overrides) as YAML."""
    from medssl.config import dump_config

    typer.echo(dump_config(_config(config, ctx)))


def main(argv: list[str] | None = None) -> int:
    try:
        app(args=argv, prog_name="medssl")
    except MedsslError as exc:
        print(f"medssl: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
