"""Pretraining throughput (slices/s) per method, on the Hippocampus slice cache, same run.

    python benchmarks/bench_pretrain.py --steps 20 --batch 16 --size 64 --features 16 [--write]

PolyCL variants use ``slab_fraction=1.0`` here: Hippocampus crops contain the target in every slice of the
default central 30% slab, which leaves PolyCL-O/M without negatives. Each method trains its own model from the
same initial encoder; a step's time is the median from ``torch.utils.benchmark.Timer`` over about ``--steps``
optimiser steps after its warm-up, with bf16 autocast where supported; slices/s counts the *input* slices per
step (SimCLR/PCL/GCL: 2 views per slice; PolyCL: anchor + positive + negative per anchor), so the
figure is what a user feeds, and the per-step encoder passes are listed too. Baseline for comparison:
one supervised fine-tuning step of the same UNet on the same batch (Dice+CE).
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss

from bench_md import measure, write_section
from medssl.config import AugConfig, DataConfig, PretrainConfig
from medssl.data.augment import make_generator
from medssl.data.cache import prepare
from medssl.engine.trainer import amp_enabled
from medssl.methods import build_method
from medssl.models import build_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "Task04_Hippocampus"
PASSES = {"simclr": 2, "pcl": 2, "gcl": 2, "gcl-full": 2, "polycl-s": 3, "polycl-o": 3, "polycl-m": 3}
# (method, backbone, stage): PolyCL runs on both its own UNet and the medssl UNet the experiments use, so
# backbone cost and sampler cost can be told apart; gcl-full's two stages are timed separately.
CASES = [("simclr", "unet", None), ("pcl", "unet", None), ("gcl", "unet", None), ("gcl-full", "unet", "local"),
         ("polycl-s", "unet", None), ("polycl-o", "unet", None), ("polycl-m", "unet", None),
         ("polycl-s", "polycl-unet", None), ("polycl-o", "polycl-unet", None), ("polycl-m", "polycl-unet", None)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--features", type=int, default=16)
    ap.add_argument("--cache-dir", default="~/.cache/medssl/slices")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} not found: this benchmark needs ../shared/data/Task04_Hippocampus")
    cache = prepare(DataConfig(path=str(DATA), size=args.size, cache_dir=args.cache_dir), progress=False)
    rows_all = np.arange(cache.meta["n_slices"])
    amp = amp_enabled("auto", torch.device("cpu"))
    rng = np.random.default_rng(0)
    results = []
    sampler_ms: dict[str, float] = {}

    def run(name, step_fn):
        counter = itertools.count()  # step i seeds the step's generator, as in training
        results.append((name, measure(lambda: step_fn(next(counter)), args.steps).median))
        print(name, f"{args.batch / results[-1][1]:.1f} slices/s", flush=True)

    # supervised reference
    seg = build_model("unet", in_channels=1, n_classes=cache.n_classes, features=args.features)
    opt = torch.optim.AdamW(seg.parameters(), 1e-3)
    crit = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)

    def sup_step(i):
        r = np.sort(rng.choice(rows_all, args.batch, replace=False))
        x = torch.from_numpy(np.array(cache.images[r]))[:, None]
        y = torch.from_numpy(np.array(cache.labels[r], dtype=np.int64))[:, None]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = crit(seg(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    run("fine-tuning step (reference)", sup_step)
    for name, backbone, stage in CASES:
        seg_m = build_model(backbone, in_channels=1, n_classes=2, features=args.features)
        # Hippocampus crops hold the target in every central-slab slice: PolyCL-O/M need the whole volume
        slab = 1.0 if name.startswith("polycl") else 0.3
        method = build_method(name, seg_m.encoder, PretrainConfig(method=name, options={"polycl": {"slab_fraction": slab}}), AugConfig(),
                              decoder=seg_m.decoder)
        if stage == "local":
            method.set_step(1, 1)  # the local stage (encoder frozen, decoder stages + g2 trained)
        rows = method.select_rows(cache, rows_all)
        if hasattr(method, "_draw"):  # the sampler alone: drawing one batch of (positive, negative) rows
            draws = itertools.count()

            def draw(method=method, rows=rows, draws=draws):
                method._draw(rng.choice(rows, args.batch).tolist(), make_generator(next(draws)))

            sampler_ms[f"{name} ({backbone})"] = measure(draw, 20).median * 1e3
        mopt = torch.optim.AdamW(method.parameters(), 1e-3)

        def step(i, method=method, rows=rows, mopt=mopt):
            r = np.sort(rng.choice(rows, args.batch, replace=False))
            batch = {"image": torch.from_numpy(np.array(cache.images[r]))[:, None], "row": torch.from_numpy(r),
                     "rel_pos": torch.from_numpy(cache.rel_pos[r]), "slice": torch.from_numpy(cache.slice_idx[r]),
                     "n_slices": torch.from_numpy(cache.n_slices[r])}
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss, _ = method.loss(batch, make_generator(i))
            mopt.zero_grad()
            loss.backward()
            mopt.step()

        run(f"{name}{' local stage' if stage else ''} ({backbone})", step)

    lines = [f"Command: `python benchmarks/bench_pretrain.py --steps {args.steps} --batch {args.batch} "
             f"--size {args.size} --features {args.features} --write`",
             f"Date: {time.strftime('%Y-%m-%d %H:%M')}; torch {torch.__version__}; {torch.get_num_threads()} threads; "
             f"bf16 autocast {'on' if amp else 'off'}; Hippocampus cache at {args.size}²; median step "
             f"(`torch.utils.benchmark.Timer`, about {args.steps} timed steps).",
             "", "| method (backbone) | slices/s (input anchors) | encoder passes per slice | ms per step | "
             "of which sampler ms |", "|---|---:|---:|---:|---:|"]
    for name, t in results:
        key = name.split(" ")[0]
        samp = f"{sampler_ms[name]:.2f}" if name in sampler_ms else "–"
        lines.append(f"| {name} | {args.batch / t:.1f} | {PASSES.get(key, 1)} | {t * 1e3:.0f} | {samp} |")
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section("pretrain", "Pretraining throughput", text)

if __name__ == "__main__":
    main()
