"""End-to-end training throughput of two versions of medssl, side by side in one run on one machine.

    python benchmarks/bench_train.py --base 5403e8c [--new WORKTREE_OR_REV] [--steps 30] [--write]

Each cell runs ``medssl finetune`` or ``medssl pretrain`` in a fresh process exactly as a user would (the
version's own presets and defaults), for two epochs of ``--steps`` steps. The figure is the second epoch:
images/s = batch x steps / (wall time from its first batch to the end of training, which includes data
loading, augmentation or views, forward, backward, optimiser, validation and the checkpoint). The two
versions alternate cell by cell, so drifts of a shared machine hit both. Each version's code is exported
from git (``git archive``) into a temporary folder, so the working tree can change while this runs.

Modes: ``fp32`` (``train.amp=off``, with oneDNN limited to ``AVX512_CORE``: what a CPU without
AVX512-BF16/AMX runs) and ``bf16`` (``train.amp=bf16``, only where the CPU has AVX512-BF16 or AMX).
``% of mm peak``: FLOPs per step (``torch.utils.flop_counter`` over one step's forward, loss and backward,
convolutions and matmuls only) x steps/s over the ``torch.mm`` peak of the same dtype in this run.
Peak RSS: the cell process's ``ru_maxrss`` (weights, optimiser state, activations, the slice cache pages
it touched, the libraries).

The MONAI row is a reference loop written with MONAI's parts only: ``BasicUNet`` with widths giving the
same parameter count as the medssl UNet f=16, ``DiceCELoss``, ``torch.optim.Adam``, MONAI ``DataLoader``
over the same cached slices with ``RandFlip``/``RandRotate90`` dictionary transforms, no validation.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from medssl.machine import describe_cpu, has_bf16_units

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = REPO.parent / "shared" / "data" / "Task04_Hippocampus"
HIPPO = ["data.path=" + str(DATA)]
# (label, command, preset, overrides); pretraining cells add pretrain.method
CELLS = [
    ("finetune 64² (Hippocampus, M=20)", "finetune", "hippocampus_plan", ["split.budget=20"]),
    ("finetune 128² (phantom)", "finetune", "demo", ["data.size=128", "split.budget=all"]),
    ("simclr", "pretrain", "hippocampus_plan", []),
    ("pcl", "pretrain", "hippocampus_plan", []),
    ("gcl", "pretrain", "hippocampus_plan", []),
    ("gcl-full", "pretrain", "hippocampus_plan", []),
    ("polycl-s", "pretrain", "hippocampus_plan", ["pretrain.slab_fraction=1.0"]),
    ("polycl-o", "pretrain", "hippocampus_plan", ["pretrain.slab_fraction=1.0"]),
    ("polycl-m", "pretrain", "hippocampus_plan", ["pretrain.slab_fraction=1.0"]),
    ("kaf", "pretrain", "kaf_hippocampus", []),
]


def export(rev: str, dest: Path) -> Path:
    """The ``src`` tree of git revision ``rev`` (or a folder holding ``src/medssl``) -> a folder for PYTHONPATH."""
    if (Path(rev) / "src" / "medssl").is_dir():
        return Path(rev).resolve() / "src"
    dest.mkdir(parents=True, exist_ok=True)
    tar = subprocess.run(["git", "-C", str(REPO), "archive", rev, "src"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=tar, check=True)
    return dest / "src"


# ---------------------------------------------------------------------------------------------- child
def child_medssl(args) -> dict:
    import resource

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from medssl.config import load_config
    from medssl.engine import trainer as T

    over = [*args.over, f"train.steps_per_epoch={args.steps}", "train.epochs=2", f"output_dir={args.out}",
            "name=cell", f"train.amp={args.amp}", "train.threads=0"]
    if args.method:
        over.append(f"pretrain.method={args.method}")
    cfg = load_config(args.preset, overrides=over)
    marks: dict = {"calls": []}
    flops = {}
    init = T.Trainer.__init__

    def patched(self, **kw):
        init(self, **kw)
        inner = self.loss_fn

        def timed(net, batch, step):
            marks["calls"].append(time.perf_counter())
            if "mode" in flops:  # the counted step ends where the next one begins
                flops["mode"].__exit__(None, None, None)
                flops["total"] = flops.pop("mode").get_total_flops()
            if step == 2 and "total" not in flops:
                flops["mode"] = FlopCounterMode(display=False)
                flops["mode"].__enter__()
            return inner(net, batch, step)
        self.loss_fn = timed
    T.Trainer.__init__ = patched
    if args.command == "finetune":
        from medssl.engine.finetune import finetune as run
    else:
        from medssl.engine.pretrain import pretrain as run
    run(cfg, progress=False)
    end = time.perf_counter()
    start = marks["calls"][args.steps]  # first step of epoch 2
    steps = len(marks["calls"]) - args.steps
    step_ms = [1e3 * (b - a) for a, b in zip(marks["calls"][args.steps:], marks["calls"][args.steps + 1:])]
    return {"images_s": cfg.train.batch_size * steps / (end - start), "batch": cfg.train.batch_size,
            "step_ms": statistics.median(step_ms), "flops_step": flops.get("total", 0),
            "steps_s": steps / (end - start), "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": torch.get_num_threads()}


def child_monai(args) -> dict:
    """MONAI-only reference loop on the slices of the finetune 64² cell."""
    import resource

    import numpy as np
    import torch
    from monai.data import DataLoader, Dataset
    from monai.losses import DiceCELoss
    from monai.networks.nets import BasicUNet
    from monai.transforms import Compose, RandFlipd, RandRotate90d
    from monai.utils import set_determinism

    from medssl.config import load_config
    from medssl.data.cache import prepare
    from medssl.data.layouts import open_dataset

    set_determinism(0)
    cfg = load_config("hippocampus_plan", overrides=args.over)
    cache = prepare(cfg.data, open_dataset(cfg.data.path, modality=cfg.data.modality), progress=False)
    rows = np.arange(min(2000, len(cache.images)))
    items = [{"image": np.array(cache.images[r])[None], "label": np.array(cache.labels[r])[None].astype(np.int64)}
             for r in rows]
    tf = Compose([RandFlipd(["image", "label"], prob=0.5, spatial_axis=0),
                  RandRotate90d(["image", "label"], prob=0.5)])
    loader = DataLoader(Dataset(items, tf), batch_size=16, shuffle=True, num_workers=0, drop_last=True)
    net = BasicUNet(spatial_dims=2, in_channels=1, out_channels=cache.n_classes,
                    features=(16, 32, 64, 128, 256, 16))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    amp = args.amp == "bf16"
    calls = []
    it = iter(loader)
    for _ in range(2 * args.steps):
        calls.append(time.perf_counter())
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = net(batch["image"].as_tensor())
        loss = loss_fn(out.float(), batch["label"].as_tensor())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    end = time.perf_counter()
    n = sum(p.numel() for p in net.parameters())
    return {"images_s": 16 * args.steps / (end - calls[args.steps]), "batch": 16, "flops_step": 0,
            "step_ms": statistics.median(1e3 * (b - a) for a, b in zip(calls[args.steps:], calls[args.steps + 1:])),
            "steps_s": args.steps / (end - calls[args.steps]), "params": n,
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# ---------------------------------------------------------------------------------------------- parent
def mm_peak(dtype_name: str) -> float:
    """GFLOP/s of a 2048³ ``torch.mm`` in its fastest ``torch.utils.benchmark.Timer`` block."""
    import torch

    from bench_md import measure

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    best = min(measure(lambda: a @ b, 15).times)
    return 2 * 2048**3 / best / 1e9


def run_cell(src: Path, cell, mode: str, steps: int, out: Path, monai: bool = False) -> dict:
    label, command, preset, over = cell
    method = label if command == "pretrain" else ""
    amp = "off" if mode == "fp32" else "bf16"
    env = {**os.environ, "PYTHONPATH": str(src)}
    if mode == "fp32":
        env["ONEDNN_MAX_CPU_ISA"] = "AVX512_CORE"
    cmd = [sys.executable, __file__, "--child", "monai" if monai else "medssl", "--command", command, "--preset",
           preset, "--method", method, "--amp", amp, "--steps", str(steps), "--out", str(out), "--",
           *HIPPO, *over]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO))
    if res.returncode:
        return {"error": (res.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="5403e8c", help="git revision of today's code")
    ap.add_argument("--new", default="HEAD", help="git revision (or a checkout folder) of the new code")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--modes", nargs="+", default=None, help="fp32 and/or bf16 (default: both where possible)")
    ap.add_argument("--cells", nargs="+", default=None, help="labels of the cells to run (default: all)")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--child", choices=["medssl", "monai"])
    ap.add_argument("--command", default="finetune")
    ap.add_argument("--preset", default="hippocampus_plan")
    ap.add_argument("--method", default="")
    ap.add_argument("--amp", default="off")
    ap.add_argument("--out", default="")
    ap.add_argument("over", nargs="*")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child_monai(args) if args.child == "monai" else child_medssl(args)))
        return
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} not found: this benchmark needs ../shared/data/Task04_Hippocampus")
    import torch

    modes = args.modes or (["fp32", "bf16"] if has_bf16_units() else ["fp32"])
    tmp = Path(tempfile.mkdtemp(prefix="medssl-bench-train-"))
    phantom = tmp / "phantom"
    sys.path.insert(0, str(REPO / "src"))
    from medssl.data.phantom import write_phantom_dataset

    write_phantom_dataset(phantom, shape=(128, 128, 32), spacing=(0.8, 0.8, 2.5))
    cells = [(lbl, cmd, pre, over + ([f"data.path={phantom}"] if pre == "demo" else []))
             for lbl, cmd, pre, over in CELLS if not args.cells or lbl in args.cells]
    versions = {"today": export(args.base, tmp / "base"), "new": export(args.new, tmp / "new")}
    peaks = {m: mm_peak("float32" if m == "fp32" else "bfloat16") for m in modes}
    print(f"CPU: {describe_cpu()}; torch {torch.__version__}; mm peak " +
          ", ".join(f"{m} {p:.0f} GFLOP/s" for m, p in peaks.items()), flush=True)
    load0 = os.getloadavg()[0]
    rows = []
    for mode in modes:
        for cell in cells:
            res = {}
            for name, src in versions.items():
                res[name] = run_cell(src, cell, mode, args.steps, tmp / f"run-{name}")
                subprocess.run(["rm", "-rf", str(tmp / f"run-{name}")])
            rows.append((mode, cell[0], res))
            print(mode, cell[0], json.dumps(res), flush=True)
        res = {"monai": run_cell(versions["new"], CELLS[0], mode, args.steps, tmp / "run-monai", monai=True)}
        rows.append((mode, "MONAI reference loop (BasicUNet, same params), 64²", res))
        print(mode, "monai", json.dumps(res), flush=True)
    table = render(rows, peaks, args, load0)
    print(table)
    if args.write:
        sys.path.insert(0, str(HERE))
        from bench_md import write_section

        write_section("train_e2e", "End-to-end training throughput", table)


def render(rows, peaks, args, load0) -> str:
    def cell(r, key, fmt):
        return "error" if "error" in r else format(r[key], fmt)

    lines = [
        f"Command: `python benchmarks/bench_train.py --base {args.base} --new {args.new} --steps {args.steps}"
        f"{' --write' if args.write else ''}`",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; CPU: {describe_cpu()}; matmul peak "
        + ", ".join(f"{m} {p:.0f} GFLOP/s" for m, p in peaks.items())
        + f"; 1-min load average before / after: {load0:.2f} / {os.getloadavg()[0]:.2f}.",
        "",
        "| mode | cell | today images/s | new images/s | speed-up | today step ms | new step ms | "
        "GFLOP/step | new % of mm peak | today peak RSS MiB | new peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, label, res in rows:
        if "monai" in res:
            m = res["monai"]
            lines.append(f"| {mode} | {label} | | {cell(m, 'images_s', '.1f')} | | | {cell(m, 'step_ms', '.0f')} |"
                         f" | | | {cell(m, 'rss_mb', '.0f')} |")
            continue
        a, b = res["today"], res["new"]
        ok = "error" not in a and "error" not in b
        gf = b.get("flops_step", 0) / 1e9 if "error" not in b else 0
        pct = f"{100 * gf * b['steps_s'] / peaks[mode]:.0f}" if ok and gf else ""
        lines.append(
            f"| {mode} | {label} | {cell(a, 'images_s', '.1f')} | {cell(b, 'images_s', '.1f')} | "
            + (f"{b['images_s'] / a['images_s']:.2f}x" if ok else "") + f" | {cell(a, 'step_ms', '.0f')} | "
            f"{cell(b, 'step_ms', '.0f')} | {gf:.1f} | {pct} | {cell(a, 'rss_mb', '.0f')} | {cell(b, 'rss_mb', '.0f')} |")
    errors = [f"{mode} {label} {k}: {r['error']}" for mode, label, res in rows for k, r in res.items() if "error" in r]
    if errors:
        lines += ["", "Errors: " + "; ".join(errors)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
