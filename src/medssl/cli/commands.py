"""The data, training and evaluation commands: prepare, check, plan, finetune, pretrain, evaluate, predict,
experiment, advise, demo and config. Slow imports (torch) happen inside the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medssl.cli.common import (EXTRA, SETTINGS, ChoicesCommand, ConfigOpt, DataOpt, Modality, app, choices, extras,
                               lazy_choice, legacy, load, no_words, warn)
from medssl.errors import ConfigError, DataError
from medssl.report.console import print_metrics

InitMode = choices("InitMode", ("encoder", "full"))
Budget = choices("Budget", ("cpu", "gpu"))
Part = choices("Part", ("test", "val", "labelled", "unlabelled"))  # medssl.evaluation.evaluate.PARTS


def _methods() -> list[str]:
    from medssl.methods import available_methods

    return available_methods()


def _strategies() -> tuple[str, ...]:
    from medssl.advise.strategies import STRATEGIES

    return STRATEGIES


def _str(value) -> Optional[str]:
    return None if value is None else str(value)


def _int_list(text: Optional[str], option: str) -> list[int]:
    try:
        return [int(v) for v in (text or "").replace(" ", "").split(",") if v]
    except ValueError:
        raise ConfigError(f"{option}: expected comma-separated class ids, got {text!r}") from None


@app.command(context_settings=EXTRA, epilog=SETTINGS)
def prepare(ctx: typer.Context, config: Optional[str] = ConfigOpt, data: Optional[str] = DataOpt,
            force: bool = typer.Option(False, help="rebuild even if an identical cache exists")):
    """Build (or reuse) the on-disk slice cache of a dataset."""
    from medssl.data.cache import prepare as build

    overrides, words = extras(ctx)
    no_words(words)
    cfg = load(config, overrides, **{"data.path": data})
    cache = build(cfg.data, force=force)
    typer.echo(f"slice cache: {cache.root}  ({cache.meta['n_slices']} slices, {len(cache.meta['cases'])} cases)")


@app.command(context_settings=EXTRA, epilog=SETTINGS)
def check(ctx: typer.Context, config: Optional[str] = ConfigOpt, data: Optional[str] = DataOpt,
          modality: Optional[Modality] = typer.Option(None, case_sensitive=False,
                                                      help="override the modality (default: data.modality)"),
          axis: Optional[int] = typer.Option(None, "--axis", help="slicing axis for the flip check (data.axis)"),
          flip_axes: Optional[str] = typer.Option(None, "--flip-axes",
                                                  help="slice axes the augmentation flips (aug.flip_axes)")):
    """Report every problem of a dataset at once (exit 1 if there is any); warn about unsafe flips."""
    from medssl.data.check import flip_warnings, run_check

    overrides, words = extras(ctx)
    data = legacy(words, data, "check", "--data")
    cfg = load(config, overrides, **{"data.path": data})
    if not cfg.data.path:
        raise ConfigError("check needs a dataset: --data DATA (or data.path in --config)")
    mod = _str(modality) or cfg.data.modality
    flips = cfg.aug.flip_axes if flip_axes is None else _int_list(flip_axes, "--flip-axes")
    result = run_check(cfg.data.path, modality=mod, channel=cfg.data.channel)
    for problem in result.problems:
        typer.echo(str(problem))
    if result.channels:
        typer.echo(f"channels: {result.channels}")
    if not result.problems:
        for line in flip_warnings(cfg.data.path, axis=cfg.data.axis if axis is None else axis, flip_axes=flips,
                                  modality=mod, channel=cfg.data.channel):
            typer.echo(f"warning: {line}")
    typer.echo(f"{result.n_cases} cases ({result.n_labelled} labelled, {result.n_unlabelled} unlabelled): "
               f"{len(result.problems)} problem(s)")
    raise typer.Exit(1 if result.problems else 0)


@app.command()
def plan(data: str = typer.Option(..., "--data", "-d", help="dataset folder"),
         config: Optional[str] = typer.Option(None, "--config", "-c", help="preset or YAML file the plan extends "
                                              "(default: generic)"),
         output: str = typer.Option("plan.yaml", "--output", "-o", help="the plan (a config file)"),
         budget: Budget = typer.Option("cpu", "--budget", help="sizes canvas, patch, width and batch"),
         hours: Optional[float] = typer.Option(None, "--hours", help="time for one fine-tuning run "
                                                                     "(default 0.25 on cpu, 1 on gpu)"),
         modality: Optional[Modality] = typer.Option(None, case_sensitive=False, help="override the modality")):
    """Derive a configuration from the dataset's fingerprint, with the reason for each value."""
    from medssl.planning import write_plan

    base = config or "generic"
    if config and Path(config).expanduser().is_file():  # the plan names its base; make it findable from anywhere
        base = str(Path(config).expanduser().resolve())
    out, planned = write_plan(data, output, budget=str(budget), hours=hours, modality=_str(modality), base=base)
    for line in planned.warnings:
        typer.echo(f"warning: {line}")
    typer.echo(Path(out).read_text())
    typer.echo(f"wrote {out} (and {out.name}.fingerprint.json); use it as --config {out}")


