"""``medssl demo``: prepare -> fine-tune on a few labelled volumes -> evaluate -> predict, in minutes.

With no ``--data`` it writes a procedural CT phantom (no download) into the work folder; with
``--data PATH`` it runs the same loop on any MSD or nnU-Net v2 folder.
"""

from __future__ import annotations

import time
from pathlib import Path

from medssl.config import load_config
from medssl.report.console import print_metrics


def run_demo(workdir: str | Path = "medssl-demo", data: str | None = None, config: str | None = None,
             overrides: list[str] | None = None) -> dict:
    from rich.console import Console

    from medssl.data.cache import prepare
    from medssl.data.layouts import describe_channels, open_data
    from medssl.data.phantom import write_phantom_dataset
    from medssl.engine.finetune import finetune
    from medssl.evaluation.evaluate import evaluate_run, predict_files

    console = Console()
    workdir = Path(workdir).expanduser().resolve()
    t0 = time.time()
    if data is None:
        console.print(f"[bold]1/4[/] writing the phantom CT dataset to {workdir / 'phantom'}")
        data = str(write_phantom_dataset(workdir / "phantom", n_cases=16, seed=0))
    name = "demo-" + time.strftime("%Y%m%d-%H%M%S")
    extra = {"name": name, "output_dir": str(workdir / "runs"),
             "data": {"path": str(data), "cache_dir": str(workdir / "cache")}}
    cfg = load_config(config or "demo", overrides=overrides, extra=extra)

    console.print("[bold]2/4[/] preparing the slice cache")
    info = open_data(cfg.data)
    cache = prepare(cfg.data, info)
    console.print(f"      {cache.meta['n_slices']} slices of {len(cache.meta['cases'])} volumes -> {cache.root}")
    if info.n_channels > 1:
        console.print(f"      {describe_channels(info)}: training on channel {info.channel} (data.channel; "
                      "`medssl plan` chooses one from the data)")

    console.print(f"[bold]3/4[/] fine-tuning {cfg.model.backbone} (f={cfg.model.features}) on "
                  f"M={cfg.split.budget} labelled volumes, {cfg.train.epochs} epochs")
    run_dir = finetune(cfg)

    console.print("[bold]4/4[/] evaluating the best checkpoint on the held-out test volumes and predicting")
    summary = evaluate_run(run_dir, part="test")
    from medssl.data.splits import load_split

    test_cases = load_split(run_dir / "splits.json").test
    written = predict_files(run_dir / "checkpoints" / "best.pt", cfg.data.path, run_dir / "predictions",
                            cases=test_cases, progress=False)
    print_metrics(summary)
    console.print(f"predictions ({len(written)} NIfTI files, original geometry): {run_dir / 'predictions'}")
    console.print(f"run folder (config, splits, checkpoints, TensorBoard, metrics): {run_dir}")
    console.print(f"total time: {time.time() - t0:.0f} s")
    return summary