@app.command(context_settings=EXTRA, epilog=SETTINGS)
def finetune(ctx: typer.Context, config: Optional[str] = ConfigOpt, data: Optional[str] = DataOpt,
             init: Optional[str] = typer.Option(None, "--init", help="checkpoint to start from"),
             init_mode: Optional[InitMode] = typer.Option(None, "--init-mode",
                                                          help="what --init loads (default: encoder)"),
             name: Optional[str] = typer.Option(None, help="run name (folder under output_dir)"),
             resume: bool = typer.Option(False, "--resume", help="continue a killed run from its last checkpoint"),
             evaluate: bool = typer.Option(True, help="evaluate the best checkpoint on the test fold afterwards")):
    """Fine-tune a segmentation model on the labelled budget."""
    overrides, words = extras(ctx)
    no_words(words)
    cfg = load(config, overrides, **{"data.path": data, "train.init": init, "train.init_mode": _str(init_mode),
                                     "name": name})
    from medssl.engine.distributed import init_distributed
    from medssl.engine.finetune import finetune as run_finetune

    run_dir = run_finetune(cfg, resume=resume)
    if evaluate and init_distributed().is_main:
        from medssl.evaluation.evaluate import evaluate_run

        print_metrics(evaluate_run(run_dir, part="test", checkpoint="best"))
    typer.echo(f"run folder: {run_dir}")


@app.command(cls=ChoicesCommand, context_settings=EXTRA, epilog=SETTINGS)
def pretrain(ctx: typer.Context, config: Optional[str] = ConfigOpt, data: Optional[str] = DataOpt,
             method: Optional[str] = typer.Option(None, "--method", "-m", callback=lazy_choice("method", _methods),
                                                  help="pretraining method (pretrain.method)"),
             name: Optional[str] = typer.Option(None, help="run name (folder under output_dir)"),
             resume: bool = typer.Option(False, "--resume", help="continue a killed run from its last checkpoint")):
    """Self-supervised pretraining of the backbone's encoder on the fold's training images."""
    overrides, words = extras(ctx)
    no_words(words)
    cfg = load(config, overrides, **{"data.path": data, "pretrain.method": method, "name": name})
    from medssl.engine.pretrain import pretrain as run_pretrain

    run_dir = run_pretrain(cfg, resume=resume)
    typer.echo(f"run folder: {run_dir}\nencoder for fine-tuning: --init {run_dir / 'checkpoints' / 'last.pt'}")


@app.command()
def evaluate(target: str = typer.Argument(..., metavar="RUN_DIR|PRED_DIR", help="a fine-tuning run folder, or a "
                                          "folder of {CASE}.nii.gz predictions made elsewhere"),
             gt_dir: Optional[str] = typer.Argument(None, metavar="GT_DIR", help="with predictions: the ground truth, "
                                                    "a folder of label files or a dataset folder"),
             data: Optional[str] = typer.Option(None, "--data", "-d", help="with predictions: the dataset whose "
                                                "labels are the ground truth (same as GT_DIR)"),
             labels: Optional[str] = typer.Option(None, "--labels", help="with predictions: score only these "
                                                  "class ids, e.g. 1,2 (default: every declared class)"),
             out: Optional[str] = typer.Option(None, "--out", help="with predictions: folder for summary.json and "
                                               "per_case.csv (default: PRED_DIR/evaluation)"),
             part: Optional[Part] = typer.Option(None, help="run: split part to score (default: test)"),
             checkpoint: str = typer.Option("best", help="run: best, last, or a checkpoint path"),
             save_predictions: bool = typer.Option(False, help="run: also write {CASE}.nii.gz predictions")):
    """3D Dice / HD95 (mm) per class: of a run on its split (RUN_DIR), or of predictions (PRED_DIR GT_DIR)."""
    if gt_dir is not None and data is not None:
        raise ConfigError("give the ground truth once: GT_DIR or --data")
    truth = gt_dir or data
    if truth is None:
        if labels is not None or out is not None:
            raise ConfigError("--labels and --out score predictions: medssl evaluate PRED_DIR GT_DIR")
        if not (Path(target).expanduser() / "config.yaml").is_file():  # fail before the slow torch import
            raise ConfigError(f"{target}: no config.yaml: not a medssl run folder (to score predictions made "
                              f"elsewhere: medssl evaluate PRED_DIR GT_DIR)")
        from medssl.evaluation.evaluate import evaluate_run

        print_metrics(evaluate_run(target, part=_str(part) or "test", checkpoint=checkpoint,
                                   save_predictions=save_predictions))
        return
    if part is not None or save_predictions or checkpoint != "best":
        raise ConfigError("--part, --checkpoint and --save-predictions apply to a run folder, not to PRED_DIR GT_DIR")
    from medssl.evaluation.folders import evaluate_folders

    wanted = _int_list(labels, "--labels") if labels is not None else None
    summary = evaluate_folders(target, truth, labels=wanted, out_dir=out)
    print_metrics(summary)
    typer.echo(f"wrote {Path(summary['out_dir']) / 'summary.json'} and per_case.csv")


@app.command()
def predict(model: str = typer.Argument(..., help="a run folder (its best checkpoint) or a checkpoint file"),
            inputs: Optional[str] = typer.Argument(None, help="deprecated: use --data", show_default=False),
            data: Optional[str] = typer.Option(None, "--data", "-d", help="a NIfTI file, a DICOM series folder, "
                                               "or a dataset folder"),
            output: str = typer.Option(..., "--output", "-o", help="folder for {CASE}.nii.gz"),
            case: Optional[list[str]] = typer.Option(None, "--case", help="only these case ids")):
    """Write label maps with the input's original shape, affine and orientation."""
    if inputs is not None:
        if data is not None:
            raise ConfigError(f"unexpected argument {inputs!r}: the input is --data {data}")
        warn(f"'medssl predict MODEL {inputs}' is deprecated: use 'medssl predict MODEL --data {inputs}'")
    source = data or inputs
    if source is None:
        raise ConfigError("predict needs its input: --data FILE_OR_FOLDER")
    for what, path in (("checkpoint or run folder", model), ("input", source)):
        if not Path(path).expanduser().exists():  # fail before the slow torch import
            raise DataError(f"{path}: {what} not found")
    from medssl.evaluation.evaluate import predict_files, run_checkpoint

    ckpt = run_checkpoint(model) if Path(model).is_dir() else Path(model)
    written = predict_files(ckpt, source, output, cases=case)
    typer.echo(f"wrote {len(written)} prediction(s) to {output}")


@app.command(context_settings=EXTRA, epilog="Settings: top-level KEY=VALUE overrides of the experiment file, "
             "e.g. seeds=[0] budgets=[1,2].")
def experiment(ctx: typer.Context,
               config: Optional[str] = typer.Option(None, "--config", "-c", help="experiment YAML, or a packaged "
                                                    "experiment (hippocampus_cpu, hippocampus_ssl, ...)"),
               data: Optional[str] = typer.Option(None, "--data", "-d", help="dataset folder (sets data)")):
    """Methods x label budgets x seeds x folds: pretrain once per fold, fine-tune, evaluate, tabulate."""
    overrides, words = extras(ctx)
    config = legacy(words, config, "experiment", "--config")
    if config is None:
        raise ConfigError("experiment needs its file: --config EXPERIMENT.yaml")
    from medssl.pipeline.experiment import load_experiment, run_experiment

    exp = load_experiment(config, overrides=overrides + ([f"data={data}"] if data is not None else []))
    run_experiment(exp)
    typer.echo((Path(exp.output_dir).expanduser() / "results.md").read_text())
    typer.echo(f"report (tables, plot, test-case overlays): {Path(exp.output_dir).expanduser() / 'report.html'}")


@app.command()
def report(run_dir: str = typer.Argument(..., help="an experiment's output_dir (with results.md)")):
    """Rebuild report.html of an experiment folder: its tables, the Dice-vs-M plot and test-case overlays."""
    from medssl.report.html import write_report

    typer.echo(f"wrote {write_report(run_dir)}")


@app.command(cls=ChoicesCommand, context_settings=EXTRA, epilog=SETTINGS)
def advise(ctx: typer.Context, config: Optional[str] = ConfigOpt, data: Optional[str] = DataOpt,
           budget: int = typer.Option(..., "--budget", "-m", help="number of patients to label (M)"),
           init: Optional[str] = typer.Option(None, "--init", help="pretrained checkpoint whose encoder embeds the "
                                                                   "patients (default: intensity statistics)"),
           strategy: str = typer.Option("typical", "--strategy", callback=lazy_choice("strategy", _strategies),
                                        help="how the M patients are chosen"),
           seed: int = typer.Option(0, "--seed", help="seed of random and of k-means (typical)"),
           output: str = typer.Option("advice", "--output", "-o", help="folder for advice.csv and embedding.png")):
    """Which training patients of the fold to label first (docs/advise.md): advice.csv and a map."""
    from medssl.advise.run import check_request, finetune_command, run_advise

    overrides, words = extras(ctx)
    no_words(words)
    check_request(budget, strategy, init, seed)  # before the slow imports and the data
    cfg = load(config, overrides, **{"data.path": data})
    info = run_advise(cfg, budget=budget, strategy=strategy, init=init, seed=seed, out=output)
    for line in info["warnings"]:
        typer.echo(f"warning: {line}")
    typer.echo(f"{strategy}: label {', '.join(info['chosen'])} (of {info['candidates']} training patients of "
               f"{info['where']}; features: {info['features']})")
    typer.echo(f"wrote {Path(info['out']) / 'advice.csv'} and embedding.png")
    if info["without_label"]:
        typer.echo(f"label first (no label file yet): {', '.join(info['without_label'])}")
    typer.echo("to fine-tune on the advice:\n  " + finetune_command(config, data, overrides, budget,
                                                                     info["label_cases"]))


@app.command(context_settings=EXTRA, epilog=SETTINGS)
def demo(ctx: typer.Context, config: Optional[str] = ConfigOpt,
         data: Optional[str] = typer.Option(None, "--data", "-d", help="dataset folder (default: a built-in "
                                            "phantom)"),
         workdir: str = typer.Option("medssl-demo", help="where the phantom, runs and predictions go")):
    """The whole loop on a built-in phantom (or --data PATH): prepare, fine-tune, evaluate, predict."""
    overrides, words = extras(ctx)
    no_words(words)
    from medssl.pipeline.demo import run_demo

    run_demo(workdir=workdir, data=data, config=config, overrides=overrides)


@app.command(name="config", context_settings=EXTRA, epilog=SETTINGS)
def show_config(ctx: typer.Context, config: Optional[str] = ConfigOpt, data: Optional[str] = DataOpt):
    """Print the resolved configuration (preset + overrides) as YAML."""
    import medssl.methods  # noqa: F401  (registers every method, so their options are checked and filled in)
    from medssl.config import dump_config, resolve_options

    overrides, words = extras(ctx)
    no_words(words)
    cfg = load(config, overrides, **{"data.path": data})
    resolve_options(cfg.pretrain)
    typer.echo(dump_config(cfg))
